"""Acceptance proxies: map draft-vs-target evidence to a per-token acceptance alpha in [0, 1].

Three proxies, from cheapest evidence to most exact:

* ``CosineProxy``: cosine similarity of final hidden states (the KnapSpec paper's proxy),
  mapped to alpha by ``alpha(c) = Phi(kappa * c / sqrt(1 - c^2) - beta)``; the derivation and
  its assumptions are in ``docs/theory.md``.
* ``Top1Proxy``: fraction of positions where draft and target logits agree on the argmax;
  the exact acceptance rate of greedy speculative decoding on those positions.
* ``TotalVariationProxy``: ``1 - TV(p_draft, p_target)`` averaged over positions; the exact
  acceptance probability of speculative sampling (Leviathan et al., 2023, Thm. 3.5).

Inputs may be numpy arrays or torch tensors; all are converted to float64 numpy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

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
    num = (x * y).sum(axis=1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z, dtype=np.float64) / math.sqrt(2.0)))


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


class AcceptanceProxy(ABC):
    """Maps draft vs target evidence (hidden states or logits, ``[T, D]``) to alpha."""

    name: str = ""
    evidence: str = ""  # "hidden" (final hidden states) or "logits"

    @abstractmethod
    def alpha(self, draft: Any, target: Any) -> float:
        """Predicted per-token acceptance in [0, 1] from ``[T, D]`` draft and target evidence."""


class CosineProxy(AcceptanceProxy):
    """Cosine similarity of final hidden states, mapped by ``Phi(kappa*c/sqrt(1-c^2) - beta)``.

    ``kappa`` is the logit margin of the top token over its runner-up in units of the
    perturbation's noise; ``beta`` >= 0 absorbs competition from many tokens.  Both are fitted
    by ``fit`` to measured (cosine, top-1 agreement) pairs; the defaults were fitted that way
    on SmolLM2-135M-Instruct (see ``docs/theory.md``).
    """

    name = "cosine"
    evidence = "hidden"

    def __init__(self, kappa: float = 0.25, beta: float = 1.0) -> None:
        if not (math.isfinite(kappa) and kappa > 0):
            raise KnapSpecError(f"kappa must be a positive number, got {kappa!r}")
        if not (math.isfinite(beta) and beta >= 0):
            raise KnapSpecError(f"beta must be a non-negative number, got {beta!r}")
        self.kappa = float(kappa)
        self.beta = float(beta)

    def alpha_from_cosine(self, c: float | np.ndarray) -> np.ndarray | float:
        """Map cosine similarity ``c`` in [-1, 1] (scalar or array) to alpha in [0, 1]."""
        c = np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0)
        s = np.sqrt(np.maximum(1.0 - c * c, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(s > 0, self.kappa * c / np.where(s > 0, s, 1.0), np.sign(c) * np.inf)
        out = _normal_cdf(z - self.beta)
        return float(out) if out.ndim == 0 else out

    def alpha(self, draft: Any, target: Any) -> float:
        # mean of per-position acceptance, not acceptance of the mean cosine
        return float(np.mean(self.alpha_from_cosine(cosine_similarity(draft, target))))

    @classmethod
    def fit(cls, cosines: Any, accept: Any) -> CosineProxy:
        """Least-squares fit of (kappa, beta) to per-sample cosines and 0/1 (or rate) acceptance."""
        c = np.clip(np.asarray(cosines, dtype=np.float64).ravel(), -1 + 1e-9, 1 - 1e-12)
        y = np.asarray(accept, dtype=np.float64).ravel()
        if c.shape != y.shape or c.size < 2:
            raise KnapSpecError("fit needs matching arrays of at least 2 cosines and acceptances")
        x = c / np.sqrt(1.0 - c * c)
        best = (np.inf, 0.25, 1.0)
        for kappa in np.geomspace(1e-3, 10.0, 121):
            for beta in np.linspace(0.0, 4.0, 81):
                err = float(np.mean((_normal_cdf(kappa * x - beta) - y) ** 2))
                if err < best[0]:
                    best = (err, kappa, beta)
        return cls(kappa=float(best[1]), beta=float(best[2]))

    def __repr__(self) -> str:
        return f"CosineProxy(kappa={self.kappa:.4g}, beta={self.beta:.4g})"


class Top1Proxy(AcceptanceProxy):
    """Fraction of positions where the draft's and target's argmax tokens agree."""

    name = "top1"
    evidence = "logits"

    def alpha(self, draft: Any, target: Any) -> float:
        d, t = _pair(draft, target)
        return float(np.mean(d.argmax(axis=1) == t.argmax(axis=1)))


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
        p, q = _softmax(d, self.temperature), _softmax(t, self.temperature)
        return float(np.mean(1.0 - 0.5 * np.abs(p - q).sum(axis=1)))


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
