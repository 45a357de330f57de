"""Planners: decide, at the current context length, which blocks to skip and how far to draft.

``Planner.plan(PlanContext) -> DraftPlan``.  This module holds the backend-free planners:

* ``AutoregressivePlanner``: never drafts.
* ``StaticPlanner``: a fixed skip mask (and optionally a fixed draft length).
* ``AdditivePlanner``: KnapSpec with additive per-block fidelity scores; a knapsack frontier
  over the blocks to keep, for every kept-cost budget, then TPT over (budget, draft length).

The model-in-the-loop planners (``oracle_planners``) run blocks on hidden states through a
backend's ``BlockOracle`` (``knapspec.oracle``), which ``PlanContext.oracle`` carries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..blocks import BlockLayout
from ..costmodels.base import CostModel
from ..costmodels.specs import DecoderSpec, get_model_spec
from ..errors import KnapSpecError
from ..oracle import BlockOracle
from . import solvers
from .fidelity import default_block_scores, default_scores_for_spec
from .knobs import DraftKnobs
from .plan import DraftPlan, select_plan
from .proxies import CosineProxy
from .solvers import knapsack_frontier


@dataclass
class PlanContext:
    """What a planner knows when asked for a plan."""

    context: int  # tokens currently in the KV cache
    remaining_tokens: int | None = None  # tokens still to generate (None: unknown)
    current_mask: np.ndarray | None = None  # [2L] bool mask in use now (None: none yet)
    # seconds a move to a mask [2L] would cost, e.g. ``Backend.switch_seconds`` (None: free)
    switch_price: Callable[[np.ndarray], float] | None = None
    oracle: BlockOracle | None = None  # backend access for model-in-the-loop planners
    generated: int = 0  # tokens generated so far in this generation


class Planner(ABC):
    """Chooses a ``DraftPlan`` for a context; stateless unless documented otherwise."""

    name: str = ""
    needs_oracle: bool = False  # True: wants PlanContext.oracle (backend block access)
    # draft heads and confidence stops the plans may use, passed to ``select_plan``
    # (``make_planner`` sets them from the backend; None: the full head, no stop)
    knobs: DraftKnobs | None = None

    @abstractmethod
    def plan(self, ctx: PlanContext) -> DraftPlan:
        """The plan to use from now on."""

    def reset(self) -> None:  # noqa: B027 - optional hook, stateless planners keep the default
        """Forget per-generation state; called when a generation starts."""

    def wants_oracle(self, context: int) -> bool:
        """Whether a plan at ``context`` (tokens in the KV cache) may read ``PlanContext.oracle``.

        The decoder asks before the forwards whose hidden states an oracle would read, and
        captures them only when this is True.  The default is ``needs_oracle``; planners with
        a cheap cost-model gate say False where that gate rules every draft out.
        """
        return self.needs_oracle

    def observe(self, plan: DraftPlan, drafted: int, accepted: int) -> bool:
        """Report one drafting round run under ``plan``: ``drafted`` tokens proposed (>= 1),
        the first ``accepted`` of them kept by verification (0 <= accepted <= drafted).

        Any decoding loop calls this after each round that drafted.  Returns True when the
        loop should re-plan before its next round (what was observed parted from what
        ``plan`` predicted); the default ignores the report and returns False.  Planners
        built by ``make_planner`` are wrapped in ``CalibratedPlanner``, which learns from it.
        """
        return False

    def acceptance(self, plan: DraftPlan) -> float:
        """The current estimate of ``plan``'s per-token acceptance in [0, 1] (the default:
        the alpha it was made with; a calibrating planner says what it has learned)."""
        return plan.alpha

    def warmup(self) -> float:
        """Prepare what the first plan would otherwise pay for once per process (numba
        kernels loaded from their cache or compiled); call it off the timed path.

        Returns:
            seconds spent (0.0 for planners with nothing to prepare).
        """
        return 0.0


def prior_alpha(
    mask: np.ndarray, scores: np.ndarray | None = None, compounding: float = 1.0
) -> float:
    """Predicted per-token acceptance of skip mask ``[2L]`` with no model in the loop: the
    fidelity loss ``sum(scores[skipped]) ** compounding`` through the cosine proxy (what
    ``AdditivePlanner`` predicts).  ``scores``: ``[2L]`` per-block losses (default: the
    built-in profile, ``default_block_scores``)."""
    mask = np.asarray(mask, dtype=bool)
    scores = default_block_scores(len(mask) // 2) if scores is None else np.asarray(scores)
    cos = 1.0 - float(scores[mask].sum()) ** compounding
    return float(np.clip(CosineProxy().alpha_from_cosine(np.array([cos]))[0], 0.0, 1.0))


class AutoregressivePlanner(Planner):
    """Plain decoding: every plan has draft length 0."""

    name = "ar"

    def __init__(self, layout: BlockLayout, cost_model: CostModel) -> None:
        self.layout = layout
        self.cost_model = cost_model

    def plan(self, ctx: PlanContext) -> DraftPlan:
        return select_plan(
            np.zeros((0, self.layout.n_blocks), dtype=bool),
            np.zeros(0),
            self.cost_model,
            ctx.context,
            1,
            strategy=self.name,
        )


class StaticPlanner(Planner):
    """A fixed skip mask with a fixed or TPT-chosen draft length (plans named ``fixed``).

    ``alpha`` (predicted per-token acceptance) defaults to ``prior_alpha(mask)``.  With
    ``draft_length`` given, that plan is returned even when the cost model predicts it
    slower than autoregressive (useful for sweeps that force a plan).  Without it, the draft
    length is chosen by TPT and the autoregressive plan wins when no draft pays.  Not a
    strategy: ``--strategy static`` searches its mask once (``StaticSearchPlanner``).
    """

    name = "fixed"

    def __init__(
        self,
        layout: BlockLayout,
        cost_model: CostModel,
        mask: np.ndarray,
        alpha: float | None = None,
        draft_length: int | None = None,
        max_draft_length: int = 8,
    ) -> None:
        self.layout = layout
        self.cost_model = cost_model
        self.mask = layout.validate_mask(mask)
        if alpha is None:
            alpha = prior_alpha(self.mask)
        if not 0.0 <= alpha <= 1.0:
            raise KnapSpecError(f"alpha must lie in [0, 1], got {alpha!r}")
        if draft_length is not None and draft_length < 0:
            raise KnapSpecError(f"draft_length must be >= 0, got {draft_length}")
        self.alpha = float(alpha)
        self.draft_length = draft_length
        self.max_draft_length = max_draft_length

    def plan(self, ctx: PlanContext) -> DraftPlan:
        if self.draft_length == 0:
            return AutoregressivePlanner(self.layout, self.cost_model).plan(ctx)
        forced = self.draft_length is not None
        return select_plan(
            self.mask[None, :],
            [self.alpha],
            self.cost_model,
            ctx.context,
            [self.draft_length] if forced else self.max_draft_length,
            strategy=self.name,
            force=forced,
            knobs=self.knobs,
        )


class AdditivePlanner(Planner):
    """KnapSpec with additive per-block fidelity scores (no model in the loop).

    ``scores[b]`` is the fidelity lost when block ``b`` alone is skipped, measured as
    ``1 - cos(h_full, h_skip_b)`` of the final hidden states.  For (near-)orthogonal
    perturbations these losses add (``docs/theory.md``), so a skip set's cosine is estimated
    as ``1 - sum(scores[skipped])`` and mapped to alpha by the cosine proxy.

    At each plan, the blocks' draft-step costs at the current context are quantised to
    integer weights (``resolution`` units for all skippable blocks together); the knapsack
    frontier over blocks to *keep* gives, for every kept-cost budget, the kept set with the
    most retained fidelity (equivalently, for every skipped-cost budget, the most faithful
    skip set); every distinct frontier mask is scored for every draft length by TPT.
    """

    name = "additive"

    def __init__(
        self,
        layout: BlockLayout,
        cost_model: CostModel,
        scores: np.ndarray,
        proxy: CosineProxy | None = None,
        max_draft_length: int = 8,
        resolution: int = 512,
        method: str = "exact",
        compounding: float = 1.0,
    ) -> None:
        self.layout = layout
        if not compounding >= 1.0:
            raise KnapSpecError(f"compounding must be >= 1, got {compounding!r}")
        self.compounding = float(compounding)
        self.cost_model = cost_model
        self.proxy = proxy or CosineProxy()
        if max_draft_length < 1:
            raise KnapSpecError(f"max_draft_length must be >= 1, got {max_draft_length}")
        if resolution < 1:
            raise KnapSpecError(f"resolution must be >= 1, got {resolution}")
        self.max_draft_length = int(max_draft_length)
        self.resolution = int(resolution)
        self.method = method
        self.scores = self._check_scores(scores)
        # (weights + scores key, masks, alphas) of the last frontier: contexts whose block
        # costs quantise to the same integer weights share it
        self._memo: tuple[bytes, np.ndarray, np.ndarray] | None = None

    @classmethod
    def for_model_spec(
        cls,
        spec: DecoderSpec | str,
        cost_model: CostModel,
        layout: BlockLayout | None = None,
        scores: np.ndarray | None = None,
        **options: Any,
    ) -> AdditivePlanner:
        """The additive planner for a named model spec: the one ``knapspec plan`` runs.

        Args:
            spec: a ``DecoderSpec`` or the name of a built-in one (``knapspec plan
                --model-spec``).
            cost_model: seconds per block at a context, e.g. ``RooflineCostModel(spec, hw)``.
            layout: blocks and pinning (default: ``BlockLayout(spec.n_layers)``).
            scores: ``[2L]`` per-block fidelity losses measured on the model; None: the
                prior profile for the spec (``default_scores_for_spec``: measured on
                SmolLM2-135M, recalibrated to a compounding loss for larger models, which
                are more redundant).  Measured scores are taken as additive.
            options: further ``AdditivePlanner`` options (``max_draft_length``,
                ``resolution``, ``method``, ``proxy``, ``compounding``).
        """
        spec = get_model_spec(spec) if isinstance(spec, str) else spec
        layout = BlockLayout(spec.n_layers) if layout is None else layout
        if scores is None:
            scores, compounding = default_scores_for_spec(spec.name, spec.n_layers)
            options.setdefault("compounding", compounding)
        return cls(layout, cost_model, scores, **options)

    def _check_scores(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (self.layout.n_blocks,):
            raise KnapSpecError(
                f"scores must have shape ({self.layout.n_blocks},), got {s.shape}"
            )
        if not np.isfinite(s).all():
            raise KnapSpecError("scores contain NaN or inf")
        return np.maximum(s, 0.0)

    def update_scores(self, scores: np.ndarray) -> None:
        """Replace the per-block scores (e.g. re-measured on the current context)."""
        self.scores = self._check_scores(scores)

    def warmup(self) -> float:
        """Load (or compile) the knapsack kernels ``candidates`` runs for ``method``: the
        frontier DP and the distinct-mask recovery.  Returns seconds spent."""
        return solvers.warmup((self.method,), batch=False)

    def candidates(self, context: float) -> tuple[np.ndarray, np.ndarray]:
        """Frontier masks ``[K, 2L]`` and their predicted alphas ``[K]`` at ``context``."""
        idx = np.flatnonzero(self.layout.skippable)  # [n] skippable block indices
        costs = self.cost_model.block_costs(self.layout.n_layers, context, 1)[idx]  # [n] s
        total = costs.sum()
        if idx.size == 0 or total <= 0:
            return np.zeros((0, self.layout.n_blocks), dtype=bool), np.zeros(0)
        weights = np.rint(costs * (self.resolution / total)).astype(np.int64)  # [n]
        key = weights.tobytes() + self.scores.tobytes()
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1], self._memo[2]  # same integer weights: same frontier
        capacity = int(weights.sum())
        # keep the blocks whose loss matters most within the kept-cost budget
        frontier = knapsack_frontier(self.scores[idx], weights, capacity, method=self.method)
        keep = frontier.distinct_masks()  # [K, n] bool, blocks kept among the skippable
        masks_arr = np.zeros((len(keep), self.layout.n_blocks), dtype=bool)  # [K, 2L]
        masks_arr[:, idx] = ~keep
        loss = (masks_arr * self.scores[None, :]).sum(axis=1) ** self.compounding  # [K]
        est_cos = 1.0 - loss
        alphas = np.asarray(self.proxy.alpha_from_cosine(est_cos), dtype=np.float64)
        keep_any = ~np.all(~masks_arr, axis=1)  # drop the all-kept mask (that is AR)
        self._memo = (key, masks_arr[keep_any], alphas.reshape(-1)[keep_any])
        return self._memo[1], self._memo[2]

    def plan(self, ctx: PlanContext) -> DraftPlan:
        masks, alphas = self.candidates(ctx.context)
        return select_plan(
            masks,
            alphas,
            self.cost_model,
            ctx.context,
            self.max_draft_length,
            strategy=self.name,
            remaining_tokens=ctx.remaining_tokens,
            switch_price=ctx.switch_price,
            knobs=self.knobs,
        )
