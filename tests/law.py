"""A chi-square check that sampled token sequences follow an exact law (shared by the
rejection-sampling tests)."""

from __future__ import annotations

from typing import Any

import numpy as np


def assert_follows(scipy_stats: Any, counts: np.ndarray, joint: np.ndarray) -> None:
    """Counts of sampled sequences (any shape) against their exact probabilities ``joint``
    (same shape): nothing outside the support, and a chi-square p-value above 1e-3, with
    cells expected fewer than 5 times pooled so the approximation holds."""
    n = counts.sum()
    keep = joint.ravel() > 0
    assert counts.ravel()[~keep].sum() == 0  # nothing outside the target's support
    expected = joint.ravel()[keep] * n
    rare = expected < 5
    obs, exp = counts.ravel()[keep][~rare], expected[~rare]
    if rare.any():
        obs = np.append(obs, counts.ravel()[keep][rare].sum())
        exp = np.append(exp, expected[rare].sum())
    stat, pval = scipy_stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert pval > 1e-3, (stat, pval)
