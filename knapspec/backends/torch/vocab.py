"""Reduced-vocabulary draft heads and the draft's confidence, on the backend's device.

A reduced head (FR-Spec, Zhao et al., ACL 2025) scores only the ``K`` most frequent token
ids: its weight is the LM head's rows for those ids, copied once into a contiguous
``[K, D]`` tensor so that a draft step's matrix product reads ``K / V`` of the full
head's bytes.  The draft picks among those ids; verification always runs the full head.

Shapes: ``K`` ids of a reduced head, ``V`` vocabulary, ``D`` hidden size.
"""

from __future__ import annotations

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


def draft_confidence(logits: torch.Tensor, q: torch.Tensor | None = None) -> float:
    """Top-1 probability of a draft step, on the host: of ``q`` ``[1, n]`` (the processed
    sampling distribution) when given, else of the softmax of ``logits`` ``[1, n]``."""
    if q is not None:
        return float(q.max())
    top = logits.max(-1, keepdim=True).values  # [1, 1]
    return float(1.0 / torch.exp(logits - top).sum())


__all__ = ["ReducedHead", "ReducedHeads", "draft_confidence"]
