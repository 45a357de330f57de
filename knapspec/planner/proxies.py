"""Acceptance proxies: map draft-vs-target evidence to a per-token acceptance alpha in [0, 1].

Three proxies, from cheapest evidence to most exact:

* ``CosineProxy``: cosine similarity of final hidden states (the KnapSpec paper's proxy),
  mapped to alpha by ``alpha(c) = Phi(kappa * t**power - beta)``, ``t = c / sqrt(1 - c^2)``;
  the derivation and its assumptions are in ``docs/theory.md``.
* ``Top1Proxy``: fraction of positions where draft and target logits agree on the argmax;
  the exact acceptance rate of greedy speculative decoding on those positions.
* ``TotalVariationProxy``: ``1 - TV(p_draft, p_target)`` averaged over positions; the exact
  acceptance probability of speculative sampling (Leviathan et al., 2023, Thm. 3.5).

Inputs may be numpy arrays or torch tensors; all are converted to float64 numpy.  The
arithmetic itself (cosine, top-1 agreement, 1 - TV, softmax) is ``knapspec.agreement``'s.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..agreement import cosine, top1_agreement, tv_acceptance
from ..errors import KnapSpecError


def _as_2d(x: Any, name: str) -> np.ndarray:
    """``[T, D]`` float64 array from an array or tensor of shape ``[D]`` or ``[..., D]``."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise KnapSpecError(f"{name}: expected an array of shape [T, D], got a scalar")
    arr = arr.reshape(-1, arr.shape[-1])
    if not np.isfinite(arr).all():
        raise KnapSpecError(f"{name}: contains NaN or inf")
    return arr


def _pair(draft: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    d, t = _as_2d(draft, "draft"), _as_2d(target, "target")
    if d.shape != t.shape:
        raise KnapSpecError(f"draft and target shapes differ: {d.shape} vs {t.shape}")
    return d, t


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity of ``[T, D]`` arrays -> ``[T]`` (0 where a row is zero)."""
    x, y = _pair(a, b)
    return cosine(x, y)


_erf = np.frompyfunc(math.erf, 1, 1)


def _normal_cdf(z: Any) -> np.ndarray:
    """Standard normal CDF, elementwise (inf-safe)."""
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.asarray(_erf(z / math.sqrt(2.0)), dtype=np.float64))


class AcceptanceProxy(ABC):
    """Maps draft vs target evidence (hidden states or logits, ``[T, D]``) to alpha."""

    name: str = ""
    evidence: str = ""  # "hidden" (final hidden states) or "logits"

    @abstractmethod
    def alpha(self, draft: Any, target: Any) -> float:
        """Predicted per-token acceptance in [0, 1] from ``[T, D]`` draft and target evidence."""


class CosineProxy(AcceptanceProxy):
    """Cosine similarity of final hidden states, mapped by ``Phi(kappa * t**power - beta)``.

    ``t = c / sqrt(1 - c^2)`` (0 for ``c <= 0``).  With ``power = 1``, ``kappa`` is the logit
    margin of the top token over its runner-up in units of the perturbation's noise and
    ``beta`` >= 0 absorbs competition from many tokens; ``power < 1`` accounts for margins
    that vary across tokens (near-ties flip under tiny perturbations).  The defaults were
    fitted by ``fit`` to 11,520 per-token (cosine, top-1 agreement) pairs measured on
    SmolLM2-135M-Instruct (``scripts/measure_fidelity.py``; see ``docs/theory.md``).
    """

    name = "cosine"
    evidence = "hidden"

    def __init__(self, kappa: float = 2.371, beta: float = 2.8, power: float = 0.225) -> None:
        if not (math.isfinite(kappa) and kappa > 0):
            raise KnapSpecError(f"kappa must be a positive number, got {kappa!r}")
        if not (math.isfinite(beta) and beta >= 0):
            raise KnapSpecError(f"beta must be a non-negative number, got {beta!r}")
        if not (math.isfinite(power) and power > 0):
            raise KnapSpecError(f"power must be a positive number, got {power!r}")
        self.kappa = float(kappa)
        self.beta = float(beta)
        self.power = float(power)

    @staticmethod
    def _t(c: np.ndarray) -> np.ndarray:
        c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
        s = np.sqrt(np.maximum(1.0 - c * c, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s > 0, c / np.where(s > 0, s, 1.0), np.inf)

    def alpha_from_cosine(self, c: float | np.ndarray) -> np.ndarray | float:
        """Map cosine similarity ``c`` in [-1, 1] (scalar or array) to alpha in [0, 1]."""
        out = _normal_cdf(self.kappa * self._t(c) ** self.power - self.beta)
        return float(out) if out.ndim == 0 else out

    def alpha(self, draft: Any, target: Any) -> float:
        # mean of per-position acceptance, not acceptance of the mean cosine
        return float(np.mean(self.alpha_from_cosine(cosine_similarity(draft, target))))

    @classmethod
    def fit(cls, cosines: Any, accept: Any, bins: int = 60) -> CosineProxy:
        """Least-squares fit of (kappa, beta, power) to per-sample cosines and 0/1 acceptance.

        Samples are grouped into ``bins`` quantile bins of ``t`` (weighted by count) to keep the
        grid search fast.
        """
        c = np.asarray(cosines, dtype=np.float64).ravel()
        y = np.asarray(accept, dtype=np.float64).ravel()
        if c.shape != y.shape or c.size < 2:
            raise KnapSpecError("fit needs matching arrays of at least 2 cosines and acceptances")
        t = np.minimum(cls._t(c), 1e6)
        edges = np.unique(np.quantile(t, np.linspace(0, 1, bins + 1)))
        idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, max(len(edges) - 2, 0))
        w = np.bincount(idx).astype(np.float64)
        keep = w > 0
        tb = (np.bincount(idx, weights=t)[keep] / w[keep])
        yb = (np.bincount(idx, weights=y)[keep] / w[keep])
        w = w[keep] / w[keep].sum()
        best = (np.inf, 1.0, 1.0, 1.0)
        for power in np.linspace(0.1, 1.0, 37):
            tp = tb**power
            for beta in np.linspace(0.0, 3.0, 61):
                for kappa in np.geomspace(1e-2, 10.0, 121):
                    err = float(np.sum(w * (_normal_cdf(kappa * tp - beta) - yb) ** 2))
                    if err < best[0]:
                        best = (err, kappa, beta, power)
        return cls(kappa=float(best[1]), beta=float(best[2]), power=float(best[3]))

    def __repr__(self) -> str:
        return f"CosineProxy(kappa={self.kappa:.4g}, beta={self.beta:.4g}, power={self.power:.3g})"


class Top1Proxy(AcceptanceProxy):
    """Fraction of positions where the draft's and target's argmax tokens agree."""

    name = "top1"
    evidence = "logits"

    def alpha(self, draft: Any, target: Any) -> float:
        d, t = _pair(draft, target)
        return float(top1_agreement(d, t))


class TotalVariationProxy(AcceptanceProxy):
    """``1 - TV(p_draft, p_target)`` at ``temperature``: speculative sampling's acceptance."""

    name = "tv"
    evidence = "logits"

    def __init__(self, temperature: float = 1.0) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise KnapSpecError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def alpha(self, draft: Any, target: Any) -> float:
        d, t = _pair(draft, target)
        return float(tv_acceptance(d, t, self.temperature))


PROXIES: dict[str, type[AcceptanceProxy]] = {
    CosineProxy.name: CosineProxy,
    Top1Proxy.name: Top1Proxy,
    TotalVariationProxy.name: TotalVariationProxy,
}


def make_proxy(name: str, **kwargs: Any) -> AcceptanceProxy:
    """Build a proxy by name (``cosine``, ``top1``, ``tv``)."""
    try:
        cls = PROXIES[name]
    except KeyError:
        raise KnapSpecError(
            f"unknown acceptance proxy {name!r} (known: {', '.join(sorted(PROXIES))})"
        ) from None
    return cls(**kwargs)
