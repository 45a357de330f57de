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

With a confidence stop (``knapspec.planner.knobs``) a round drafts up to ``d`` tokens and
stops after the first whose top-1 draft probability is below ``tau``.  A share ``s`` of
draft steps is confident, and those are accepted at ``alpha_hi``; then::

    E[tokens] = 1 + alpha * (1 - r**d) / (1 - r),   r = s * alpha_hi
    E[steps]  = (1 - s**d) / (1 - s)
    E[verify] = sum_{j=1..d} P(l >= j) * (t_verify(j + 1) - t_verify(j))  (+ t_verify(1))

with ``P(l >= j) = s**(j-1)``; ``tau = 0`` (``s = 1``, ``alpha_hi = alpha``) gives back the
fixed-length round.  ``docs/theory.md`` derives these.
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


def geometric_sum(x: float | np.ndarray, n: int | np.ndarray) -> np.ndarray | float:
    """``sum_{j=0}^{n-1} x**j`` for ``x`` in [0, 1] and ``n >= 1`` (``n`` where ``x == 1``)."""
    return expected_tokens(x, np.asarray(n) - 1)


def stopped_round(
    alpha: np.ndarray, s: np.ndarray, alpha_hi: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Expected tokens and draft steps of a round with a confidence stop (module doc).

    Args (broadcastable):
        alpha: per-token acceptance of the draft, in [0, 1].
        s: share of draft steps confident enough to go on, in [0, 1].
        alpha_hi: acceptance of those steps, in [0, 1] (``s * alpha_hi <= alpha``).
        d: draft length (>= 1), the most steps a round takes.

    Returns:
        ``(tokens, steps)``: expected tokens the round yields (bonus/recovered included)
        and expected draft steps (= drafted tokens).
    """
    r = np.clip(np.asarray(s) * np.asarray(alpha_hi), 0.0, 1.0)
    tokens = 1.0 + np.asarray(alpha) * geometric_sum(r, d)
    return tokens, geometric_sum(np.clip(s, 0.0, 1.0), d)


def expected_verify_seconds(
    s: np.ndarray, verify: np.ndarray, d: np.ndarray
) -> np.ndarray:
    """Expected verification seconds of a round that drafts ``l`` tokens with
    ``P(l >= j) = s**(j-1)`` for ``j <= d``.

    Args:
        s: ``[...]`` share of confident draft steps, in [0, 1].
        verify: ``[J]`` seconds to verify ``j`` drafts (``j + 1`` tokens), ``j = 1..J``.
        d: ``[D]`` draft lengths, each in ``1..J``.

    Returns:
        ``[..., D]`` seconds.
    """
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, 1.0)[..., None]  # [..., 1]
    verify = np.asarray(verify, dtype=np.float64)
    j = np.arange(len(verify))  # 0..J-1: P(l >= j + 1) = s**j
    step = np.diff(verify, prepend=0.0)  # [J]: what the (j+1)-th draft adds to verification
    with np.errstate(invalid="ignore"):
        reach = np.where(j == 0, 1.0, s ** j)  # [..., J]
    total = np.cumsum(reach * step, axis=-1)  # [..., J]
    return total[..., np.asarray(d) - 1]
