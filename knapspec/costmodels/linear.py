"""The paper's linear cost model, extended to multi-token (verification) steps.

KnapSpec fits the per-block latencies of a decoder as

* ``t_mlp = c1`` (independent of the context length), and
* ``t_attn = c2 * ctx + c3`` (linear in the number of cached tokens).

``LinearCostModel`` keeps that form for a one-token (draft) step and adds one
*per-extra-token* slope per component, so that verifying ``n`` tokens in one forward
call may cost more than drafting one.  With ``c`` the context length in tokens and
``n >= 1`` the number of new tokens in the step, all results in **seconds**::

    attention(c, n) = attn_base_s + attn_per_token_s * c + attn_per_new_token_s * (n - 1)
    mlp(n)          = mlp_s       + mlp_per_token_s      * (n - 1)
    head(n)         = head_s      + head_per_token_s     * (n - 1)
    overhead(n)     = overhead_s  + overhead_per_token_s * (n - 1)

With all per-token slopes at zero (the default) verification costs the same as a draft
step, i.e. the memory-bound regime the paper assumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import KnapSpecError
from .base import (
    CostModel,
    check_context,
    check_finite_nonnegative,
    check_n_tokens,
    check_param_keys,
    register_cost_model,
)

logger = logging.getLogger(__name__)

_REQUIRED = ("mlp_s", "attn_per_token_s", "attn_base_s", "head_s", "overhead_s")
_OPTIONAL = (
    "head_per_token_s",
    "mlp_per_token_s",
    "attn_per_new_token_s",
    "overhead_per_token_s",
)


@register_cost_model
class LinearCostModel(CostModel):
    """Affine per-block costs: ``t_mlp = c1``, ``t_attn = c2 * ctx + c3`` plus token slopes.

    Args (all seconds, all finite and >= 0):
        mlp_s: one MLP block for one token (the paper's ``c1``).
        attn_per_token_s: attention seconds per cached context token (``c2``).
        attn_base_s: attention seconds at zero context for one token (``c3``).
        head_s: final norm + LM head (+ token selection) for one token.
        overhead_s: fixed per-forward-call seconds (embedding, dispatch, sync).
        head_per_token_s: extra head seconds per additional token in the step.
        mlp_per_token_s: extra MLP-block seconds per additional token.
        attn_per_new_token_s: extra attention-block seconds per additional token.
        overhead_per_token_s: extra per-call seconds per additional token.
        meta: free-form provenance, saved with the model.
    """

    kind = "linear"

    def __init__(
        self,
        mlp_s: float,
        attn_per_token_s: float,
        attn_base_s: float,
        head_s: float,
        overhead_s: float,
        head_per_token_s: float = 0.0,
        mlp_per_token_s: float = 0.0,
        attn_per_new_token_s: float = 0.0,
        overhead_per_token_s: float = 0.0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(meta)
        self.mlp_s = check_finite_nonnegative("mlp_s", mlp_s)
        self.attn_per_token_s = check_finite_nonnegative("attn_per_token_s", attn_per_token_s)
        self.attn_base_s = check_finite_nonnegative("attn_base_s", attn_base_s)
        self.head_s = check_finite_nonnegative("head_s", head_s)
        self.overhead_s = check_finite_nonnegative("overhead_s", overhead_s)
        self.head_per_token_s = check_finite_nonnegative("head_per_token_s", head_per_token_s)
        self.mlp_per_token_s = check_finite_nonnegative("mlp_per_token_s", mlp_per_token_s)
        self.attn_per_new_token_s = check_finite_nonnegative(
            "attn_per_new_token_s", attn_per_new_token_s
        )
        self.overhead_per_token_s = check_finite_nonnegative(
            "overhead_per_token_s", overhead_per_token_s
        )

    # ------------------------------------------------------------------ cost methods
    def attention(self, context: float, n_tokens: int = 1) -> float:
        """Seconds: ``attn_base_s + attn_per_token_s * c + attn_per_new_token_s * (n - 1)``."""
        c = check_context(context)
        n = check_n_tokens(n_tokens)
        return self.attn_base_s + self.attn_per_token_s * c + self.attn_per_new_token_s * (n - 1)

    def mlp(self, n_tokens: int = 1) -> float:
        """Seconds: ``mlp_s + mlp_per_token_s * (n - 1)``."""
        return self.mlp_s + self.mlp_per_token_s * (check_n_tokens(n_tokens) - 1)

    def head(self, n_tokens: int = 1) -> float:
        """Seconds: ``head_s + head_per_token_s * (n - 1)``."""
        return self.head_s + self.head_per_token_s * (check_n_tokens(n_tokens) - 1)

    def overhead(self, n_tokens: int = 1) -> float:
        """Seconds: ``overhead_s + overhead_per_token_s * (n - 1)``."""
        return self.overhead_s + self.overhead_per_token_s * (check_n_tokens(n_tokens) - 1)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """All nine coefficients (seconds) as a flat dict of floats."""
        return {name: getattr(self, name) for name in (*_REQUIRED, *_OPTIONAL)}

    @classmethod
    def from_dict(
        cls, params: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> LinearCostModel:
        """Build from ``to_dict`` output; the four per-token slopes are optional (0)."""
        check_param_keys(cls.kind, params, _REQUIRED, _OPTIONAL)
        return cls(**params, meta=meta)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        contexts: Sequence[float] | np.ndarray,
        attn_seconds: Sequence[float] | np.ndarray,
        mlp_seconds: float | Sequence[float] | np.ndarray,
        head_seconds: float | Sequence[float] | np.ndarray,
        overhead_seconds: float | Sequence[float] | np.ndarray = 0.0,
        *,
        head_per_token_s: float = 0.0,
        mlp_per_token_s: float = 0.0,
        attn_per_new_token_s: float = 0.0,
        overhead_per_token_s: float = 0.0,
        meta: dict[str, Any] | None = None,
    ) -> LinearCostModel:
        """Least-squares fit of ``t_attn = c2 * ctx + c3`` from profiled one-token steps.

        (Over 80 lines only through this docstring; the code is about 45 lines.)

        Args:
            contexts: ``[K]`` context lengths (tokens) at which attention was timed; at
                least two distinct values.  Repeated contexts (repeated trials) are fine.
            attn_seconds: ``[K]`` seconds of one attention block at each context.
            mlp_seconds: seconds of one MLP block: a scalar or ``[M]`` repeated trials
                (the median is used, being robust to stray slow trials).
            head_seconds: seconds of the head (scalar or trials; median).
            overhead_seconds: seconds of per-call overhead (scalar or trials; median).
            head_per_token_s, mlp_per_token_s, attn_per_new_token_s, overhead_per_token_s:
                per-extra-token slopes passed through unchanged (seconds per token).
            meta: provenance; a ``"fit"`` entry with the fit diagnostics is added.

        The slope and intercept are constrained to be ``>= 0`` (a cost cannot fall with
        context nor be negative): ``np.linalg.lstsq`` gives the unconstrained solution;
        if it violates a bound, the optimum lies on that bound, so the other coefficient
        is refit alone (slope 0 -> intercept = mean; intercept 0 -> slope through the
        origin), which is the exact non-negative least-squares solution for two unknowns.

        Raises:
            KnapSpecError: mismatched shapes, fewer than two distinct contexts, or
                negative / non-finite data.
        """
        c = _as_1d("contexts", contexts)
        y = _as_1d("attn_seconds", attn_seconds)
        if c.shape != y.shape:
            raise KnapSpecError(
                f"contexts and attn_seconds must have the same length, got {c.size} and {y.size}"
            )
        if np.unique(c).size < 2:
            raise KnapSpecError(
                "contexts: need at least two distinct context lengths to fit a slope"
            )
        design = np.stack([c, np.ones_like(c)], axis=1)
        (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
        clamped = False
        if slope < 0:
            slope, intercept, clamped = 0.0, float(y.mean()), True
        if intercept < 0:
            slope, intercept, clamped = float(c @ y / (c @ c)), 0.0, True
            slope = max(slope, 0.0)
        residual = y - (slope * c + intercept)
        ss_tot = float(((y - y.mean()) ** 2).sum())
        fit_info = {
            "n_points": int(c.size),
            "rms_residual_s": float(np.sqrt((residual**2).mean())),
            "r2": (1.0 - float((residual**2).sum()) / ss_tot) if ss_tot > 0 else 1.0,
            "clamped": clamped,
            "context_range": [float(c.min()), float(c.max())],
        }
        if clamped:
            logger.info("linear fit: coefficient clamped to >= 0 (slope=%g, base=%g)",
                        slope, intercept)
        meta = dict(meta or {})
        meta["fit"] = fit_info
        return cls(
            mlp_s=_median("mlp_seconds", mlp_seconds),
            attn_per_token_s=float(slope),
            attn_base_s=float(intercept),
            head_s=_median("head_seconds", head_seconds),
            overhead_s=_median("overhead_seconds", overhead_seconds),
            head_per_token_s=head_per_token_s,
            mlp_per_token_s=mlp_per_token_s,
            attn_per_new_token_s=attn_per_new_token_s,
            overhead_per_token_s=overhead_per_token_s,
            meta=meta,
        )


def _as_1d(name: str, values: Any) -> np.ndarray:
    """``values`` as a non-empty finite non-negative float64 vector, or KnapSpecError."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise KnapSpecError(f"{name}: expected numbers, got {values!r}") from None
    arr = np.atleast_1d(arr)
    if arr.ndim != 1 or arr.size == 0:
        raise KnapSpecError(f"{name}: expected a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise KnapSpecError(f"{name}: values must be finite and >= 0")
    return arr


def _median(name: str, values: Any) -> float:
    """Median of a scalar or a sequence of repeated timings (seconds)."""
    return float(np.median(_as_1d(name, values)))
