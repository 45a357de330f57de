"""The configuration's keys as text: ``docs/config.md``'s key reference and the commented
``knapspec.toml`` that ``knapspec config init`` writes.

Both are generated from the section dataclasses' field metadata and the backend registry in
``knapspec.config``, so the docs, the default file and the validation never disagree
(``tests/test_config.py`` checks ``docs/config.md`` against ``reference_markdown()``).
This module only reads the config model; ``knapspec.config`` never imports it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from .backends import BackendOption
from .config import SECTIONS, all_backend_options


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (strings, numbers, booleans, arrays of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")  # pragma: no cover


def _section_fields(name: str) -> list[dataclasses.Field]:
    fields = dataclasses.fields(SECTIONS[name])
    return [f for f in fields if "help" in f.metadata]


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _type_text(meta: Mapping[str, Any]) -> str:
    kind = meta["kind"]
    base = {"str": "string", "path": "string (path)", "int": "integer", "float": "float",
            "bool": "boolean", "strategy": "string", "int-list": "array of integers",
            "str-list": "array of strings"}[kind]
    lo, above, hi = meta.get("minimum"), meta.get("above"), meta.get("maximum")
    bounds = [f">= {lo:g}" if lo is not None and kind != "int-list" else "",
              f"> {above:g}" if above is not None else "", f"<= {hi:g}" if hi is not None
              else ""]
    bound = ", ".join(b for b in bounds if b)
    return f"{base} {bound}".strip()


def _option_type_text(o: BackendOption) -> str:
    base = {int: "integer >= 1", float: "float >= 0", bool: "boolean", str: "string"}[o.type]
    return base


def _meaning(meta: Mapping[str, Any]) -> str:
    text = meta["help"]
    if meta["choices"]:
        text += ": " + ", ".join(f"`{c}`" for c in meta["choices"])
    if meta["strategies"]:
        text += " (strategies: " + ", ".join(meta["strategies"]) + ")"
    return text


def _default_text(f: dataclasses.Field) -> str:
    d = _field_default(f)
    if d is None:
        return f"unset: {f.metadata['default_text']}"
    return f"`{toml_value(list(d) if isinstance(d, tuple) else d)}`"


def reference_markdown() -> str:
    """The key reference of ``docs/config.md``, generated from the dataclasses and the
    backend registry (``tests/test_config.py`` checks the file against it)."""
    lines = []
    for name in SECTIONS:
        lines += [f"### `[{name}]`", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for f in _section_fields(name):
            lines.append(f"| `{name}.{f.name}` | {_type_text(f.metadata)} | "
                         f"{_default_text(f)} | {_meaning(f.metadata)} |")
        if name == "backend":
            for key, (o, names) in sorted(all_backend_options().items()):
                choices = (": " + ", ".join(f"`{c}`" for c in o.choices)) if o.choices else ""
                default = "unset: the backend's choice" if o.default is None else \
                    f"`{toml_value(o.default)}`"
                lines.append(f"| `backend.{key}` | {_option_type_text(o)} | {default} | "
                             f"{o.help}{choices} (backends: {', '.join(names)}) |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _comment(text: str, width: int = 92) -> list[str]:
    """``text`` as ``# `` comment lines of at most ``width`` characters."""
    out, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            out.append(line)
            line = "#"
        line += " " + word
    out.append(line)
    return out


def default_toml() -> str:
    """A commented ``knapspec.toml`` holding the defaults (what ``config init`` writes).

    Loading it gives ``KnapSpecConfig()``: keys without a fixed default are commented out.
    """
    lines = [
        "# knapspec configuration.  Every key is optional; the values shown are the defaults,",
        "# commented-out keys are unset.  Flags on the command line override this file;",
        "# `knapspec config show --config FILE` prints the effective configuration and where",
        "# each value came from.  Every key is described in docs/config.md.",
        "# Relative paths are relative to this file's folder.",
    ]
    for name in SECTIONS:
        lines += ["", f"[{name}]"]
        for f in _section_fields(name):
            meta = f.metadata
            text = _meaning(meta) + f" [{_type_text(meta)}]"
            d = _field_default(f)
            if d is None:
                text += f"; unset: {meta['default_text']}"
            lines += _comment(text)
            if d is None:
                lines.append(f"# {f.name} = {toml_value(meta['example'])}")
            else:
                hash_ = "# " if meta["commented"] else ""
                value = toml_value(list(d) if isinstance(d, tuple) else d)
                lines.append(f"{hash_}{f.name} = {value}")
        if name == "backend":
            lines += ["", "# Backend options, for every backend here or for one backend in a",
                      "# [backend.<name>] table (used only when that backend runs).  A backend",
                      "# rejects an option it does not take."]
            for key, (o, names) in sorted(all_backend_options().items()):
                choices = f" ({', '.join(map(str, o.choices))})" if o.choices else ""
                default = "" if o.default is None else f"; default {toml_value(o.default)}"
                lines += _comment(f"{key}: {o.help}{choices}{default}; "
                                  f"backends: {', '.join(names)}")
            lines += ["#", "# [backend.torch-compile]", '# compile_mode = "max-autotune"']
    return "\n".join(lines) + "\n"


__all__ = ["default_toml", "reference_markdown", "toml_value"]
