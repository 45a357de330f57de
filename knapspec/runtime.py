"""Assemble a backend, its cost model, a planner and the decoder from plain options.

Shared by the CLI commands and by embedding code, so every entry point builds the same
objects the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import Backend, create_backend
from .costmodels.base import CostModel
from .costmodels.io import load_cost_model
from .decoding import SpeculativeDecoder
from .planner.factory import make_planner
from .planner.planners import Planner

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A ready-to-use backend + cost model + planner + decoder."""

    backend: Backend
    cost_model: CostModel
    planner: Planner
    decoder: SpeculativeDecoder


def backend_cost_model(
    backend: Backend, cost_model: str | Path | None = None, progress: bool = True
) -> CostModel:
    """The cost model from ``cost_model`` (a JSON file) or the backend's cached profile."""
    if cost_model:
        return load_cost_model(cost_model)
    from .profiling import cached_profile

    return cached_profile(backend, progress=progress)


def build_session(
    backend: str = "torch",
    model: str | None = None,
    strategy: str = "knapspec",
    cost_model: str | Path | None = None,
    max_draft_length: int = 8,
    backend_options: dict[str, Any] | None = None,
    planner_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Session:
    """Build everything a generation needs; profiles the backend on first use (cached)."""
    be = create_backend(backend, model=model, **(backend_options or {}))
    cm = backend_cost_model(be, cost_model, progress=progress)
    planner = make_planner(strategy, be.layout, cm, max_draft_length, **(planner_options or {}))
    return Session(be, cm, planner, SpeculativeDecoder(be, planner))
