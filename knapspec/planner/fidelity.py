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
    """``[2 * n_layers]`` default scores (measured on SmolLM2-135M, resampled)."""
    text = resources.files("knapspec.data").joinpath(DEFAULT_PROFILE).read_text("utf-8")
    return _profile_from_obj(json.loads(text), n_layers, DEFAULT_PROFILE)


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
