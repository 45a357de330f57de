"""A tiny deterministic numpy language model implementing the ``Backend`` protocol.

Logits at a position are a fixed function of the last two tokens in the cache (a random
bigram-of-pairs table), so the full model is an exact, cheap reference.  Skipping blocks
perturbs the logits by an amount that grows with the number of skipped blocks, so drafts
are sometimes wrong, as with a real model.  Used to test the loop's logic (losslessness,
stopping, statistics) in milliseconds; the real model is tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from knapspec.backends.base import Backend
from knapspec.blocks import BlockLayout
from knapspec.costmodels.linear import LinearCostModel


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, vocab: int = 16, n_layers: int = 4, max_context: int = 512,
                 noise: float = 1.5, seed: int = 0, eos: int | None = None,
                 sharpness: float = 3.0) -> None:
        rng = np.random.default_rng(seed)
        self.vocab_size = vocab
        self.layout = BlockLayout(n_layers)
        self.max_context = max_context
        self.eos_token_ids = frozenset() if eos is None else frozenset({eos})
        self.table = rng.normal(size=(vocab, vocab, vocab)) * sharpness  # [V, V, V]
        self.block_noise = rng.normal(size=(2 * n_layers, vocab, vocab)) * noise  # [2L, V, V]
        self.cache: list[int] = []
        self.calls: list[tuple[int, bool]] = []  # (n tokens, masked?) per forward

    def encode(self, text: str, chat: bool = True) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + int(i)) for i in ids)

    @property
    def length(self) -> int:
        return len(self.cache)

    def reset(self) -> None:
        self.cache = []

    def rollback(self, length: int) -> None:
        assert 0 <= length <= len(self.cache)
        del self.cache[length:]

    def _logits(self, prev2: int, prev1: int, mask: np.ndarray | None) -> np.ndarray:
        z = self.table[prev2, prev1].copy()
        if mask is not None:
            for b in np.flatnonzero(mask):
                z += self.block_noise[b, prev1]
        return z

    def forward(self, tokens, mask=None, *, capture=False, all_logits=True) -> np.ndarray:
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            assert mask.shape == (self.layout.n_blocks,)
            if not mask.any():
                mask = None
        assert len(self.cache) + len(tokens) <= self.max_context
        self.calls.append((len(tokens), mask is not None))
        out = []
        for t in tokens:
            self.cache.append(int(t))
            p2 = self.cache[-2] if len(self.cache) > 1 else 0
            out.append(self._logits(p2, self.cache[-1], mask))
        logits = np.array(out, dtype=np.float32)
        return logits if all_logits else logits[-1:]

    def profile(self, **kwargs):
        return fake_cost_model()


def fake_cost_model() -> LinearCostModel:
    """Costs where drafting pays: cheap blocks relative to a cheap head."""
    return LinearCostModel(
        mlp_s=1e-3, attn_per_token_s=1e-6, attn_base_s=5e-4, head_s=1e-4, overhead_s=1e-4,
        mlp_per_token_s=1e-4, attn_per_new_token_s=5e-5,
    )


def linear_cost_model(**kw: float) -> LinearCostModel:
    """A ``LinearCostModel`` whose every term is set (per-token slopes included), with
    ``kw`` replacing any of them (seconds)."""
    base = dict(mlp_s=1e-3, attn_per_token_s=2e-7, attn_base_s=4e-4, head_s=2e-3,
                overhead_s=5e-4, mlp_per_token_s=5e-5, attn_per_new_token_s=1e-5,
                head_per_token_s=2e-4)
    base.update(kw)
    return LinearCostModel(**base)
