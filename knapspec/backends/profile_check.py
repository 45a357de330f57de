"""How far is a cached profile from this machine now?  A quick re-measurement of a few points.

``check_profile`` times the full model, the attention-free and the MLP-free model at two
context lengths for one token and for a verification of ``k`` tokens (``3 x 2 x 2``
points, a few seconds on a small model), and compares, each as ``measured / cached``:

* ``step``: a full one-token step at the shorter context,
* ``attention``: one attention block at both contexts (``(t_full - t_no_attn) / L``),
* ``mlp``: one MLP block (``(t_full - t_no_mlp) / L``),
* ``verify``: a full ``k``-token call at the shorter context (the draft KV copy that the
  llama.cpp profile adds to ``n >= 2`` calls is left out of the cached side: the check
  times plain forward calls).

The overall ratio is the geometric mean; the check fails when any point is off by more
than ``tolerance`` (a ratio above it or below its inverse).  Points are timed as the
profile was: with the timer of the backend's device (``timing.timer_for``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..costmodels.table import TableCostModel
from ..errors import KnapSpecError
from .profile_trust import CpuSample, sample_cpu
from .profiling import TimingGrid, profile_masks

if TYPE_CHECKING:
    from .base import Backend

DEFAULT_TOLERANCE = 1.5


@dataclass(frozen=True)
class CheckPoint:
    """One compared quantity: seconds cached and measured now."""

    name: str
    cached_s: float
    measured_s: float

    @property
    def ratio(self) -> float:
        """``measured / cached`` (inf when the cache says 0 and the machine does not)."""
        if self.cached_s <= 0:
            return 1.0 if self.measured_s <= 0 else math.inf
        return self.measured_s / self.cached_s


@dataclass(frozen=True)
class ProfileCheck:
    """The comparison of a cached profile with a fresh quick measurement."""

    points: list[CheckPoint]
    tolerance: float

    @property
    def overall(self) -> float:
        """Geometric mean of the points' ratios."""
        logs = [math.log(max(p.ratio, 1e-12)) for p in self.points]
        return math.exp(sum(logs) / len(logs))

    def off(self, point: CheckPoint) -> bool:
        """Whether ``point`` is off by more than the tolerance."""
        return not (1.0 / self.tolerance <= point.ratio <= self.tolerance)

    @property
    def ok(self) -> bool:
        """No point off by more than the tolerance."""
        return not any(self.off(p) for p in self.points)

    def table(self) -> str:
        """The comparison as a text table (ms), one row per point and one overall."""
        lines = [f"{'point':<26} {'cached ms':>10} {'now ms':>10} {'ratio':>7}"]
        for p in self.points:
            flag = "  off" if self.off(p) else ""
            lines.append(f"{p.name:<26} {1e3 * p.cached_s:>10.3f} {1e3 * p.measured_s:>10.3f} "
                         f"{p.ratio:>6.2f}x{flag}")
        lines.append(f"{'overall (geometric mean)':<26} {'':>10} {'':>10} {self.overall:>6.2f}x")
        return "\n".join(lines)


def check_contexts(model: TableCostModel, backend: Backend, k: int) -> tuple[int, int]:
    """Two context lengths (tokens) to check: the cached ones nearest 1K and 4K that fit."""
    fits = [int(c) for c in model.contexts if c + k < backend.max_context]
    if not fits:
        raise KnapSpecError(f"the cached profile's contexts {model.contexts.tolist()} do not "
                            f"fit this backend's limit of {backend.max_context} tokens")
    lo = min(fits, key=lambda c: abs(math.log(c / 1024)))
    hi = min(fits, key=lambda c: abs(math.log(c / 4096)))
    if hi == lo:
        hi = max(fits)
    return min(lo, hi), max(lo, hi)


def check_profile(
    backend: Backend,
    model: Any,
    k: int = 4,
    repeats: int = 3,
    tolerance: float = DEFAULT_TOLERANCE,
    clock: Callable[[], float] | None = None,
    cpu_sample: Callable[[], CpuSample] = sample_cpu,
    seed: int = 0,
) -> ProfileCheck:
    """Compare ``model`` (a cached ``TableCostModel``) with a quick measurement of ``backend``.

    Args:
        k: tokens of the verification point (>= 2).
        repeats: timed calls per point (the median is kept).
        tolerance: largest acceptable ratio (> 1) either way.
        clock: seconds, for the timings (tests pass a fake one); default: the timer of the
            backend's device (``timing.timer_for``: CUDA events on a GPU).
    """
    if not isinstance(model, TableCostModel):
        raise KnapSpecError(f"--check compares a measured (table) profile, got a "
                            f"'{getattr(model, 'kind', type(model).__name__)}' cost model")
    if k < 2 or repeats < 1 or not tolerance > 1:
        raise KnapSpecError(f"check_profile: need k >= 2, repeats >= 1, tolerance > 1; got "
                            f"k={k}, repeats={repeats}, tolerance={tolerance}")
    n_layers = backend.layout.n_layers
    lo, hi = check_contexts(model, backend, k)
    masks = {m: v for m, v in profile_masks(n_layers).items() if m != "none"}
    grid = TimingGrid(backend, [lo, hi], [1, k], masks, repeats, clock, seed, cpu_sample)
    grid.measure(grid.all_points(), set())
    t = grid.medians()  # [2 contexts, 2 token counts]

    copy = dict(zip(model.n_tokens.tolist(), model.meta.get("draft_kv_copy_s") or [],
                    strict=False))
    verify_cached = model.full_step_seconds(n_layers, lo, k) - float(copy.get(float(k), 0.0))
    points = [
        CheckPoint(f"step, 1 token @ {lo}", model.full_step_seconds(n_layers, lo, 1),
                   float(t["full"][0, 0])),
        CheckPoint(f"attention block @ {lo}", model.attention(lo, 1),
                   max(float(t["full"][0, 0] - t["no_attn"][0, 0]), 0.0) / n_layers),
        CheckPoint(f"attention block @ {hi}", model.attention(hi, 1),
                   max(float(t["full"][1, 0] - t["no_attn"][1, 0]), 0.0) / n_layers),
        CheckPoint("mlp block", model.mlp(1),
                   max(float(np.median(t["full"][:, 0] - t["no_mlp"][:, 0])), 0.0) / n_layers),
        CheckPoint(f"verify {k} tokens @ {lo}", verify_cached, float(t["full"][0, 1])),
    ]
    return ProfileCheck(points, tolerance)
