"""A cost model that interpolates measured latencies on a (context, tokens) grid.

The profiler times each component at a few context lengths ``contexts`` ``[C]``
(tokens, strictly increasing) and token counts ``n_tokens`` ``[N]`` (strictly
increasing integers starting at 1), giving, in **seconds**:

* ``attention[C, N]``: one attention block,
* ``mlp[N]``, ``head[N]``, ``overhead[N]``: one MLP block, the head, the per-call overhead.

Interpolation rules (all exact at the measured points):

* **context** (attention only): piecewise linear between measured contexts; flat below
  the first one; beyond the last one, linear with the last segment's slope clamped to
  ``>= 0``.
* **tokens**: piecewise linear between measured token counts; beyond the largest
  measured count, linear with the last segment's per-token slope clamped to ``>= 0``
  (constant when only ``n = 1`` was measured).  For attention that extrapolation slope
  is additionally made non-decreasing in context (running maximum), so that the model
  stays monotone in context even when extrapolating in tokens.

Attention is made **monotone non-decreasing in context** on construction: timing noise
can make a longer context look cheaper, which would make the planner prefer long
contexts; ``np.maximum.accumulate`` over the context axis removes such dips.  When it
changes anything it is logged at INFO and recorded in ``meta["monotone_enforced"]``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import KnapSpecError
from .base import (
    CostModel,
    check_context,
    check_n_tokens,
    check_param_keys,
    register_cost_model,
)

logger = logging.getLogger(__name__)

_FIELDS = ("contexts", "n_tokens", "attention", "mlp", "head", "overhead")


def _array(name: str, values: Any, ndim: int) -> np.ndarray:
    """``values`` as a finite, non-negative float64 array with ``ndim`` dimensions."""
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise KnapSpecError(f"{name}: expected a {ndim}-D array of numbers") from None
    if arr.ndim != ndim:
        raise KnapSpecError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise KnapSpecError(f"{name}: must not be empty")
    if not np.all(np.isfinite(arr)):
        raise KnapSpecError(f"{name}: values must be finite (no NaN or inf)")
    if np.any(arr < 0):
        raise KnapSpecError(f"{name}: values must be >= 0")
    return arr


def _segment(grid: np.ndarray, x: float) -> tuple[int, float]:
    """Locate ``x`` on ``grid`` [K]: index ``i`` and weight ``w`` with value
    ``y[i] + w * (y[i + 1] - y[i])``.  ``w`` is 0 exactly at grid points and below the
    first point, and may exceed 1 beyond the last segment (extrapolation)."""
    k = grid.size
    if k == 1 or x <= grid[0]:
        return 0, 0.0
    if x == grid[-1]:
        return k - 1, 0.0
    if x > grid[-1]:
        return k - 2, (x - grid[-2]) / (grid[-1] - grid[-2])
    i = int(np.searchsorted(grid, x, side="right")) - 1
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


@register_cost_model
class TableCostModel(CostModel):
    """Measured latencies on a grid, piecewise-linearly interpolated (see module doc).

    Args:
        contexts: ``[C]`` context lengths in tokens, strictly increasing, >= 0.
        n_tokens: ``[N]`` new-token counts, strictly increasing integers, first one 1.
        attention: ``[C, N]`` seconds of one attention block.
        mlp: ``[N]`` seconds of one MLP block.
        head: ``[N]`` seconds of the head.
        overhead: ``[N]`` per-forward-call seconds.
        meta: free-form provenance, saved with the model.

    Raises:
        KnapSpecError: naming the field with a wrong shape, ordering, or a negative /
            non-finite value.
    """

    kind = "table"

    def __init__(
        self,
        contexts: Any,
        n_tokens: Any,
        attention: Any,
        mlp: Any,
        head: Any,
        overhead: Any,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(meta)
        ctx = _array("contexts", contexts, 1)
        ns = _array("n_tokens", n_tokens, 1)
        if np.any(np.diff(ctx) <= 0):
            raise KnapSpecError(f"contexts: must be strictly increasing, got {ctx.tolist()}")
        if np.any(ns != np.round(ns)):
            raise KnapSpecError(f"n_tokens: must be integers, got {ns.tolist()}")
        if ns[0] != 1:
            raise KnapSpecError(f"n_tokens: must start at 1, got {ns.tolist()}")
        if np.any(np.diff(ns) <= 0):
            raise KnapSpecError(f"n_tokens: must be strictly increasing, got {ns.tolist()}")
        attn = _array("attention", attention, 2)
        if attn.shape != (ctx.size, ns.size):
            raise KnapSpecError(
                f"attention: expected shape [len(contexts), len(n_tokens)] = "
                f"[{ctx.size}, {ns.size}], got {list(attn.shape)}"
            )
        per_n = {}
        for name, values in (("mlp", mlp), ("head", head), ("overhead", overhead)):
            arr = _array(name, values, 1)
            if arr.shape != ns.shape:
                raise KnapSpecError(
                    f"{name}: expected shape [len(n_tokens)] = [{ns.size}], got {list(arr.shape)}"
                )
            per_n[name] = arr

        monotone = np.maximum.accumulate(attn, axis=0)
        if np.any(monotone != attn):
            raised = monotone - attn
            info = {
                "cells_changed": int(np.count_nonzero(raised)),
                "max_raise_s": float(raised.max()),
            }
            logger.info(
                "TableCostModel: attention made monotone in context (%d cells raised, "
                "by at most %.3g s)", info["cells_changed"], info["max_raise_s"],
            )
            self.meta["monotone_enforced"] = info
        self.contexts = ctx
        self.n_tokens = ns
        self.attention_table = monotone
        self.mlp_table = per_n["mlp"]
        self.head_table = per_n["head"]
        self.overhead_table = per_n["overhead"]
        # Per-token slope used beyond the largest measured n: [C], >= 0, non-decreasing
        # in context.  Appended as an extra column so one context interpolation serves both.
        if ns.size > 1:
            slope = np.maximum((monotone[:, -1] - monotone[:, -2]) / (ns[-1] - ns[-2]), 0.0)
            slope = np.maximum.accumulate(slope)
        else:
            slope = np.zeros(ctx.size)
        self._attn_aug = np.concatenate([monotone, slope[:, None]], axis=1)

    # ------------------------------------------------------------------ interpolation
    def _interp_context(self, c: float) -> np.ndarray:
        """``[N + 1]`` attention row at context ``c`` (last entry: extrapolation slope)."""
        table = self._attn_aug
        i, w = _segment(self.contexts, c)
        if w == 0.0:
            return table[i]
        lo, hi = table[i], table[i + 1]
        if w > 1.0:  # beyond the last measured context: clamp the slope at >= 0
            return hi + np.maximum(hi - lo, 0.0) * (w - 1.0)
        return lo + (hi - lo) * w

    def _interp_tokens(self, values: np.ndarray, n: float, slope: float | None = None) -> float:
        """Interpolate ``values`` [N] at ``n`` tokens; ``slope`` (s/token) beyond the grid."""
        ns = self.n_tokens
        if n >= ns[-1]:
            if slope is None:
                slope = (
                    max((values[-1] - values[-2]) / (ns[-1] - ns[-2]), 0.0) if ns.size > 1 else 0.0
                )
            return float(values[-1] + slope * (n - ns[-1]))
        i, w = _segment(ns, n)
        if w == 0.0:
            return float(values[i])
        return float(values[i] + (values[i + 1] - values[i]) * w)

    # ------------------------------------------------------------------ cost methods
    def attention(self, context: float, n_tokens: int = 1) -> float:
        """Seconds for one attention block, interpolated in context then in tokens."""
        row = self._interp_context(check_context(context))
        return self._interp_tokens(row[:-1], check_n_tokens(n_tokens), slope=float(row[-1]))

    def mlp(self, n_tokens: int = 1) -> float:
        """Seconds for one MLP block, interpolated in tokens."""
        return self._interp_tokens(self.mlp_table, check_n_tokens(n_tokens))

    def head(self, n_tokens: int = 1) -> float:
        """Seconds for the head, interpolated in tokens."""
        return self._interp_tokens(self.head_table, check_n_tokens(n_tokens))

    def overhead(self, n_tokens: int = 1) -> float:
        """Per-call seconds, interpolated in tokens."""
        return self._interp_tokens(self.overhead_table, check_n_tokens(n_tokens))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Grid and tables as nested lists (attention after the monotone fix-up)."""
        return {
            "contexts": self.contexts.tolist(),
            "n_tokens": [int(n) for n in self.n_tokens],
            "attention": self.attention_table.tolist(),
            "mlp": self.mlp_table.tolist(),
            "head": self.head_table.tolist(),
            "overhead": self.overhead_table.tolist(),
        }

    @classmethod
    def from_dict(
        cls, params: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> TableCostModel:
        """Build from ``to_dict`` output; all six fields are required."""
        check_param_keys(cls.kind, params, _FIELDS)
        return cls(**params, meta=meta)
