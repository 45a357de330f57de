"""The backend protocol: the few primitives the draft/verify loop needs from a model runner.

A backend owns the model weights and one KV cache.  The loop (``knapspec.decoding``) owns
everything else: drafting, verification, acceptance, planning, stopping, statistics.
Backends honour a skip mask; they never run the loop themselves.

Shapes: ``n`` tokens per call, ``V`` vocabulary size, ``L`` layers (``2L`` blocks).
Logits are returned as float32 numpy arrays ``[n, V]``.

One round of the loop goes through two methods, ``draft`` and ``verify``.  Their defaults
here run ``forward`` and select tokens on the CPU with ``knapspec.sampling`` (for a 49K
vocabulary that costs microseconds); a backend on an accelerator overrides them so that
token selection, the comparison of drafts with the target and rejection sampling stay on
its device and only the resulting ids cross to the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..blocks import BlockLayout
from ..errors import KnapSpecError
from ..sampling import (
    SamplingParams,
    draft_token,
    greedy_verify,
    probabilities,
    rejection_verify,
    select,
)
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
        timing_only_reason: why this backend's outputs are not a real model's (e.g. random
            weights), or ``None``; the loop flags every result ``timing_only`` with it.
    """

    name: str = ""
    layout: BlockLayout
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    timing_only_reason: str | None = None

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

    # ------------------------------------------------------------------ one round
    def draft(
        self,
        last: int,
        mask: np.ndarray,
        n: int,
        sampling: SamplingParams,
        rng: np.random.Generator,
        stop_ids: frozenset[int],
        *,
        vocab: int = 0,
        stop_confidence: float = 0.0,
    ) -> tuple[list[int], Any]:
        """``n`` draft steps under ``mask``, starting from token ``last`` (not yet cached).

        Each step appends one token to the cache (``n`` in all, fewer when a drafted id is in
        ``stop_ids``: the generation would end there, or after a confidence stop).  Greedy
        steps take the argmax; sampled steps draw from the processed draft distribution
        ``q`` (temperature, top-p), with ``rng``.

        Args:
            vocab: the draft head scores only the ``vocab`` most frequent ids (one of
                ``draft_vocab_sizes``); 0: every id.  This default runs the full head only.
            stop_confidence: stop after the first drafted token whose top-1 draft
                probability (of ``q``; greedy: of the softmax at temperature 1) is below
                this, in [0, 1); 0: draft all ``n``.

        Returns:
            ``(ids, q)``: the drafted ids (``k <= n``) and, when sampling, the draft
            distributions in a form this backend's ``verify`` accepts (here float64 numpy
            ``[k, V]``); ``None`` when greedy or ``k == 0``.
        """
        if vocab:
            raise KnapSpecError(f"the {self.name or type(self).__name__} backend drafts with "
                                f"the full head only (draft_vocab {vocab} asked)")
        tokens: list[int] = []
        probs = []
        tok = last
        for _ in range(n):
            logits = self.forward([tok], mask, all_logits=False)[-1]  # [V]
            tok, q, top = draft_token(logits, sampling, rng, stop_confidence > 0)
            if q is not None:
                probs.append(q)
            tokens.append(tok)
            if tok in stop_ids or top < stop_confidence:
                break  # the generation would end here, or the draft is unsure
        return tokens, (np.stack(probs) if probs else None)

    def draft_vocab_sizes(self) -> dict[int, float]:
        """Reduced draft heads this backend can run: ``{K: coverage}``, the share of the
        model's tokens within the top ``K`` ids (measured; ``{}``: the full head only)."""
        return {}

    def verify(
        self,
        last: int,
        drafts: list[int],
        q: Any,
        sampling: SamplingParams,
        rng: np.random.Generator,
        *,
        capture: bool = False,
        accept: int | None = None,
    ) -> tuple[int, int]:
        """Run ``[last, *drafts]`` through the full model and decide how many drafts stand.

        The cache grows by ``len(drafts) + 1`` positions (the caller rolls back to what it
        keeps).  Greedy: the drafts that match the target's argmax, then the target's token
        at the first mismatch (or the bonus token).  Sampling: rejection sampling of the
        drafts against ``q`` (from ``draft``), with ``rng``.  No drafts: one plain step (one
        row, no verification).

        Args:
            capture: keep the full model's hidden states for the block oracle.
            accept: simulated acceptance (timing only): accept exactly
                ``min(accept, len(drafts))`` drafts whatever the target says, and take the
                next token from the target's row at that position (argmax when greedy, a
                sample otherwise).

        Returns:
            ``(n_accepted, next_token)``.
        """
        logits = self.forward([last, *drafts], None, capture=capture)  # [k + 1, V]
        if not drafts:  # a plain step: one token from one row
            return 0, select(logits[0], sampling, rng)
        if accept is not None:
            n = min(int(accept), len(drafts))
            return n, select(logits[n], sampling, rng)
        if sampling.greedy:
            return greedy_verify(np.asarray(drafts, dtype=np.int64), logits)
        p = probabilities(logits, sampling)  # [k + 1, V]
        return rejection_verify(np.asarray(drafts), q, p, rng)

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
