"""Saving and loading cost models as JSON.

File format (UTF-8 JSON object)::

    {
      "schema": "knapspec.costmodel",
      "version": 1,
      "kind": "linear" | "table" | "roofline" | <any registered kind>,
      "params": {...},   # the model's ``to_dict()``
      "meta": {...}      # free-form provenance (optional on load)
    }

Saving is atomic: the JSON is fully serialised first, written to a temporary file in
the target directory, flushed to disk, then renamed over the target with ``os.replace``;
on any error the temporary file is removed and an existing target is left untouched.
Every problem on load raises ``KnapSpecError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text
from ..errors import KnapSpecError

# Importing the model modules registers their kinds in COST_MODEL_KINDS.
from . import linear, roofline, table  # noqa: F401
from .base import COST_MODEL_KINDS, CostModel

logger = logging.getLogger(__name__)

SCHEMA = "knapspec.costmodel"
VERSION = 1


def cost_model_to_json(model: CostModel) -> dict[str, Any]:
    """The JSON object (a dict) that ``save_cost_model`` writes for ``model``."""
    if not isinstance(model, CostModel):
        raise KnapSpecError(f"expected a CostModel, got {type(model).__name__}")
    if COST_MODEL_KINDS.get(model.kind) is not type(model):
        raise KnapSpecError(
            f"{type(model).__name__} (kind {model.kind!r}) is not registered; "
            "decorate it with @register_cost_model"
        )
    out = {
        "schema": SCHEMA,
        "version": VERSION,
        "kind": model.kind,
        "params": model.to_dict(),
        "meta": dict(model.meta),
    }
    if model.draft_heads:  # reduced draft heads (seconds by K), optional on load
        out["draft_heads"] = {str(k): float(v) for k, v in sorted(model.draft_heads.items())}
    if model.vocab_size:
        out["vocab_size"] = int(model.vocab_size)
    return out


def cost_model_from_json(obj: Any, source: str = "<json>") -> CostModel:
    """Rebuild a cost model from the object ``cost_model_to_json`` produced.

    ``source`` (a path or description) prefixes every error message.
    """
    if not isinstance(obj, dict):
        raise KnapSpecError(
            f"{source}: expected a JSON object at top level, got {type(obj).__name__}"
        )
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise KnapSpecError(
            f"{source}: not a knapspec cost model (schema {schema!r}, expected {SCHEMA!r})"
        )
    version = obj.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise KnapSpecError(
            f"{source}: unsupported cost-model file version {version!r} "
            f"(this knapspec reads version {VERSION})"
        )
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in COST_MODEL_KINDS:
        raise KnapSpecError(
            f"{source}: unknown cost-model kind {kind!r}; known kinds: "
            f"{', '.join(sorted(COST_MODEL_KINDS))}"
        )
    if "params" not in obj:
        raise KnapSpecError(f"{source}: missing 'params'")
    params = obj["params"]
    if not isinstance(params, dict):
        raise KnapSpecError(f"{source}: 'params' must be an object, got {type(params).__name__}")
    meta = obj.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise KnapSpecError(f"{source}: 'meta' must be an object, got {type(meta).__name__}")
    try:
        model = COST_MODEL_KINDS[kind].from_dict(params, meta)
        model.draft_heads.update(_draft_heads(obj.get("draft_heads", {}), source))
        vocab = obj.get("vocab_size")
        if vocab is not None:
            if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
                raise KnapSpecError(f"vocab_size must be a positive integer, got {vocab!r}")
            model.vocab_size = vocab
        return model
    except KnapSpecError as e:
        raise KnapSpecError(f"{source}: invalid {kind} params: {e}") from e
    except (TypeError, ValueError, KeyError) as e:  # a third-party kind's own errors
        raise KnapSpecError(f"{source}: invalid {kind} params: {e!r}") from e


def _draft_heads(obj: Any, source: str) -> dict[int, float]:
    """``{"K": seconds}`` of a cost-model file as ``{K: seconds}``, checked."""
    if not isinstance(obj, dict):
        raise KnapSpecError(f"{source}: 'draft_heads' must be an object of K: seconds")
    out = {}
    for k, v in obj.items():
        try:
            kk, vv = int(k), float(v)
        except (TypeError, ValueError):
            raise KnapSpecError(f"{source}: draft_heads: bad entry {k!r}: {v!r}") from None
        if kk < 1 or not np.isfinite(vv) or vv < 0:
            raise KnapSpecError(f"{source}: draft_heads: bad entry {k!r}: {v!r}")
        out[kk] = vv
    return out


def _json_default(obj: Any) -> Any:
    """Let numpy scalars and arrays (common in ``meta``) serialise as plain JSON."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def save_cost_model(model: CostModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` as JSON, atomically; return the path.

    Raises:
        KnapSpecError: the model does not serialise to strict JSON (e.g. a NaN or an
            arbitrary object in ``meta``; numpy scalars and arrays are converted), or the
            file cannot be written (the message names it).
    """
    path = Path(path)
    try:
        text = json.dumps(
            cost_model_to_json(model), indent=2, allow_nan=False, default=_json_default
        ) + "\n"
    except (TypeError, ValueError) as e:
        if isinstance(e, KnapSpecError):
            raise
        raise KnapSpecError(f"{path}: cost model is not JSON-serialisable: {e}") from e
    try:
        atomic_write_text(path, text)
    except (OSError, KnapSpecError) as e:
        why = getattr(e, "strerror", None) or e
        raise KnapSpecError(f"{path}: cannot write cost model: {why}") from e
    logger.info("saved %s cost model to %s", model.kind, path)
    return path


def load_cost_model(path: str | os.PathLike[str]) -> CostModel:
    """Read a cost model written by ``save_cost_model``.

    Raises:
        KnapSpecError: naming ``path`` and the problem: unreadable file, not JSON, wrong
            schema, unsupported version, unknown kind (listing the known ones), or
            missing / invalid params.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KnapSpecError(f"{path}: not a UTF-8 text file: {e}") from e
    except OSError as e:
        raise KnapSpecError(f"{path}: cannot read cost model: {e.strerror or e}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise KnapSpecError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e
    return cost_model_from_json(obj, source=str(path))
