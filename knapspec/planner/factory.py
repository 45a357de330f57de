"""Build planners by strategy name (what ``--strategy`` and configs use).

Built-in strategies are in ``STRATEGIES``.  Other packages add strategies through the
entry-point group ``knapspec.strategies``: an entry ``mine = mypkg:MyPlanner`` names a
``Planner`` subclass or a builder ``callable(layout, cost_model, **options) -> Planner``,
and ``--strategy mine`` then works wherever a strategy is named.  Entry points are read
from the installed distributions' metadata when a name is looked up, and a plugin's module
is imported only when its strategy is built.  A plugin cannot replace a built-in name.

``make_planner`` wraps every planner in ``CalibratedPlanner`` (``calibrate=False``: not).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import numpy as np

from ..blocks import BlockLayout
from ..costmodels.base import CostModel
from ..errors import KnapSpecError
from .calibration import CalibratedPlanner
from .knobs import DraftKnobs
from .oracle_planners import (
    ClaspPlanner,
    EarlyExitPlanner,
    KnapSpecPlanner,
    OracleAdditivePlanner,
    StaticSearchPlanner,
)
from .planners import AutoregressivePlanner, Planner, StaticPlanner

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "knapspec.strategies"  # where other packages register strategies

_SEARCH_ONLY = ("proxy", "rerun_growth", "min_generated", "resolution", "prior_scores")


def fixed_mask(layout: BlockLayout, mask: Any) -> np.ndarray:
    """A skip mask ``[2L]`` from a bool array or from skipped block ids (block ``2i`` is
    layer ``i``'s attention, ``2i + 1`` its MLP); errors name ``planner.mask``."""
    arr = np.asarray(mask)
    try:
        if arr.dtype == bool:
            return layout.validate_mask(arr)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise KnapSpecError(f"expected a list of block ids, got {mask!r}")
        return layout.mask_from_blocks(arr.tolist())
    except KnapSpecError as e:
        pinned = (f" (pinned: {list(layout.pinned)}; planner.pinned_blocks changes that)"
                  if "pinned" in str(e) else "")
        raise KnapSpecError(f"planner.mask: {e}{pinned}") from None


def _static(
    layout: BlockLayout, cost: CostModel, mask: Any = None, draft_length: int | None = None,
    alpha: float | None = None, **kw: Any,
) -> Planner:
    """``static``: with ``mask``, that fixed plan (``StaticPlanner``, forced with
    ``draft_length``); without, the mask searched once (``StaticSearchPlanner``)."""
    if mask is None:
        for key, value in (("draft_length", draft_length), ("alpha", alpha)):
            if value is not None:
                raise KnapSpecError(f"planner.{key}: needs planner.mask (a fixed plan)")
        return StaticSearchPlanner(layout, cost, **kw)
    bad = [k for k in kw if k in _SEARCH_ONLY]
    if bad:
        raise KnapSpecError(f"planner.{bad[0]}: does not apply with planner.mask (a fixed "
                            "plan searches nothing)")
    if draft_length is not None and not 1 <= draft_length <= kw.get("max_draft_length", 8):
        raise KnapSpecError(f"planner.draft_length: expected 1..planner.max_draft_length "
                            f"({kw.get('max_draft_length', 8)}), got {draft_length!r}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise KnapSpecError(f"planner.alpha: expected a number in [0, 1], got {alpha!r}")
    planner = StaticPlanner(layout, cost, fixed_mask(layout, mask), alpha, draft_length, **kw)
    planner.name = "static"  # the strategy's plans are named after it
    return planner


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


def installed_strategies() -> dict[str, EntryPoint]:
    """Strategies other packages register (entry-point group ``knapspec.strategies``), by
    name; nothing is imported.  Names of built-in strategies are ignored (logged)."""
    out: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in STRATEGIES:
            log.warning("entry point %s = %s ignored: %r is a built-in strategy", ep.name,
                        ep.value, ep.name)
        else:
            out.setdefault(ep.name, ep)
    return out


def strategy_names() -> tuple[str, ...]:
    """Every strategy ``make_planner`` builds: the built-in ones, then installed ones."""
    return (*STRATEGIES, *sorted(installed_strategies()))


def unknown_strategy(strategy: str) -> KnapSpecError:
    """The error for a strategy nobody provides, listing the available ones."""
    return KnapSpecError(f"unknown strategy {strategy!r} (available: "
                         f"{', '.join(strategy_names())}; packages add strategies through "
                         f"the entry-point group {ENTRY_POINT_GROUP})")


def _plugin_builder(strategy: str, ep: EntryPoint) -> Callable[..., Planner]:
    """The object entry point ``ep`` names, imported now; it must be callable."""
    try:
        obj = ep.load()
    except (ImportError, AttributeError) as e:
        raise KnapSpecError(f"strategy {strategy!r}: cannot load entry point "
                            f"{ep.value!r}: {e}") from None
    if not callable(obj):
        raise KnapSpecError(f"strategy {strategy!r}: entry point {ep.value!r} is a "
                            f"{type(obj).__name__}, not a Planner class or builder")
    return obj


def _takes(build: Callable[..., Any], name: str) -> bool:
    """Whether ``build`` accepts keyword ``name`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def make_planner(
    strategy: str,
    layout: BlockLayout,
    cost_model: CostModel,
    max_draft_length: int = 8,
    *,
    calibrate: bool = True,
    prior_strength: float = 8.0,
    replan_margin: float = 0.1,
    knobs: DraftKnobs | None = None,
    **options: Any,
) -> Planner:
    """Planner for ``strategy`` (``knapspec``, ``clasp``, ``static``, ``early-exit``,
    ``additive``, ``ar``, or one an installed package registers).

    ``max_draft_length`` (tokens) bounds every strategy's draft length (CLaSp drafts exactly
    ``min(4, max_draft_length)``; a registered strategy gets it when its builder takes a
    ``max_draft_length`` keyword); other ``options`` are strategy-specific.  With
    ``calibrate`` the planner is wrapped in ``CalibratedPlanner(prior_strength,
    replan_margin)``: acceptance learnt from drafting (``knapspec.planner.calibration``).
    ``knobs``: the draft heads and confidence stops its plans may use (the backend's,
    ``knapspec.planner.knobs``); None: the full head, no stop.
    """
    if max_draft_length < 1:
        raise KnapSpecError(f"max_draft_length must be >= 1, got {max_draft_length}")
    build = STRATEGIES.get(strategy)
    if build is None:
        ep = installed_strategies().get(strategy)
        if ep is None:
            raise unknown_strategy(strategy)
        build = _plugin_builder(strategy, ep)
        if _takes(build, "max_draft_length"):
            options.setdefault("max_draft_length", max_draft_length)
    elif strategy == "clasp":
        options.setdefault("draft_length", min(4, max_draft_length))
    elif strategy != "ar":
        options["max_draft_length"] = max_draft_length
    try:
        planner = build(layout, cost_model, **options)
    except TypeError as e:
        raise KnapSpecError(f"strategy {strategy!r}: {e}") from None
    if not isinstance(planner, Planner):
        raise KnapSpecError(f"strategy {strategy!r} built a {type(planner).__name__}, not a "
                            "knapspec.planner.Planner")
    if knobs is not None and not knobs.trivial:
        planner.knobs = knobs
    if not calibrate:
        return planner
    return CalibratedPlanner(planner, cost_model, max_draft_length, prior_strength,
                             replan_margin)
