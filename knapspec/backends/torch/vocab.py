"""Reduced-vocabulary draft heads and the draft's confidence, on the backend's device.

A reduced head (FR-Spec, Zhao et al., ACL 2025) scores only the ``K`` most frequent token
ids: its weight is the LM head's rows for those ids, copied once into a contiguous
``[K, D]`` tensor so that a draft step's matrix product reads ``K / V`` of the full
head's bytes.  The draft picks among those ids; verification always runs the full head.

Shapes: ``K`` ids of a reduced head, ``V`` vocabulary, ``D`` hidden size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...draft_vocab import VocabRanking
from ...errors import KnapSpecError


@dataclass(frozen=True)
class ReducedHead:
    """The LM head restricted to ``K`` token ids."""

    w: torch.Tensor  # [K, D] the head's rows for ``ids`` (contiguous, on the device)
    b: torch.Tensor | None  # [K] the head's bias for ``ids``, or None
    ids: torch.Tensor  # [K] long token ids of the full vocabulary, most frequent first
    vocab_size: int  # V, the full head's rows

    @classmethod
    def from_head(cls, w_out: torch.Tensor, b_out: torch.Tensor | None, ids: torch.Tensor
                  ) -> ReducedHead:
        """The rows ``ids`` ``[K]`` of the head ``w_out`` ``[V, D]`` (and bias ``[V]``)."""
        ids = ids.to(device=w_out.device, dtype=torch.long)
        with torch.inference_mode():
            w = w_out.index_select(0, ids).contiguous()  # [K, D]
            b = None if b_out is None else b_out.index_select(0, ids).contiguous()  # [K]
        return cls(w, b, ids, int(w_out.shape[0]))

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def scatter(self, q: torch.Tensor) -> torch.Tensor:
        """Probabilities over the head's ids ``[n, K]`` as full-vocabulary rows ``[n, V]``
        (zero elsewhere): the draft distribution rejection sampling needs."""
        out = torch.zeros((q.shape[0], self.vocab_size), dtype=q.dtype, device=q.device)
        return out.index_copy_(1, self.ids, q)


class ReducedHeads:
    """Mixin of the torch backends: reduced draft heads over ``out_w`` / ``out_b``, from
    the token ranking in ``vocab_ranking`` (``knapspec.draft_vocab``; None: none)."""

    vocab_ranking: VocabRanking | None
    out_w: torch.Tensor  # [V, D]
    out_b: torch.Tensor | None  # [V]
    _heads: dict[int, ReducedHead]  # K -> reduced draft head, made when first used
    # read by the timers: hidden size, parameter dtype and device, the final norm
    dim: int
    dtype: torch.dtype
    device: torch.device
    norm_w: torch.Tensor  # [D]
    norm_eps: float
    _norm_fn: Callable[..., torch.Tensor]  # rms_norm, or the backend's compiled version
    _head_fn: Callable[..., torch.Tensor]  # lm_head, or the backend's compiled version
    synchronize: Callable[[], None]  # waits for the work queued on the device

    def draft_vocab_sizes(self) -> dict[int, float]:
        """``{K: coverage}`` of the reduced draft heads (``Backend.draft_vocab_sizes``),
        from this tokenizer's token ranking; ``{}``: none."""
        ranking = self.vocab_ranking
        return {} if ranking is None else ranking.sizes()

    def _reduced_head(self, vocab: int) -> ReducedHead:
        """The draft head over the top ``vocab`` ids, made once per size."""
        head = self._heads.get(int(vocab))
        if head is None:
            sizes = self.draft_vocab_sizes()
            if int(vocab) not in sizes:
                raise KnapSpecError(
                    f"draft_vocab {vocab}: this backend's reduced heads are "
                    f"{sorted(sizes) or 'none (no token ranking for this tokenizer)'}")
            ids = torch.as_tensor(self.vocab_ranking.top(int(vocab)))  # [K]
            head = self._heads[int(vocab)] = ReducedHead.from_head(self.out_w, self.out_b, ids)
        return head

    # ------------------------------------------------------------------ measurement
    def time_draft_head(self, vocab: int, repeats: int) -> float:
        """Median seconds of a draft step's head on one state: the final norm and the head
        over the top ``vocab`` ids (0: the full head), through the same norm and linear as
        ``_draft_step`` (compiled, prepacked where the backend is), device work included."""
        if not vocab:
            return self._time_norm_head(1, repeats, self.out_w, self.out_b)
        made = int(vocab) not in self._heads
        head = self._reduced_head(vocab)
        try:
            return self._time_norm_head(1, repeats, head.w, head.b)
        finally:
            if made:  # made only to be timed: its [K, D] copy is not kept
                self._drop_head(int(vocab))

    def _drop_head(self, vocab: int) -> None:
        """Forget the reduced head of ``vocab`` ids (made again when next used)."""
        self._heads.pop(vocab, None)

    def _time_norm_head(self, n_tokens: int, repeats: int, w: torch.Tensor,
                        b: torch.Tensor | None) -> float:
        """Median seconds of ``_norm_fn`` then ``_head_fn`` over ``w`` ``[N, D]`` on
        ``n_tokens`` random states, after one warm-up call (synchronised before and after
        each call)."""
        if n_tokens < 1 or repeats < 1:
            raise KnapSpecError(f"n_tokens and repeats must be >= 1, got {n_tokens}, {repeats}")
        with torch.inference_mode():
            x = torch.randn(n_tokens, self.dim, generator=torch.Generator().manual_seed(0))
            x = x.to(self.device, self.dtype)  # [n, D]

            def call() -> torch.Tensor:
                return self._head_fn(self._norm_fn(x, self.norm_w, self.norm_eps), w, b)

            call()  # warm-up
            times = []
            for _ in range(repeats):
                self.synchronize()
                t0 = time.perf_counter()
                call()
                self.synchronize()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def draft_confidence(logits: torch.Tensor, q: torch.Tensor | None = None) -> float:
    """Top-1 probability of a draft step, on the host: of ``q`` ``[1, n]`` (the processed
    sampling distribution) when given, else of the softmax of ``logits`` ``[1, n]``."""
    if q is not None:
        return float(q.max())
    top = logits.max(-1, keepdim=True).values  # [1, 1]
    return float(1.0 / torch.exp(logits - top).sum())


__all__ = ["ReducedHead", "ReducedHeads", "draft_confidence"]
