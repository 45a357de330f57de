"""Plans and the (skip mask, draft length) selection every planner shares.

A planner proposes candidate skip masks with predicted acceptance; ``select_plan`` scores
each candidate for every draft length ``1..max_draft_length`` under the TPT objective,
adds the autoregressive plan (draft length 0), and returns the best.  Because the
autoregressive plan is always a candidate, a returned plan is never predicted slower than
autoregressive decoding, unless the caller forces a draft plan (``force=True``: a fixed mask
and draft length in sweeps, or CLaSp's fixed draft length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..blocks import describe_mask
from ..costmodels.base import CostModel
from ..errors import KnapSpecError
from .knobs import DraftKnobs
from .objective import expected_verify_seconds, stopped_round, verify_seconds


@dataclass(frozen=True)
class CostBreakdown:
    """What a plan's predicted speed is made of (all times in seconds, per the cost model)."""

    context: float  # tokens in the KV cache when planned
    draft_step_seconds: float  # one draft step (1 token) under the skip mask
    # one full-model verification of draft_length + 1 tokens (with a confidence stop: its
    # expectation over the round's length)
    verify_seconds: float
    # expected round: expected_draft_steps * draft_step_seconds + expected verification
    round_seconds: float
    expected_tokens: float  # expected tokens per round, (1 - a^(d+1)) / (1 - a) at tau = 0
    ar_step_seconds: float  # one full-model step of 1 token (the autoregressive baseline)
    attn_skipped_seconds: float  # per draft step, saved by skipped attention blocks
    mlp_skipped_seconds: float  # per draft step, saved by skipped MLP blocks
    mask_switch_seconds: float = 0.0  # one-off cost of moving to this mask (backend-specific)
    draft_head_seconds: float = 0.0  # per draft step, the draft head (reduced or full)
    expected_draft_steps: float = 0.0  # draft steps per round (< d with a confidence stop)


@dataclass(frozen=True)
class DraftPlan:
    """A chosen draft configuration and its predicted performance."""

    mask: np.ndarray  # [2L] bool, True = block skipped while drafting
    draft_length: int  # tokens drafted per round; 0 = plain autoregressive decoding
    alpha: float  # predicted per-token acceptance probability in [0, 1]
    tokens_per_second: float  # predicted tokens per second (TPT)
    cost: CostBreakdown  # the cost figures behind the prediction
    strategy: str = ""  # name of the planner that produced it
    extra: dict[str, Any] = field(default_factory=dict)  # planner-specific diagnostics
    reason: str = ""  # why it drafts nothing, e.g. "no draft pays at context 46 ..." ("" if d>0)
    # drafts even where predicted slower than autoregressive (select_plan(force=True): a
    # fixed draft length); calibration keeps such a plan drafting
    forced: bool = False
    draft_vocab: int = 0  # ids the draft head scores (the most frequent); 0 = full head
    # a round stops after the first draft whose top-1 probability is below this; 0 = never
    stop_confidence: float = 0.0

    @property
    def is_autoregressive(self) -> bool:
        return self.draft_length == 0

    @property
    def n_layers(self) -> int:
        return len(self.mask) // 2

    @property
    def attn_skipped(self) -> int:
        """Number of attention blocks skipped while drafting."""
        return int(np.asarray(self.mask)[0::2].sum())

    @property
    def mlp_skipped(self) -> int:
        """Number of MLP blocks skipped while drafting."""
        return int(np.asarray(self.mask)[1::2].sum())

    @property
    def ar_tokens_per_second(self) -> float:
        return 1.0 / self.cost.ar_step_seconds

    @property
    def speedup(self) -> float:
        """Predicted tokens/s over predicted autoregressive tokens/s."""
        return self.tokens_per_second * self.cost.ar_step_seconds

    def describe(self) -> str:
        return describe_mask(self.mask)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (what ``knapspec plan --json`` prints, plus the mask)."""
        return {
            "context": round(self.cost.context),
            "strategy": self.strategy,
            "attn_skipped": self.attn_skipped,
            "mlp_skipped": self.mlp_skipped,
            "draft_length": int(self.draft_length),
            "draft_vocab": int(self.draft_vocab),
            "stop_confidence": float(self.stop_confidence),
            "expected_draft_steps": float(self.cost.expected_draft_steps),
            "expected_tokens": float(self.cost.expected_tokens),
            "predicted_alpha": float(self.alpha),
            "predicted_tpt": float(self.tokens_per_second),
            "predicted_speedup": float(self.speedup),
            "skipped_blocks": [int(b) for b in np.flatnonzero(self.mask)],
            "draft_step_seconds": self.cost.draft_step_seconds,
            "verify_seconds": self.cost.verify_seconds,
            "ar_step_seconds": self.cost.ar_step_seconds,
            "reason": self.reason,
            "forced": self.forced,
        }


def select_plan(
    masks: np.ndarray | Sequence[np.ndarray],
    alphas: np.ndarray | Sequence[float],
    cost_model: CostModel,
    context: float,
    max_draft_length: int | Sequence[int],
    *,
    strategy: str = "",
    remaining_tokens: int | None = None,
    switch_price: Callable[[np.ndarray], float] | None = None,
    min_gain: float = 0.0,
    force: bool = False,
    knobs: DraftKnobs | None = None,
) -> DraftPlan:
    """Best (mask, draft head, confidence stop, draft length) under the TPT objective, or
    the autoregressive plan.

    Args:
        masks: ``[K, 2L]`` bool candidate skip masks.
        alphas: ``[K]`` predicted acceptance per candidate (with the full draft head), in
            [0, 1].
        cost_model: seconds per block/head/step.
        context: tokens in the KV cache.
        max_draft_length: largest draft length ``d`` considered (>= 1), or the explicit
            sequence of draft lengths to consider.
        remaining_tokens: tokens still to generate; with ``switch_price`` the one-off
            switch cost is amortised over them (a mask that only pays after the generation
            ends is not chosen).
        switch_price: the seconds moving to a mask ``[2L]`` costs (0 for the current one),
            e.g. ``Backend.switch_seconds``; None: switching is free.
        min_gain: a draft plan must beat autoregressive by this relative margin to be chosen.
        force: return the best draft plan even when autoregressive is predicted faster
            (sweeps that force a plan); needs at least one candidate.
        knobs: draft heads and confidence stops to choose from (``knapspec.planner.knobs``);
            None: the full head, no stop.  A head of ``K`` ids scales acceptance by its
            coverage and prices the draft step's head at ``cost_model.draft_head(K)``.
    """
    masks = np.asarray(masks, dtype=bool)
    alphas = np.asarray(alphas, dtype=np.float64)
    if masks.ndim != 2 or alphas.shape != (masks.shape[0],):
        raise KnapSpecError(
            f"masks must be [K, 2L] and alphas [K]; got {masks.shape} and {alphas.shape}"
        )
    d = _draft_lengths(max_draft_length)  # [D]
    if force and masks.shape[0] == 0:
        raise KnapSpecError("force=True needs at least one candidate mask")
    knobs = knobs or DraftKnobs()
    n_layers = masks.shape[1] // 2
    # verification of j drafts (j + 1 tokens) does not depend on the mask: [J]
    verify_j = np.array([verify_seconds(cost_model, n_layers, context, j)
                         for j in range(1, int(d.max()) + 1)])
    ar_step = verify_seconds(cost_model, n_layers, context, 0)  # one plain step
    block = cost_model.block_costs(n_layers, context, 1)  # [2L]
    heads = knobs.heads
    head_s = np.array([h.seconds if h.seconds is not None else cost_model.draft_head(h.vocab)
                       for h in heads])  # [H]
    cover = np.array([h.coverage for h in heads])  # [H]
    taus = np.array(knobs.thresholds)  # [T]
    kept = (block[None, :] * ~masks).sum(axis=1)  # [K]
    draft = cost_model.overhead(1) + kept[:, None] + head_s[None, :]  # [K, H]
    alpha = np.clip(alphas, 0.0, 1.0)[:, None] * cover[None, :]  # [K, H]
    if knobs.confidence is not None:
        s, alpha_hi = knobs.confidence.stop_stats(alpha[:, :, None], taus[None, None, :])
    else:  # no stop: every step goes on
        s, alpha_hi = np.ones((*alpha.shape, 1)), alpha[:, :, None]  # [K, H, 1]
    s = np.broadcast_to(s, (*alpha.shape, len(taus)))  # [K, H, T]
    tokens, steps = stopped_round(alpha[:, :, None, None], s[..., None],
                                  alpha_hi[..., None], d)  # [K, H, T, D]
    verify = expected_verify_seconds(s, verify_j, d)  # [K, H, T, D]
    rounds = steps * draft[:, :, None, None] + verify  # [K, H, T, D]
    tpt = tokens / rounds  # [K, H, T, D]
    ar_tpt = 1.0 / ar_step
    switch = np.zeros(len(masks))
    if switch_price is not None:
        # a switch only lowers a candidate's rate: price just the ones that could still win
        # (asking a backend is not free: llama.cpp looks its draft files up)
        best_k = tpt.reshape(len(masks), -1).max(axis=1, initial=0.0)
        live = np.ones(len(masks), dtype=bool) if force else best_k > ar_tpt * (1.0 + min_gain)
        switch[live] = [float(switch_price(m)) for m in masks[live]]
        if remaining_tokens is not None and remaining_tokens > 0:
            # effective rate over the rest of the generation, switch cost included
            sw = switch[:, None, None, None]
            tpt = remaining_tokens / (remaining_tokens / tpt + sw)
    best = np.unravel_index(np.argmax(tpt), tpt.shape) if tpt.size else None
    if best is None or not (force or tpt[best] > ar_tpt * (1.0 + min_gain)):
        return _autoregressive_plan(n_layers, context, ar_step, strategy,
                                    _plain_reason(masks.shape[0], cost_model, context))
    k, h, t, j = (int(i) for i in best)
    mask = masks[k].copy()
    cost = CostBreakdown(
        context=float(context),
        draft_step_seconds=float(draft[k, h]),
        verify_seconds=float(verify[k, h, t, j]),
        round_seconds=float(rounds[k, h, t, j]),
        expected_tokens=float(tokens[k, h, t, j]),
        ar_step_seconds=ar_step,
        attn_skipped_seconds=float(block[0::2][mask[0::2]].sum()),
        mlp_skipped_seconds=float(block[1::2][mask[1::2]].sum()),
        mask_switch_seconds=float(switch[k]),
        draft_head_seconds=float(head_s[h]),
        expected_draft_steps=float(steps[k, h, t, j]),
    )
    return DraftPlan(
        mask=mask,
        draft_length=int(d[j]),
        alpha=float(alpha[k, h]),
        tokens_per_second=float(tpt[k, h, t, j]),
        cost=cost,
        strategy=strategy,
        forced=force,
        draft_vocab=int(heads[h].vocab),
        stop_confidence=float(taus[t]),
    )


def _draft_lengths(max_draft_length: int | Sequence[int]) -> np.ndarray:
    """``[D]`` draft lengths to consider: ``1..max_draft_length``, or the given ones."""
    if np.ndim(max_draft_length) == 0:
        d = np.arange(1, int(max_draft_length) + 1)
    else:
        d = np.asarray(max_draft_length, dtype=np.int64)
    if d.size == 0 or d.min() < 1:
        raise KnapSpecError(f"draft lengths must be >= 1, got {max_draft_length!r}")
    return d


def _autoregressive_plan(
    n_layers: int, context: float, ar_step: float, strategy: str, reason: str
) -> DraftPlan:
    """The plain-decoding plan: one full step (``ar_step`` seconds) per token."""
    cost = CostBreakdown(
        context=float(context),
        draft_step_seconds=ar_step,
        verify_seconds=ar_step,
        round_seconds=ar_step,
        expected_tokens=1.0,
        ar_step_seconds=ar_step,
        attn_skipped_seconds=0.0,
        mlp_skipped_seconds=0.0,
    )
    return DraftPlan(
        mask=np.zeros(2 * n_layers, dtype=bool),
        draft_length=0,
        alpha=1.0,
        tokens_per_second=1.0 / ar_step,
        cost=cost,
        strategy=strategy,
        reason=reason,
    )


def _plain_reason(candidates: int, cost_model: CostModel, context: float) -> str:
    """Why ``select_plan`` returned the autoregressive plan, in words."""
    if candidates == 0:
        return f"the planner proposed no draft at context {context:.0f}"
    where = ("on the measured profile" if cost_model.kind == "table"
             else f"on the {cost_model.kind} cost model")
    return f"no draft pays at context {context:.0f} {where}"
