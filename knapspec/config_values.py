"""Value checks of ``knapspec.toml`` keys and backend options: each returns the value
(normalized: lists become tuples) or raises a ``KnapSpecError`` that names the key path and
says what was expected and what was given."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .backends import BackendOption
from .errors import KnapSpecError
from .planner.factory import strategy_names, unknown_strategy


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", tuple: "an array", dict: "a table"}.get(type(value),
                                                                     type(value).__name__)


def got(value: Any) -> str:
    return f"{value!r}" if isinstance(value, (int, float, str)) else _type_name(value)


def _check_int(path: str, value: Any, minimum: float | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnapSpecError(f"{path}: expected an integer, got {got(value)}")
    if minimum is not None and value < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(
            int(minimum), f"an integer >= {minimum:g}")
        raise KnapSpecError(f"{path}: expected {what}, got {value!r}")
    return value


def _check_float(path: str, value: Any, meta: Mapping[str, Any]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KnapSpecError(f"{path}: expected a number, got {got(value)}")
    v = float(value)
    lo, above, hi = meta.get("minimum"), meta.get("above"), meta.get("maximum")
    ok = (math.isfinite(v) and (lo is None or v >= lo) and (above is None or v > above)
          and (hi is None or v <= hi))
    if not ok:
        bounds = [f">= {lo:g}" if lo is not None else "", f"> {above:g}" if above is not None
                  else "", f"<= {hi:g}" if hi is not None else ""]
        bound = " and ".join(b for b in bounds if b)
        raise KnapSpecError(f"{path}: expected a finite number {bound}".rstrip() +
                            f", got {value!r}")
    return v


def _check_str(path: str, value: Any, choices: tuple[Any, ...] = ()) -> str:
    if not isinstance(value, str):
        raise KnapSpecError(f"{path}: expected a string, got {got(value)}")
    if choices and value not in choices:
        raise KnapSpecError(
            f"{path}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_value(path: str, value: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` checked against field metadata ``meta``; normalized (lists -> tuples)."""
    kind = meta["kind"]
    if kind == "int":
        return _check_int(path, value, meta["minimum"])
    if kind == "bool":
        if not isinstance(value, bool):
            raise KnapSpecError(f"{path}: expected a boolean, got {got(value)}")
        return value
    if kind == "strategy":
        if _check_str(path, value) not in strategy_names():
            raise KnapSpecError(f"{path}: {unknown_strategy(value)}")
        return value
    if kind == "float":
        return _check_float(path, value, meta)
    if kind in ("str", "path"):
        v = _check_str(path, value, meta["choices"])
        if not v.strip():
            raise KnapSpecError(f"{path}: expected a non-empty string, got {value!r}")
        return v
    if kind in ("int-list", "str-list"):
        if not isinstance(value, (list, tuple)):
            raise KnapSpecError(f"{path}: expected an array, got {got(value)}")
        if kind == "int-list":
            return tuple(_check_int(f"{path}[{i}]", v, meta["minimum"])
                         for i, v in enumerate(value))
        return tuple(_check_str(f"{path}[{i}]", v) for i, v in enumerate(value))
    raise AssertionError(f"unknown kind {kind!r}")  # pragma: no cover


def check_backend_option(path: str, option: BackendOption, value: Any) -> Any:
    """``value`` checked against a registry option (type, choices or pattern; counts must be
    >= 1)."""
    if option.type is bool:
        if not isinstance(value, bool):
            raise KnapSpecError(f"{path}: expected a boolean, got {got(value)}")
        return value
    if option.type is int:  # every integer backend option is a count or a size
        return _check_int(path, value, 1)
    if option.type is float:
        return _check_float(path, value, {"minimum": 0.0})
    value = _check_str(path, value, option.choices)
    if option.pattern and not re.fullmatch(option.pattern, value):
        raise KnapSpecError(f"{path}: expected {option.pattern_text or option.pattern}, "
                            f"got {value!r}")
    return value
