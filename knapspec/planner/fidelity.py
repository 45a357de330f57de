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
LARGE_MODEL_HALF_SKIP_ALPHA = 0.85  # see default_block_scores


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


def default_block_scores(n_layers: int, half_skip_alpha: float | None = None) -> np.ndarray:
    """``[2 * n_layers]`` default scores: measured on SmolLM2-135M, resampled by depth.

    Args:
        n_layers: layers of the target model.
        half_skip_alpha: if given, rescale the profile so that skipping the least important
            half of the skippable blocks (first and last layer pinned) is predicted, by the
            default ``CosineProxy``, to be accepted with this probability.  The measured
            profile of a 135M model is far too pessimistic for 7-70B models, which are much
            more redundant (self-speculative papers report acceptance around 0.8-0.9 with
            40-50% of layers skipped on 7-13B models: SWIFT, Xia et al., 2024; CLaSp, Chen
            et al., 2025); ``knapspec plan`` uses 0.85 for models other than SmolLM2-135M.
    """
    text = resources.files("knapspec.data").joinpath(DEFAULT_PROFILE).read_text("utf-8")
    scores = _profile_from_obj(json.loads(text), n_layers, DEFAULT_PROFILE)
    if half_skip_alpha is None:
        return scores
    if not 0.0 < half_skip_alpha < 1.0:
        raise KnapSpecError(f"half_skip_alpha must lie in (0, 1), got {half_skip_alpha!r}")
    inner = np.sort(scores[2:-2]) if n_layers > 2 else np.sort(scores)
    half = inner[: max(len(inner) // 2, 1)]  # the least important half of the skippable
    lo, hi = 0.0, 1.0  # bisection on the scale k: acceptance of skipping `half` at k
    if half.sum() <= 0:
        return scores
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if additive_alpha(half * mid) > half_skip_alpha:
            lo = mid
        else:
            hi = mid
    return scores * lo


def block_log_acceptance(scores: np.ndarray, proxy: Any = None) -> np.ndarray:
    """``-log alpha_b`` per block: the acceptance lost when block ``b`` alone is skipped.

    ``alpha_b`` maps the block's cosine ``1 - scores[b]`` through the cosine proxy.
    """
    from .proxies import CosineProxy

    proxy = proxy or CosineProxy()
    a = np.asarray(proxy.alpha_from_cosine(1.0 - np.asarray(scores, dtype=np.float64)))
    return -np.log(np.clip(a, 1e-12, 1.0))


def additive_alpha(skipped_scores: np.ndarray, proxy: Any = None) -> float:
    """Acceptance of skipping blocks with these scores: ``prod_b alpha_b``.

    Assumes each skipped block independently breaks a token (``docs/theory.md``).
    """
    return float(np.exp(-block_log_acceptance(skipped_scores, proxy).sum()))


def default_scores_for_spec(name: str, n_layers: int) -> np.ndarray:
    """The default profile for a named model spec: measured as is for SmolLM2-135M, rescaled
    to ``LARGE_MODEL_HALF_SKIP_ALPHA`` for other (larger) models."""
    if name == MEASURED_MODEL:
        return default_block_scores(n_layers)
    return default_block_scores(n_layers, half_skip_alpha=LARGE_MODEL_HALF_SKIP_ALPHA)


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
