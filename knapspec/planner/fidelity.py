"""Per-block fidelity profiles: how much skipping each block alone hurts drafting.

A profile gives, for every block, ``1 - cos(h_full, h_skip_b)`` of the final hidden states
when block ``b`` alone is skipped.  The default profile shipped with knapspec was measured
on SmolLM2-135M-Instruct over real text by ``scripts/measure_fidelity.py`` (the file records
how).  For a model with another depth it is resampled by relative depth (linear
interpolation over ``layer / (L - 1)``) and scaled by ``L_measured / L`` so that the total
fidelity loss of skipping every block stays comparable; this is a heuristic, and a profile
measured on the target model itself (``--scores FILE``, or a backend's measurement) should be
preferred whenever available.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KnapSpecError

DEFAULT_PROFILE = "fidelity_smollm2-135m.json"
MEASURED_MODEL = "smollm2-135m"  # the model spec the default profile was measured on
#: (fraction of inner blocks skipped, least important first; predicted acceptance) for
#: 7-70B models: self-speculative papers report ~0.8-0.9 acceptance with 40-50% of layers
#: skipped and a collapse beyond (SWIFT, Xia et al., 2024; CLaSp, Chen et al., 2025).
LARGE_MODEL_ANCHORS = ((0.5, 0.85), (0.75, 0.3))


def _interleave(attn: np.ndarray, mlp: np.ndarray) -> np.ndarray:
    out = np.empty(2 * len(attn), dtype=np.float64)
    out[0::2] = attn
    out[1::2] = mlp
    return out


def resample_profile(attn: np.ndarray, mlp: np.ndarray, n_layers: int) -> np.ndarray:
    """``[2 * n_layers]`` scores resampled from per-layer ``attn`` and ``mlp`` profiles ``[L0]``."""
    attn = np.asarray(attn, dtype=np.float64)
    mlp = np.asarray(mlp, dtype=np.float64)
    src_layers = len(attn)
    if src_layers == n_layers:
        return _interleave(attn, mlp)
    x_src = np.linspace(0.0, 1.0, src_layers)
    x_dst = np.linspace(0.0, 1.0, n_layers) if n_layers > 1 else np.zeros(1)
    scale = src_layers / n_layers
    return _interleave(np.interp(x_dst, x_src, attn) * scale, np.interp(x_dst, x_src, mlp) * scale)


def _profile_from_obj(obj: Any, n_layers: int, where: str) -> np.ndarray:
    if isinstance(obj, dict) and "scores" in obj:
        s = np.asarray(obj["scores"], dtype=np.float64)
        if s.ndim != 1 or len(s) % 2:
            raise KnapSpecError(f"{where}: 'scores' must be a list of 2L numbers")
        attn, mlp = s[0::2], s[1::2]
    elif isinstance(obj, dict) and "attention" in obj and "mlp" in obj:
        attn = np.asarray(obj["attention"], dtype=np.float64)
        mlp = np.asarray(obj["mlp"], dtype=np.float64)
        if attn.ndim != 1 or attn.shape != mlp.shape or attn.size == 0:
            raise KnapSpecError(f"{where}: 'attention' and 'mlp' must be equal-length lists")
    else:
        raise KnapSpecError(
            f"{where}: expected an object with 'scores' (2L numbers) or "
            "'attention' and 'mlp' (L numbers each)"
        )
    if not (np.isfinite(attn).all() and np.isfinite(mlp).all()):
        raise KnapSpecError(f"{where}: scores contain NaN or inf")
    if (attn < 0).any() or (mlp < 0).any():
        raise KnapSpecError(f"{where}: scores must be non-negative")
    return resample_profile(attn, mlp, n_layers)


def default_block_scores(n_layers: int) -> np.ndarray:
    """``[2 * n_layers]`` default scores: measured on SmolLM2-135M, resampled by depth."""
    text = resources.files("knapspec.data").joinpath(DEFAULT_PROFILE).read_text("utf-8")
    return _profile_from_obj(json.loads(text), n_layers, DEFAULT_PROFILE)


def _cosine_for_alpha(alpha: float) -> float:
    """The cosine the default ``CosineProxy`` maps to ``alpha`` (bisection)."""
    from .proxies import CosineProxy

    proxy, lo, hi = CosineProxy(), 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if proxy.alpha_from_cosine(mid) < alpha else (lo, mid)
    return hi


def calibrate_profile(
    scores: np.ndarray, anchors: tuple[tuple[float, float], tuple[float, float]]
) -> tuple[np.ndarray, float]:
    """Rescale a profile and choose a compounding exponent from two (fraction, alpha) anchors.

    Fits ``k`` and ``p`` so that skipping the least important ``fraction`` of the inner blocks
    (first and last layer pinned) gives ``alpha`` under ``1 - cos = (sum of k * s_b) ** p``.
    Returns the scaled scores ``k * s`` and ``p``.
    """
    inner = np.sort(scores[2:-2]) if len(scores) > 4 else np.sort(scores)
    (f1, a1), (f2, a2) = anchors
    s1 = inner[: max(round(f1 * len(inner)), 1)].sum()
    s2 = inner[: max(round(f2 * len(inner)), 1)].sum()
    x1, x2 = 1.0 - _cosine_for_alpha(a1), 1.0 - _cosine_for_alpha(a2)
    if not (s2 > s1 > 0 and x2 > x1 > 0):
        raise KnapSpecError("calibration anchors must grow in skipped fraction and shrink in alpha")
    p = float(np.log(x2 / x1) / np.log(s2 / s1))
    k = x1 ** (1.0 / p) / s1
    return scores * k, p


def additive_alpha(
    skipped_scores: np.ndarray, compounding: float = 1.0, proxy: Any = None
) -> float:
    """Acceptance of skipping blocks with these scores: ``alpha(1 - sum(scores) ** p)``.

    Losses ``1 - cos`` of (near-)orthogonal perturbations add (``docs/theory.md``);
    ``compounding`` ``p >= 1`` lets the loss grow faster than additively when many blocks go.
    """
    from .proxies import CosineProxy

    proxy = proxy or CosineProxy()
    loss = float(np.sum(skipped_scores)) ** compounding
    return float(proxy.alpha_from_cosine(1.0 - loss))


def default_scores_for_spec(name: str, n_layers: int) -> tuple[np.ndarray, float]:
    """The default profile and compounding exponent for a named model spec.

    For SmolLM2-135M, the measured profile with plain additivity (``p = 1``).  For other
    (larger) models the measured profile of a 135M model is far too pessimistic (7-70B models
    are much more redundant), so it is recalibrated to ``LARGE_MODEL_ANCHORS``.
    """
    scores = default_block_scores(n_layers)
    if name == MEASURED_MODEL:
        return scores, 1.0
    return calibrate_profile(scores, LARGE_MODEL_ANCHORS)


def load_block_scores(path: str | Path, n_layers: int) -> np.ndarray:
    """Scores from a JSON file (``{"scores": [...]}`` or ``{"attention": [...], "mlp": [...]}``)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        raise KnapSpecError(f"scores file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KnapSpecError(f"cannot read scores file {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise KnapSpecError(f"scores file {p} is not valid JSON: {e}") from None
    return _profile_from_obj(obj, n_layers, str(p))
