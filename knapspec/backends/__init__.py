"""Backends: adapters that run the model's blocks under a skip mask and measure latencies.

Backends are looked up by name, so swapping one is a configuration change::

    backend = create_backend("torch", model=None, threads=2)

Each entry is imported lazily: the planner never pulls in torch or llama.cpp.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import KnapSpecError, MissingDependencyError
from .base import Backend

#: name -> ("module:Class", pip extra that provides its dependencies)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("knapspec.backends.torch_eager:TorchEagerBackend", "torch"),
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name``; a clear error if unknown or not installed."""
    try:
        target, extra = BACKENDS[name]
    except KeyError:
        raise KnapSpecError(
            f"unknown backend {name!r} (available: {', '.join(sorted(BACKENDS))})"
        ) from None
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise MissingDependencyError(
            f"backend {name!r} needs {e.name}: pip install 'knapspec[{extra}]'"
        ) from None
    return getattr(module, cls_name)


def create_backend(name: str, **options: Any) -> Backend:
    """Build the backend ``name`` with backend-specific ``options``."""
    return backend_class(name)(**options)


__all__ = ["BACKENDS", "Backend", "backend_class", "create_backend"]
