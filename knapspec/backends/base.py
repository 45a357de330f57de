"""The backend protocol: the few primitives the draft/verify loop needs from a model runner.

A backend owns the model weights and one KV cache.  The loop (``knapspec.decoding``) owns
everything else: drafting, verification, acceptance, planning, stopping, statistics.
Backends honour a skip mask; they never run the loop themselves.

Shapes: ``n`` tokens per call, ``V`` vocabulary size, ``L`` layers (``2L`` blocks).
Logits are returned as float32 numpy arrays ``[n, V]`` (the loop does token selection on
the CPU; for a 49K vocabulary that costs microseconds).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..blocks import BlockLayout
from .profiling import profile_backend

if TYPE_CHECKING:
    from ..costmodels.base import CostModel
    from ..oracle import BlockOracle


class Backend(ABC):
    """A model runner with a KV cache that can run any skip mask and roll back.

    Attributes set by subclasses:
        name: backend name as used in configs (``torch``, ``torch-compile``, ``llamacpp``).
        layout: the model's blocks and which are pinned.
        vocab_size: ``V``.
        max_context: most tokens the KV cache can hold.
        eos_token_ids: token ids that end a generation.
    """

    name: str = ""
    layout: BlockLayout
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]

    # ------------------------------------------------------------------ tokenizer
    @abstractmethod
    def encode(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of ``text``, through the model's chat template when ``chat``."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens skipped)."""

    # ------------------------------------------------------------------ KV cache
    @property
    @abstractmethod
    def length(self) -> int:
        """Tokens currently in the KV cache."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Truncate the KV cache to its first ``length`` tokens (``length <= self.length``)."""

    # ------------------------------------------------------------------ compute
    @abstractmethod
    def forward(
        self,
        tokens: Sequence[int],
        mask: np.ndarray | None = None,
        *,
        capture: bool = False,
        all_logits: bool = True,
    ) -> np.ndarray:
        """Append ``tokens`` at positions ``length .. length + n - 1`` and return logits.

        Args:
            tokens: ``n`` token ids.
            mask: ``[2L]`` bool skip mask; ``None`` (or all False) runs the full model.
                Skipped attention blocks write nothing into the KV cache.
            capture: keep the full model's hidden states at every block boundary for these
                tokens (for planners; only meaningful with ``mask=None``).
            all_logits: return logits for every position (``[n, V]``), else only the last
                (``[1, V]``), which skips the LM head on the others.

        Returns:
            float32 ``[n, V]`` (or ``[1, V]``) logits.
        """

    def cached_tokens(self) -> list[int | None] | None:
        """Token id at every cached position (``None`` where a draft wrote partial KV), or
        ``None`` if the backend does not track them (then ``prefill`` never reuses)."""
        return None

    def prefill(self, tokens: Sequence[int], capture: bool = False) -> np.ndarray:
        """Run the full model over the prompt from an empty cache; returns the last logits ``[V]``.

        Prompt caching: when the cache already holds exactly these tokens, written by the
        full model (a previous generation from the same prompt), they are kept and only the
        last prompt token is recomputed.
        """
        tokens = list(tokens)
        cached = self.cached_tokens()
        if cached is not None and len(cached) >= len(tokens) and cached[: len(tokens)] == tokens:
            self.rollback(len(tokens) - 1)
        else:
            self.reset()
        return self.forward(tokens[self.length :], None, capture=capture, all_logits=False)[-1]

    # ------------------------------------------------------------------ planning support
    def block_oracle(self) -> BlockOracle | None:
        """A ``BlockOracle`` over the last captured tokens, or ``None`` if unsupported."""
        return None

    def final_hidden(self) -> Any:
        """Final-norm hidden states of the last ``forward`` call ``[n, D]`` (if kept)."""
        return None

    def switch_seconds(self, mask: np.ndarray) -> float:
        """One-off seconds to start drafting with ``mask`` (0 for backends that share weights)."""
        return 0.0

    def profile(self, **kwargs: Any) -> CostModel:
        """Measure this backend's latencies into a cost model.

        The default times real ``forward`` calls (``knapspec.backends.profiling.profile_backend``,
        which documents ``kwargs``); backends with costs of their own add them here.
        """
        return profile_backend(self, **kwargs)

    def describe(self) -> dict[str, Any]:
        """Provenance for cost-model files and benchmark reports (model, threads, dtype...)."""
        return {"backend": self.name}
