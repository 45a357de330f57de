"""Assemble a backend, its cost model, a planner and the decoder.

``build_session_from_config(KnapSpecConfig)`` is the validated path the CLI commands and
embedding code share; its parts (``build_backend``, ``config_cost_model``,
``config_layout``, ``config_planner``) are what ``knapspec bench`` uses per backend and
strategy.  ``build_session`` takes plain keyword options (no config file semantics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import Backend, create_backend
from .blocks import BlockLayout
from .config import KnapSpecConfig
from .costmodels.base import CostModel
from .costmodels.io import load_cost_model
from .decoding import SpeculativeDecoder
from .errors import KnapSpecError
from .planner.factory import make_planner
from .planner.knobs import ConfidenceTable, DraftHead, DraftKnobs, make_knobs
from .planner.planners import Planner

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A ready-to-use backend + cost model + planner + decoder."""

    backend: Backend
    cost_model: CostModel
    planner: Planner
    decoder: SpeculativeDecoder
    config: KnapSpecConfig | None = None  # what it was built from (build_session_from_config)


def backend_cost_model(
    backend: Backend, cost_model: str | Path | None = None, progress: bool = True,
    notice: Callable[[str], None] | None = None,
) -> CostModel:
    """The cost model from ``cost_model`` (a JSON file) or the backend's cached profile.

    ``notice`` receives the one line said before a first profile (what, how long, where
    cached); the CLI writes it to stderr.  An untrusted fresh profile raises
    ``UntrustedProfileError`` (see ``cached_profile``).
    """
    if cost_model:
        return load_cost_model(cost_model)
    from .backends.profiling import cached_profile

    return cached_profile(backend, progress=progress, notice=notice)


def build_session(
    backend: str = "torch",
    model: str | None = None,
    strategy: str = "knapspec",
    cost_model: str | Path | None = None,
    max_draft_length: int = 8,
    backend_options: dict[str, Any] | None = None,
    planner_options: dict[str, Any] | None = None,
    progress: bool = True,
    notice: Callable[[str], None] | None = None,
) -> Session:
    """Build everything a generation needs; profiles the backend on first use (cached) and
    warms the planner up (``Planner.warmup``), so neither lands in a timed decode."""
    be = create_backend(backend, model=model, **(backend_options or {}))
    cm = backend_cost_model(be, cost_model, progress=progress, notice=notice)
    options = {"knobs": round_knobs(None, be.draft_vocab_sizes()), **(planner_options or {})}
    planner = make_planner(strategy, be.layout, cm, max_draft_length, **options)
    planner.warmup()  # its numba kernels load here, not in the first (timed) plan
    return Session(be, cm, planner, SpeculativeDecoder(be, planner))


def build_backend(config: KnapSpecConfig) -> Backend:
    """The backend ``config.backend.name`` on ``config.model.path`` with its options."""
    b = config.backend
    return create_backend(b.name, model=config.model.path, **b.options_for())


def config_cost_model(
    config: KnapSpecConfig, backend: Backend, progress: bool = True,
    notice: Callable[[str], None] | None = None,
) -> CostModel:
    """The cost model ``config.costmodel`` names, for ``backend``'s model.

    ``profile``: the backend's cached profile (measured on first use); ``roofline``: the
    analytic model of ``model_spec`` on ``hardware``, which must have as many layers as the
    backend's model; anything else: a cost-model JSON file.
    """
    cm = config.costmodel
    if cm.source == "profile":
        return backend_cost_model(backend, None, progress=progress, notice=notice)
    if cm.source == "roofline":
        from .costmodels import RooflineCostModel, get_hardware_spec, get_model_spec

        spec = get_model_spec(cm.model_spec)
        if spec.n_layers != backend.layout.n_layers:
            raise KnapSpecError(
                f"costmodel.model_spec: {spec.name} has {spec.n_layers} layers, the "
                f"{backend.name} backend's model has {backend.layout.n_layers}"
            )
        return RooflineCostModel(spec, get_hardware_spec(cm.hardware))
    return load_cost_model(cm.source)


def config_layout(config: KnapSpecConfig, layout: BlockLayout) -> BlockLayout:
    """``layout`` with ``planner.pinned_blocks`` applied (unset: unchanged; ``[]``: none)."""
    pinned = config.planner.pinned_blocks
    if pinned is None:
        return layout
    if not pinned:
        return BlockLayout.unpinned(layout.n_layers)
    try:
        return BlockLayout(layout.n_layers, pinned)
    except KnapSpecError as e:
        raise KnapSpecError(f"planner.pinned_blocks: {e}") from None


def round_knobs(
    config: KnapSpecConfig | None, sizes: dict[int, float] | None = None
) -> DraftKnobs:
    """The draft heads and confidence stops plans may use (``knapspec.planner.knobs``).

    Args:
        config: ``planner.draft_vocab`` / ``planner.stop_confidence`` fix a knob (unset:
            TPT chooses); None: both chosen.
        sizes: ``{K: coverage}`` of the reduced heads the backend runs
            (``Backend.draft_vocab_sizes``); priced by the cost model's ``draft_head``.

    The confidence stop uses the acceptance-by-confidence table shipped with the default
    fidelity profile (measured on SmolLM2-135M; a prior for other models).
    """
    pl = None if config is None else config.planner
    heads = [DraftHead(int(k), None, float(c)) for k, c in sorted((sizes or {}).items())]
    vocab = "auto" if pl is None or pl.draft_vocab is None else pl.draft_vocab
    stop = "auto" if pl is None or pl.stop_confidence is None else pl.stop_confidence
    try:
        return make_knobs(heads, ConfidenceTable.default(), draft_vocab=vocab,
                          stop_confidence=stop)
    except KnapSpecError as e:
        key = "draft_vocab" if "draft_vocab" in str(e) else "stop_confidence"
        raise KnapSpecError(f"planner.{key}: {e}") from None


def config_planner(
    config: KnapSpecConfig, layout: BlockLayout, cost_model: CostModel,
    strategy: str | None = None, backend: Backend | None = None,
) -> Planner:
    """The planner for ``strategy`` (default: ``planner.strategy``) with the config's
    options and calibration (``planner.calibrate``, ``prior_strength``, ``replan_margin``),
    warmed up (``Planner.warmup``); a key the strategy does not take is an error naming
    both.  Its round knobs (``round_knobs``) offer ``backend``'s reduced draft heads
    (None: the full head only)."""
    pl = config.planner
    strategy = pl.strategy if strategy is None else strategy
    options = pl.options_for(strategy)
    sizes = backend.draft_vocab_sizes() if backend is not None else {}
    planner = make_planner(strategy, config_layout(config, layout), cost_model,
                           pl.max_draft_length, calibrate=pl.calibrate,
                           prior_strength=pl.prior_strength, replan_margin=pl.replan_margin,
                           knobs=round_knobs(config, sizes), **options)
    planner.warmup()  # its numba kernels load here, not in the first (timed) plan
    return planner


def build_session_from_config(
    config: KnapSpecConfig, progress: bool = True, notice: Callable[[str], None] | None = None
) -> Session:
    """Everything a generation needs, from a validated configuration.

    Profiles the backend on first use when ``costmodel.source = "profile"`` (cached).
    """
    be = build_backend(config)
    cm = config_cost_model(config, be, progress=progress, notice=notice)
    planner = config_planner(config, be.layout, cm, backend=be)
    return Session(be, cm, planner, SpeculativeDecoder(be, planner), config)
