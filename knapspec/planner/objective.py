"""The tokens-per-time (TPT) objective of one draft/verify round.

A round drafts ``d`` tokens with the skip-mask model (``d`` draft steps of one token each),
then verifies them with one full-model step over ``d + 1`` tokens.  With per-token
acceptance probability ``alpha`` (i.i.d. across positions, as in Leviathan et al., 2023),
the expected number of tokens a round yields, counting the bonus/recovered token, is::

    E[tokens] = (1 - alpha**(d+1)) / (1 - alpha)      (= d + 1 at alpha = 1)

and the round takes ``d * t_draft(mask, ctx) + t_verify(ctx, d + 1)`` seconds, where both
step times come from a cost model and include the LM head and the per-step overhead (which
the paper's formula leaves out and a CPU cannot ignore), and the verification cost grows
with the number of tokens verified.  ``d = 0`` is plain autoregressive decoding.
"""

from __future__ import annotations

import numpy as np

from ..costmodels.base import CostModel
from ..errors import KnapSpecError


def expected_tokens(alpha: float | np.ndarray, d: int | np.ndarray) -> np.ndarray | float:
    """Expected tokens per round for acceptance ``alpha`` in [0, 1] and draft length ``d`` >= 0.

    Vectorised over broadcastable ``alpha`` and ``d``.  Returns ``d + 1`` where ``alpha == 1``.
    """
    a = np.asarray(alpha, dtype=np.float64)
    k = np.asarray(d, dtype=np.float64) + 1.0
    if np.any((a < 0) | (a > 1)) or np.any(~np.isfinite(a)):
        raise KnapSpecError(f"alpha must lie in [0, 1], got {alpha!r}")
    if np.any(k < 1):
        raise KnapSpecError(f"draft length must be >= 0, got {d!r}")
    a, k = np.broadcast_arrays(a, k)
    out = np.empty(a.shape, dtype=np.float64)
    one = a >= 1.0
    out[one] = k[one]
    # sum_{i=0}^{d} alpha^i, computed stably as -expm1(k*log(a)) / (1 - a)
    sub = ~one
    with np.errstate(divide="ignore"):
        out[sub] = -np.expm1(k[sub] * np.log(a[sub])) / (1.0 - a[sub])
    out[sub & (a == 0)] = 1.0
    return float(out) if out.ndim == 0 else out


def round_seconds(
    draft_step_s: float | np.ndarray, verify_s: float | np.ndarray, d: int | np.ndarray
) -> np.ndarray | float:
    """Seconds of one round: ``d`` draft steps of ``draft_step_s`` plus one verify of ``verify_s``.

    ``verify_s`` must be the cost of verifying ``d + 1`` tokens (see ``verify_seconds``).
    Vectorised over broadcastable arguments (``select_plan`` passes ``[K, 1]`` draft steps,
    ``[1, D]`` verifications and ``[1, D]`` draft lengths).
    """
    return np.asarray(d) * draft_step_s + verify_s


def verify_seconds(cost_model: CostModel, n_layers: int, context: float, d: int) -> float:
    """Seconds for the full-model verification of ``d + 1`` tokens at ``context`` cached tokens
    (``d = 0``: one autoregressive step)."""
    return cost_model.full_step_seconds(n_layers, context, d + 1)
