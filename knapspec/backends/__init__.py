"""Backends: adapters that run the model's blocks under a skip mask and measure latencies.

Backends are looked up by name, so swapping one is a configuration change::

    backend = create_backend("torch", model=None, threads=2)

Each entry is imported lazily: the planner never pulls in torch or llama.cpp.  Every entry
declares the constructor options it accepts (name, type, default, meaning), so a
configuration can be validated, documented and rejected ("option X is not supported by
backend Y") without importing the backend's heavy dependencies.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import KnapSpecError, MissingDependencyError
from .base import Backend


@dataclass(frozen=True)
class BackendOption:
    """One constructor option of a backend (besides ``model``, which every backend takes)."""

    name: str  # keyword argument of the backend's constructor
    type: type  # int, float, str or bool (the value type in a TOML file)
    default: Any  # the constructor's default (None: decided by the backend, see help)
    help: str  # one line: meaning and units
    choices: tuple[Any, ...] = ()  # allowed values, if a closed set
    # a regular expression the whole value must match (an open set, e.g. cuda:N), and
    # the allowed values in words for the error message
    pattern: str = ""
    pattern_text: str = ""


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives and what it accepts."""

    target: str  # "module:Class"
    extra: str  # pip extra that installs its dependencies
    description: str  # one line for listings and docs
    options: tuple[BackendOption, ...]  # accepted constructor options


_THREADS = BackendOption("threads", int, None, "CPU threads (default: the library's own choice)")
_MAX_CONTEXT = BackendOption(
    "max_context", int, None, "KV cache size in tokens (default: the model's context length)"
)
_TORCH_OPTIONS = (
    BackendOption("device", str, "auto",
                  "where the model runs: auto (CUDA when torch sees a GPU, else the CPU), cpu, "
                  "cuda (= cuda:0) or cuda:N",
                  pattern=r"auto|cpu|cuda(:[0-9]+)?", pattern_text="auto, cpu, cuda or cuda:N"),
    BackendOption("dtype", str, "auto",
                  "parameter and activation dtype (auto: bfloat16 on CUDA, float32 on the CPU)",
                  ("auto", "float32", "bfloat16", "float16")),
    _THREADS,
    _MAX_CONTEXT,
    BackendOption("capture_tokens", int, 8,
                  "last verified tokens whose hidden states the planner's oracle keeps"),
)

#: name -> where the backend lives, its pip extra and its options
BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry(
        "knapspec.backends.torch.eager:TorchEagerBackend", "torch",
        "PyTorch eager: Hugging Face Llama-like models, any device torch supports",
        _TORCH_OPTIONS,
    ),
    "torch-compile": BackendEntry(
        "knapspec.backends.torch.compile:TorchCompileBackend", "torch",
        "PyTorch with the per-block functions compiled by torch.compile",
        (
            *_TORCH_OPTIONS,
            BackendOption("compile_mode", str, "default", "torch.compile mode",
                          ("default", "reduce-overhead", "max-autotune",
                           "max-autotune-no-cudagraphs")),
            BackendOption("prepack", str, "auto",
                          "CPU: each linear weight's small-M kernel (auto: the fastest of "
                          "F.linear, oneDNN-prepacked and numba, measured per shape at setup; "
                          "on: oneDNN; numba: the numba kernel; off: F.linear)",
                          ("auto", "on", "numba", "off")),
            BackendOption("static_steps", str, "auto",
                          "fixed-shape decode/draft/verify steps captured as CUDA graphs "
                          "(auto: on CUDA only)", ("auto", "on", "off")),
        ),
    ),
    "llamacpp": BackendEntry(
        "knapspec.backends.llamacpp:LlamaCppBackend", "llamacpp",
        "llama.cpp through llama-cpp-python: GGUF models; drafts are per-mask GGUF files",
        (
            _THREADS,
            _MAX_CONTEXT,
            BackendOption("flash_attn", bool, True,
                          "llama.cpp flash attention for target and drafts (fewer batch-size "
                          "rounding differences between verification and plain decoding)"),
            BackendOption("draft_pool", int, 4, "draft models kept loaded (one per mask)"),
            BackendOption("draft_cache_mb", int, 2048,
                          "size bound of the on-disk draft GGUF cache, in MiB"),
        ),
    ),
}


def backend_entry(name: str) -> BackendEntry:
    """The registry entry of ``name``; a clear error naming the known backends if unknown."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise KnapSpecError(
            f"unknown backend {name!r} (available: {', '.join(sorted(BACKENDS))})"
        ) from None


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name``; a clear error if unknown or not installed."""
    entry = backend_entry(name)
    module_name, cls_name = entry.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("knapspec"):
            raise
        raise MissingDependencyError(
            f"backend {name!r} needs {e.name}: pip install 'knapspec[{entry.extra}]'"
        ) from None
    return getattr(module, cls_name)


def check_backend_options(name: str, options: dict[str, Any]) -> None:
    """Reject options the backend ``name`` does not declare, naming option and backend."""
    known = {o.name for o in backend_entry(name).options}
    for key in options:
        if key not in known:
            raise KnapSpecError(
                f"option {key!r} is not supported by backend {name!r} "
                f"(it takes: {', '.join(sorted(known))})"
            )


def create_backend(name: str, **options: Any) -> Backend:
    """Build the backend ``name`` with ``model`` and its declared ``options``."""
    check_backend_options(name, {k: v for k, v in options.items() if k != "model"})
    return backend_class(name)(**options)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendEntry",
    "BackendOption",
    "backend_class",
    "backend_entry",
    "check_backend_options",
    "create_backend",
]
