"""Model-in-the-loop planners: KnapSpec's parallel dynamic program and its baselines.

All of them read the full model's hidden states at every block boundary for the last
verified tokens through a ``BlockOracle`` (``[2L + 1, T, D]``) and run candidate states
through single blocks in batches.

KnapSpec (Cha et al., 2026): blocks are processed in order; a DP state is
``(block, skipped cost)`` with integer costs from the context-dependent cost model.  From
every state the block is either kept (all kept states of the block go through it in ONE
batched call) or skipped (cost grows by the block's weight).  Where several candidates reach
the same ``(block, cost)``, the one whose hidden state is most similar (mean cosine over
the ``T`` tokens) to the full model's state at that boundary survives.  At the end each
surviving budget's final states are turned into logits; its acceptance alpha is estimated
from the agreement with the full model's logits; the (budget, draft length) pair with the
highest tokens per second wins (``select_plan``).

Baselines on the same machinery:

* ``ClaspPlanner`` (CLaSp style): whole layers, a fixed number of skipped layers, the same
  cosine DP, no cost model in the choice of layers; fixed draft length.
* ``EarlyExitPlanner`` (LayerSkip style): drop the last ``k`` layers; ``k`` and the draft
  length chosen by TPT from alphas measured at every exit.
* ``OracleAdditivePlanner``: the additive planner fed by per-block scores measured with the
  oracle (skip each block alone, one batched pass).
* ``StaticSearchPlanner`` (Draft & Verify style): searches once with KnapSpec's DP at the
  first plan, then keeps that mask and draft length.

Shapes: ``S`` candidate states, ``T`` tokens, ``D`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..blocks import BlockLayout
from ..costmodels.base import CostModel
from ..errors import KnapSpecError
from ..oracle import BlockOracle, agreement, concat, similarity
from .plan import DraftPlan, select_plan
from .planners import AdditivePlanner, AutoregressivePlanner, PlanContext, Planner

log = logging.getLogger(__name__)


def group_dp(
    oracle: BlockOracle,
    groups: Sequence[Sequence[int]],
    costs: Sequence[float],
    skippable: Sequence[bool],
    bucket: float | None,
    max_skipped: float,
    max_states: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parallel DP over groups of consecutive blocks (a block, or a layer's two blocks).

    Skipped costs accumulate exactly.  States are merged in one of two ways:

    * ``bucket`` given: a state is (group, skipped-cost bucket of width ``bucket``); within a
      bucket the candidate most similar to the full model survives.  Integer ``costs`` with
      ``bucket = 1`` give the exact (group, skipped cost) DP (used for CLaSp's layer counts).
    * ``bucket=None``: the Pareto front of (skipped cost, similarity) survives -- for every
      skipped cost, the most faithful candidate, as in the paper -- thinned to at most
      ``max_states`` states spread evenly along the front.  Unlike coarse buckets, a block
      cheaper than a bucket can still be skipped.

    Args:
        groups: consecutive block indices per group, in model order, covering all blocks.
        costs: skipped cost of each group (seconds, or units).
        skippable: whether each group may be skipped.
        bucket: width of a skipped-cost state (> 0), or None for Pareto merging.
        max_skipped: largest total skipped cost tracked.
        max_states: with ``bucket=None``, most states kept per step.
    Returns:
        ``skipped [K]`` (skipped cost of each surviving state), ``masks [K, 2L]`` and the
        final states ``[K, T, D]``.
    """
    if bucket is not None and bucket <= 0:
        raise KnapSpecError(f"bucket must be > 0, got {bucket}")
    full = oracle.boundary_states()  # [2L + 1, T, D], on the oracle's device
    n_blocks = full.shape[0] - 1
    states = full[:1]  # [S, T, D], S = 1: the embeddings (the oracle's kind throughout)
    skipped = np.zeros(1)  # [S] skipped cost so far
    masks = np.zeros((1, n_blocks), dtype=bool)  # [S, 2L]
    for group, w, can_skip in zip(groups, costs, skippable, strict=True):
        kept = states
        for b in group:  # keep: every state through the group's blocks, one batched call
            kept = oracle.apply_block(b, kept)
        cand_states, cand_skipped, cand_masks = [kept], [skipped], [masks]
        if can_skip:
            ok = skipped + w <= max_skipped * (1 + 1e-9)
            if ok.any():
                skip_masks = masks[ok].copy()
                skip_masks[:, list(group)] = True
                cand_states.append(states[ok])
                cand_skipped.append(skipped[ok] + w)
                cand_masks.append(skip_masks)
        all_states = concat(oracle, cand_states)  # [S', T, D]
        all_skipped = np.concatenate(cand_skipped)  # [S']
        all_masks = np.concatenate(cand_masks)  # [S', 2L]
        sim = similarity(oracle, all_states, group[-1] + 1, full)  # [S'] on the host
        pick = (_bucket_pick(all_skipped, sim, bucket) if bucket is not None
                else _pareto_pick(all_skipped, sim, max_states))
        states, skipped, masks = all_states[pick], all_skipped[pick], all_masks[pick]
    return skipped, masks, states


def _bucket_pick(skipped: np.ndarray, sim: np.ndarray, bucket: float) -> np.ndarray:
    """Indices of the most similar candidate per skipped-cost bucket (ties: first)."""
    key = np.floor(skipped / bucket + 1e-9).astype(np.int64)  # [S'] state index
    order = np.lexsort((-sim, key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    return order[first]


def _pareto_pick(skipped: np.ndarray, sim: np.ndarray, max_states: int | None) -> np.ndarray:
    """Indices of the Pareto front (more skipped cost, more similar), thinned to ``max_states``."""
    order = np.lexsort((-sim, -skipped))  # most skipped first, then most similar
    front, best = [], -np.inf
    for i in order:
        if sim[i] > best:  # nothing that skips as much or more is as similar
            front.append(i)
            best = sim[i]
    front_arr = np.array(front[::-1])  # ascending skipped cost; index 0 = least skipped
    if max_states is not None and len(front_arr) > max_states:
        keep = np.unique(np.rint(np.linspace(0, len(front_arr) - 1, max_states)).astype(int))
        front_arr = front_arr[keep]
    return front_arr


class KnapSpecPlanner(Planner):
    """The paper's planner: cost-aware parallel DP over decoupled attention/MLP blocks.

    Running the DP costs about a prefill of ``S * T`` tokens (``S <= resolution + 1`` states
    on the Pareto front of skipped cost and similarity).  To
    keep that off the hot path, the DP is re-run only when the context has grown by
    ``rerun_growth`` (relative) since the last run; in between, the surviving candidates
    (masks and alphas) are re-scored by TPT with the cost model at the current context,
    which is what changes fastest.  Before searching, a prior (the additive planner on a
    fidelity profile, no model calls) must predict that some draft pays back the search;
    otherwise the planner decodes plainly.  It waits for ``min_generated`` generated tokens
    so the oracle's window holds generated text rather than the chat template.  On a
    backend without block access (no oracle after ``min_generated`` tokens, e.g. llama.cpp)
    it plans with the prior alone.
    """

    name = "knapspec"
    needs_oracle = True

    def __init__(
        self,
        layout: BlockLayout,
        cost_model: CostModel,
        max_draft_length: int = 8,
        resolution: int = 12,
        proxy: str = "top1",
        rerun_growth: float = 1.0,
        min_generated: int = 8,
        prior_scores: np.ndarray | None = None,
    ) -> None:
        if resolution < 1:
            raise KnapSpecError(f"resolution must be >= 1, got {resolution}")
        if rerun_growth < 0:
            raise KnapSpecError(f"rerun_growth must be >= 0, got {rerun_growth}")
        self.layout = layout
        self.cost_model = cost_model
        self.max_draft_length = int(max_draft_length)
        self.resolution = int(resolution)
        self.proxy = proxy
        self.rerun_growth = float(rerun_growth)
        self._candidates: tuple[np.ndarray, np.ndarray] | None = None
        self._dp_context = -1
        self.dp_runs = 0  # how many times the DP ran (diagnostics)
        self.min_generated = int(min_generated)
        if prior_scores is None:
            from .fidelity import default_block_scores

            prior_scores = default_block_scores(layout.n_layers)
        self._prior = AdditivePlanner(layout, cost_model, prior_scores,
                                      max_draft_length=self.max_draft_length)
        self._prior_at: tuple[float, DraftPlan] | None = None  # (context, prior's plan)

    def reset(self) -> None:
        """Forget candidates (a new generation starts)."""
        self._candidates = None
        self._dp_context = -1

    def _prior_plan(self, context: float) -> DraftPlan:
        """The prior's plan at ``context`` (no model calls; the last one is kept)."""
        if self._prior_at is None or self._prior_at[0] != context:
            self._prior_at = (context, self._prior.plan(PlanContext(context=int(context))))
        return self._prior_at[1]

    def wants_oracle(self, context: int) -> bool:
        """False where the prior (the cost-model gate of ``worth_searching``) predicts that no
        draft pays at ``context``: the search would not run, so nothing needs capturing."""
        return self.needs_oracle and not self._prior_plan(context).is_autoregressive

    def warmup(self) -> float:
        """Load the knapsack kernels the prior runs (the DP itself is numpy); seconds spent."""
        return self._prior.warmup()

    @staticmethod
    def _oracle_tokens(oracle: BlockOracle) -> int:
        return int(oracle.boundary_states().shape[1])

    def candidates(self, oracle: BlockOracle, context: float) -> tuple[np.ndarray, np.ndarray]:
        """Run the DP: masks ``[K, 2L]`` and alphas ``[K]`` (one per surviving budget)."""
        n_blocks = self.layout.n_blocks
        costs = self.cost_model.block_costs(self.layout.n_layers, context, 1)  # [2L] s
        skippable = self.layout.skippable
        total = float(costs[skippable].sum())
        groups = [(b,) for b in range(n_blocks)]
        _, masks, states = group_dp(
            oracle, groups, costs, skippable, None, total, max_states=self.resolution + 1
        )
        return self._score(oracle, masks, states)

    def _score(
        self, oracle: BlockOracle, masks: np.ndarray, states: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Drafting masks ``[K, 2L]`` among ``masks`` and their acceptance ``[K]`` from the
        agreement of their final ``states`` ``[S, T, D]`` (oracle's kind) with the full model."""
        drafting = masks.any(axis=1)  # the all-kept state is plain decoding
        masks, states = masks[drafting], states[drafting]
        if len(masks) == 0:
            return masks, np.zeros(0)
        return masks, agreement(oracle, states, self.proxy)

    def worth_searching(self, ctx: PlanContext) -> bool:
        """Can a draft beat autoregressive by more than the search costs?

        The prior is the additive planner on the prior fidelity profile (no model calls):
        its best plan's predicted gain over the remaining tokens must exceed the search cost,
        about one forward of ``S * T`` tokens (``S = resolution + 1`` states, ``T`` the
        oracle's tokens), priced by the cost model.  Without a known number of remaining
        tokens only the prior counts.  The oracle is read only when the prior pays.
        """
        best = self._prior_plan(ctx.context)
        if best.is_autoregressive:
            return False
        if ctx.remaining_tokens is None or ctx.oracle is None:
            return True
        tokens = self._oracle_tokens(ctx.oracle)
        saved = ctx.remaining_tokens * (1.0 / best.ar_tokens_per_second
                                        - 1.0 / best.tokens_per_second)
        search = self.cost_model.full_step_seconds(
            self.layout.n_layers, ctx.context, (self.resolution + 1) * tokens
        )
        return saved > search

    def plan(self, ctx: PlanContext) -> DraftPlan:
        if ctx.generated < self.min_generated and self._candidates is None:
            # the captured window still holds prompt/template tokens: wait for real ones
            return AutoregressivePlanner(self.layout, self.cost_model).plan(ctx)
        if ctx.oracle is None and self._candidates is None:
            # the backend gives no block access (llama.cpp): the same knapsack over the
            # same cost model, with the prior fidelity profile as the value side
            plan = self._prior.plan(ctx)
            return replace(plan, strategy=self.name, extra={**plan.extra, "fidelity": "prior"})
        grown = ctx.context >= self._dp_context * (1.0 + self.rerun_growth)
        if (ctx.oracle is not None and (self._candidates is None or grown)
                and not self.worth_searching(ctx)):
            log.info("%s: no draft can pay at context %d; decoding plainly", self.name,
                     ctx.context)
            self._dp_context = ctx.context
            return AutoregressivePlanner(self.layout, self.cost_model).plan(ctx)
        if ctx.oracle is not None and (self._candidates is None or grown):
            self._candidates = self.candidates(ctx.oracle, ctx.context)
            self._dp_context = ctx.context
            self.dp_runs += 1
        if self._candidates is None:
            return AutoregressivePlanner(self.layout, self.cost_model).plan(ctx)
        masks, alphas = self._candidates
        plan = select_plan(
            masks, alphas, self.cost_model, ctx.context, self.max_draft_length,
            strategy=self.name, remaining_tokens=ctx.remaining_tokens,
            switch_price=ctx.switch_price, knobs=self.knobs,
        )
        return plan


class ClaspPlanner(KnapSpecPlanner):
    """CLaSp style: skip exactly ``n_skip_layers`` whole layers chosen by the cosine DP.

    No cost model in the choice of layers and a fixed draft length, as in CLaSp; the cost
    model is only used to report predicted speed.  Re-runs the DP at every plan.
    """

    name = "clasp"

    def __init__(
        self,
        layout: BlockLayout,
        cost_model: CostModel,
        n_skip_layers: int | None = None,
        draft_length: int = 4,
        proxy: str = "top1",
    ) -> None:
        super().__init__(layout, cost_model, max_draft_length=draft_length, proxy=proxy,
                         rerun_growth=0.0)
        free_layers = [i for i in range(layout.n_layers)
                       if layout.skippable[2 * i] and layout.skippable[2 * i + 1]]
        self.n_skip_layers = (len(free_layers) // 2 if n_skip_layers is None
                              else int(n_skip_layers))
        if not 0 < self.n_skip_layers <= len(free_layers):
            raise KnapSpecError(
                f"n_skip_layers must lie in [1, {len(free_layers)}], got {n_skip_layers}"
            )
        self.draft_length = int(draft_length)

    def wants_oracle(self, context: int) -> bool:
        """CLaSp has no cost-model gate: it searches at every plan."""
        return self.needs_oracle

    def warmup(self) -> float:
        """Nothing to prepare: CLaSp's search is numpy and it consults no prior."""
        return 0.0

    def candidates(self, oracle: BlockOracle, context: float) -> tuple[np.ndarray, np.ndarray]:
        lay = self.layout
        groups = [(2 * i, 2 * i + 1) for i in range(lay.n_layers)]
        skippable = [bool(lay.skippable[2 * i] and lay.skippable[2 * i + 1])
                     for i in range(lay.n_layers)]
        skipped, masks, states = group_dp(
            oracle, groups, [1.0] * lay.n_layers, skippable, 1.0, self.n_skip_layers
        )
        pick = np.rint(skipped) == self.n_skip_layers
        return self._score(oracle, masks[pick], states[pick])

    def plan(self, ctx: PlanContext) -> DraftPlan:
        if ctx.oracle is not None and ctx.generated >= self.min_generated:
            self._candidates = self.candidates(ctx.oracle, ctx.context)
            self.dp_runs += 1
        if self._candidates is None or len(self._candidates[0]) == 0:
            return AutoregressivePlanner(self.layout, self.cost_model).plan(ctx)
        masks, alphas = self._candidates
        return select_plan(masks, alphas, self.cost_model, ctx.context, [self.draft_length],
                           strategy=self.name, force=True, knobs=self.knobs)


class EarlyExitPlanner(Planner):
    """LayerSkip style: draft with the first ``L - k`` layers; ``k`` and ``d`` chosen by TPT.

    Alpha for every exit is measured with the oracle (the full model's state after layer
    ``L - k - 1`` through the final norm and head).  Uses an unpinned layout: the last
    layers are exactly what early exit drops.
    """

    name = "early-exit"
    needs_oracle = True

    def __init__(
        self, layout: BlockLayout, cost_model: CostModel, max_draft_length: int = 8,
        proxy: str = "top1", min_layers: int = 2, min_generated: int = 8,
    ) -> None:
        self.layout = layout
        self.min_generated = int(min_generated)
        self._measured_at = 0  # context of the last measurement (re-measured when doubled)
        self.cost_model = cost_model
        self.max_draft_length = int(max_draft_length)
        self.proxy = proxy
        self.min_layers = int(min_layers)
        self._candidates: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        self._candidates = None
        self._measured_at = 0

    def plan(self, ctx: PlanContext) -> DraftPlan:
        L = self.layout.n_layers
        stale = self._candidates is None or ctx.context >= 2 * self._measured_at
        if ctx.oracle is not None and ctx.generated >= self.min_generated and stale:
            self._measured_at = ctx.context
            full = ctx.oracle.boundary_states()  # [2L + 1, T, D]
            exits = list(range(self.min_layers, L))  # layers kept
            states = full[np.array([2 * m for m in exits], dtype=np.int64)]  # [E, T, D]
            alphas = agreement(ctx.oracle, states, self.proxy, full)
            masks = np.zeros((len(exits), 2 * L), dtype=bool)
            for r, m in enumerate(exits):
                masks[r, 2 * m:] = True
            self._candidates = (masks, alphas)
        if self._candidates is None:
            return AutoregressivePlanner(self.layout, self.cost_model).plan(ctx)
        return select_plan(*self._candidates, self.cost_model, ctx.context,
                           self.max_draft_length, strategy=self.name, knobs=self.knobs)


def masked_final_states(oracle: BlockOracle, masks: np.ndarray) -> Any:
    """Final states ``[K, T, D]`` (the oracle's kind: a tensor on its device, or numpy) of
    ``K`` skip masks ``[K, 2L]``, all in one batched pass."""
    masks = np.asarray(masks, dtype=bool)
    full = oracle.boundary_states()  # [2L + 1, T, D]
    states = concat(oracle, [full[:1]] * len(masks))  # [K, T, D], a fresh batch
    for b in range(full.shape[0] - 1):
        run = ~masks[:, b]
        if run.any():
            states[run] = oracle.apply_block(b, states[run])
    return states


def mask_alphas(oracle: BlockOracle, masks: np.ndarray, proxy: str = "top1") -> np.ndarray:
    """Acceptance ``[K]`` of each mask from its logits' agreement with the full model."""
    return agreement(oracle, masked_final_states(oracle, masks), proxy)


def oracle_block_scores(oracle: BlockOracle) -> np.ndarray:
    """``[2L]`` fidelity loss ``1 - cos`` of the final state when each block alone is skipped.

    One batched pass: candidate ``s`` skips block ``s``; all ``2L`` candidates go through
    every block together.
    """
    full = oracle.boundary_states()  # [2L + 1, T, D]
    n_blocks = full.shape[0] - 1
    states = masked_final_states(oracle, np.eye(n_blocks, dtype=bool))
    return 1.0 - similarity(oracle, states, n_blocks, full)


class OracleAdditivePlanner(AdditivePlanner):
    """Strategy ``additive``: the additive planner with per-block scores measured through the
    oracle on the current context (until then, and without block access, the prior
    profile).  Its plans say which in ``extra["fidelity"]``: ``"measured"`` or ``"prior"``.
    """

    name = "additive"
    needs_oracle = True

    def __init__(
        self, layout: BlockLayout, cost_model: CostModel, rerun_growth: float = 1.0,
        min_generated: int = 8, **kwargs: Any,
    ) -> None:
        from .fidelity import default_block_scores

        super().__init__(layout, cost_model, default_block_scores(layout.n_layers), **kwargs)
        self.rerun_growth = float(rerun_growth)
        self.min_generated = int(min_generated)
        self._measured_context = -1
        self._measured = False  # scores come from the oracle (not the prior profile)

    def reset(self) -> None:
        self._measured_context = -1

    def wants_oracle(self, context: int) -> bool:
        """False where the plan from the current scores (the cost-model gate of
        ``_worth_measuring``) drafts nothing at ``context``: no measurement would run."""
        prior = super().plan(PlanContext(context=context))
        return self.needs_oracle and not prior.is_autoregressive

    def plan(self, ctx: PlanContext) -> DraftPlan:
        grown = ctx.context >= self._measured_context * (1.0 + self.rerun_growth)
        ready = ctx.oracle is not None and ctx.generated >= self.min_generated
        if ready and (self._measured_context < 0 or grown):
            self._measured_context = ctx.context
            if self._worth_measuring(ctx):
                self.update_scores(oracle_block_scores(ctx.oracle))
                self._measured = True
        plan = super().plan(ctx)
        fidelity = "measured" if self._measured else "prior"
        return replace(plan, extra={**plan.extra, "fidelity": fidelity})

    def _worth_measuring(self, ctx: PlanContext) -> bool:
        """Measuring costs about a forward of ``2L * T`` tokens; only pay it when the plan
        from the current (prior) scores predicts a larger saving over the tokens left."""
        prior = super().plan(PlanContext(context=ctx.context))
        if prior.is_autoregressive:
            return False
        if ctx.remaining_tokens is None:
            return True
        tokens = int(ctx.oracle.boundary_states().shape[1])
        saved = ctx.remaining_tokens * (1.0 / prior.ar_tokens_per_second
                                        - 1.0 / prior.tokens_per_second)
        cost = self.cost_model.full_step_seconds(self.layout.n_layers, ctx.context,
                                                 self.layout.n_blocks * tokens)
        return saved > cost


class StaticSearchPlanner(Planner):
    """Draft & Verify style: one search (KnapSpec's DP) at the first plan, then fixed."""

    name = "static"
    needs_oracle = True

    def __init__(self, layout: BlockLayout, cost_model: CostModel, **kwargs: Any) -> None:
        self.inner = KnapSpecPlanner(layout, cost_model, **kwargs)
        self.fixed: DraftPlan | None = None

    def reset(self) -> None:
        self.inner.reset()
        self.fixed = None
        self.needs_oracle = True

    def wants_oracle(self, context: int) -> bool:
        """Only until the one search has run, and only where its gate lets it run."""
        return self.fixed is None and self.inner.wants_oracle(context)

    def warmup(self) -> float:
        """What the one search needs (KnapSpec's prior); seconds spent."""
        return self.inner.warmup()

    def plan(self, ctx: PlanContext) -> DraftPlan:
        if self.fixed is not None:
            return self.fixed
        plan = self.inner.plan(ctx)
        if ctx.oracle is not None and ctx.generated >= self.inner.min_generated:
            self.fixed = plan  # searched once: keep it for the rest of the generation
            self.needs_oracle = False
        return plan


__all__ = [
    "ClaspPlanner",
    "EarlyExitPlanner",
    "KnapSpecPlanner",
    "OracleAdditivePlanner",
    "StaticSearchPlanner",
    "group_dp",
    "oracle_block_scores",
]
