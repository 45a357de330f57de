"""Build planners by strategy name (what ``--strategy`` and configs use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..blocks import BlockLayout
from ..costmodels.base import CostModel
from ..errors import KnapSpecError
from .oracle_planners import (
    ClaspPlanner,
    EarlyExitPlanner,
    KnapSpecPlanner,
    OracleAdditivePlanner,
    StaticSearchPlanner,
)
from .planners import AutoregressivePlanner, Planner


def _static(layout: BlockLayout, cost: CostModel, **kw: Any) -> Planner:
    if "mask" in kw:
        raise KnapSpecError(
            "strategy 'static' searches its mask once (StaticSearchPlanner); for a fixed mask "
            "build knapspec.planner.StaticPlanner(layout, cost_model, mask, alpha) directly"
        )
    return StaticSearchPlanner(layout, cost, **kw)


def _early_exit(layout: BlockLayout, cost: CostModel, **kw: Any) -> Planner:
    return EarlyExitPlanner(BlockLayout.unpinned(layout.n_layers), cost, **kw)


#: strategy -> builder(layout, cost_model, **options); each strategy builds one class, whose
#: ``name`` (the ``strategy`` of its plans) is the strategy's
STRATEGIES: dict[str, Callable[..., Planner]] = {
    "knapspec": KnapSpecPlanner,
    "clasp": ClaspPlanner,
    "static": _static,
    "early-exit": _early_exit,
    "additive": OracleAdditivePlanner,
    "ar": lambda layout, cost, **kw: AutoregressivePlanner(layout, cost),
}


def make_planner(
    strategy: str,
    layout: BlockLayout,
    cost_model: CostModel,
    max_draft_length: int = 8,
    **options: Any,
) -> Planner:
    """Planner for ``strategy`` (``knapspec``, ``clasp``, ``static``, ``early-exit``,
    ``additive``, ``ar``).

    ``max_draft_length`` (tokens) bounds every strategy's draft length (CLaSp drafts exactly
    ``min(4, max_draft_length)``); other ``options`` are strategy-specific.
    """
    if max_draft_length < 1:
        raise KnapSpecError(f"max_draft_length must be >= 1, got {max_draft_length}")
    if strategy == "clasp":
        options.setdefault("draft_length", min(4, max_draft_length))
    elif strategy != "ar":
        options["max_draft_length"] = max_draft_length
    try:
        build = STRATEGIES[strategy]
    except KeyError:
        raise KnapSpecError(
            f"unknown strategy {strategy!r} (available: {', '.join(STRATEGIES)})"
        ) from None
    try:
        return build(layout, cost_model, **options)
    except TypeError as e:
        raise KnapSpecError(f"strategy {strategy!r}: {e}") from None
