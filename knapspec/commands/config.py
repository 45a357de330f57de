"""``knapspec config``: show the effective configuration, or write a commented default file.

Examples::

    knapspec config init                       # writes ./knapspec.toml
    knapspec config show --config knapspec.toml --backend llamacpp
    knapspec config show --config knapspec.toml --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import KnapSpecError
from .common import add_backend_arguments, add_generation_arguments, add_planner_arguments

DEFAULT_PATH = "knapspec.toml"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "config",
        help="show the effective configuration, or write a commented default knapspec.toml",
        description="knapspec.toml holds the model, backend, planner, cost model and "
        "generation settings every command reads with --config FILE; flags override it.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    show = actions.add_parser(
        "show", help="print the effective configuration and where each value came from",
        description="The configuration a command would use with the same --config and flags: "
        "each value with its source (default, the file, or command line).",
    )
    add_backend_arguments(show)
    add_planner_arguments(show)
    add_generation_arguments(show)
    show.add_argument("--json", action="store_true",
                      help='print {"config": ..., "sources": {key: source}} as JSON')
    show.set_defaults(func=run_show)
    init = actions.add_parser(
        "init", help="write a commented knapspec.toml holding the defaults",
        description="Write every key with its default and meaning (atomically); loading the "
        "file gives the defaults back.",
    )
    init.add_argument("path", nargs="?", default=DEFAULT_PATH,
                      help=f"where to write it (default: {DEFAULT_PATH})")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=run_init)


def render(config: Any) -> str:
    """The effective configuration as TOML, each line followed by ``# source``; unset keys
    and the chosen backend's untouched options as comments with their defaults."""
    import dataclasses

    from ..backends import BACKENDS
    from ..config import SECTIONS
    from ..config_docs import toml_value

    def line(key: str, value: str, source: str) -> str:
        return f"{key} = {value}".ljust(40) + f"  # {source}"

    out = ["# effective configuration; after each value, where it came from"]
    data = config.to_dict()
    for name in SECTIONS:
        out += ["", f"[{name}]"]
        section = getattr(config, name)
        if name == "backend":
            out.append(line("name", toml_value(section.name), config.source_of("backend.name")))
            for key, value in section.options.items():
                out.append(line(key, toml_value(value), config.source_of(f"backend.{key}")))
            for o in BACKENDS[section.name].options:
                if o.name not in section.options and o.name not in section.per_backend.get(
                        section.name, {}):
                    default = ("the backend's choice" if o.default is None
                               else toml_value(o.default))
                    out.append(f"# {o.name}: unset ({default})".ljust(40) + "  # default")
            for b, opts in section.per_backend.items():
                used = "" if b == section.name else f"  # used when {b} runs"
                out += ["", f"[backend.{b}]{used}"]
                for key, value in opts.items():
                    out.append(line(key, toml_value(value),
                                    config.source_of(f"backend.{b}.{key}")))
            continue
        for f in dataclasses.fields(section):
            value = data[name][f.name]
            src = config.source_of(f"{name}.{f.name}")
            if value is None:
                out.append(f"# {f.name}: unset ({f.metadata['default_text']})".ljust(40) +
                           f"  # {src}")
            else:
                out.append(line(f.name, toml_value(value), src))
    return "\n".join(out) + "\n"


def run_show(args: argparse.Namespace) -> int:
    from .common import load_config

    config = load_config(args)
    if args.json:
        json.dump({"config": config.to_dict(), "sources": config.sources()}, sys.stdout,
                  indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(config))
    return 0


def run_init(args: argparse.Namespace) -> int:
    from .._io import atomic_write_text
    from ..config_docs import default_toml

    path = Path(args.path)
    if path.exists() and not args.force:
        raise KnapSpecError(f"{path} exists; use --force to overwrite it")
    atomic_write_text(path, default_toml())
    sys.stdout.write(f"wrote {path}\n")
    return 0
