"""Strategies from other packages: the ``knapspec.strategies`` entry-point group.

A throwaway distribution (a package and its ``*.dist-info`` with ``entry_points.txt``) is
written to a temporary folder and put on the path, as ``pip install --target`` would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_backend import FakeBackend, fake_cost_model

from knapspec.blocks import BlockLayout
from knapspec.config import KnapSpecConfig
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.errors import KnapSpecError
from knapspec.planner import CalibratedPlanner, PlanContext, make_planner, strategy_names

ROOT = Path(__file__).resolve().parents[1]
PKG = "knapspec_test_plugin"

MODULE = '''
from knapspec.planner import Planner, select_plan


class MiddlePlanner(Planner):
    """Skips the MLP blocks of the middle third of the layers; TPT picks the draft length."""

    name = "middle"

    def __init__(self, layout, cost_model, max_draft_length=8, alpha=0.8):
        self.layout, self.cost_model = layout, cost_model
        self.max_draft_length, self.alpha = max_draft_length, alpha
        third = layout.n_layers // 3
        self.mask = layout.mask_from_blocks(2 * i + 1 for i in range(third, 2 * third))

    def plan(self, ctx):
        return select_plan(self.mask[None], [self.alpha], self.cost_model, ctx.context,
                           self.max_draft_length, strategy=self.name, force=True)


def build(layout, cost_model):
    return MiddlePlanner(layout, cost_model, max_draft_length=2, alpha=0.5)


def not_a_planner(layout, cost_model):
    return 42
'''

ENTRY_POINTS = f"""[knapspec.strategies]
middle = {PKG}:MiddlePlanner
middle-2 = {PKG}:build
not-a-planner = {PKG}:not_a_planner
missing = {PKG}:Nope
ar = {PKG}:MiddlePlanner
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A folder holding the plugin package and its dist-info, prepended to ``sys.path``."""
    (tmp_path / f"{PKG}.py").write_text(MODULE, encoding="utf-8")
    info = tmp_path / f"{PKG}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 0.1\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(ENTRY_POINTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop(PKG, None)


def test_registered_strategies_are_listed_after_the_built_in_ones(plugin):
    names = strategy_names()
    assert names[:6] == ("knapspec", "clasp", "static", "early-exit", "additive", "ar")
    assert {"middle", "middle-2", "not-a-planner", "missing"} <= set(names[6:])
    assert names.count("ar") == 1  # a plugin cannot replace a built-in strategy
    assert PKG not in sys.modules  # listing imports nothing


def test_a_registered_class_and_builder_plan_and_decode(plugin):
    planner = make_planner("middle", BlockLayout(6), fake_cost_model(), 3)
    assert isinstance(planner, CalibratedPlanner) and planner.name == "middle"
    assert planner.max_draft_length == 3  # make_planner passes its bound on
    plan = planner.plan(PlanContext(context=64))
    assert list(plan.mask.nonzero()[0]) == [5, 7] and plan.strategy == "middle"
    built = make_planner("middle-2", BlockLayout(6), fake_cost_model(), 8)
    assert built.inner.max_draft_length == 2 and built.alpha == 0.5  # the builder's choice
    assert built.max_draft_length == 2  # and calibration keeps to it
    be = FakeBackend(vocab=24, n_layers=6)
    cfg = GenerationConfig(max_new_tokens=30)
    ar = SpeculativeDecoder(be, make_planner("ar", be.layout, fake_cost_model()))
    res = SpeculativeDecoder(be, make_planner("middle", be.layout, fake_cost_model(), 3))
    out = res.generate([1, 2, 3], cfg)
    assert out.tokens == ar.generate([1, 2, 3], cfg).tokens and out.drafted > 0


def test_broken_registrations_are_one_line_errors(plugin):
    lay, cm = BlockLayout(6), fake_cost_model()
    with pytest.raises(KnapSpecError, match=r"built a int, not a knapspec\.planner\.Planner"):
        make_planner("not-a-planner", lay, cm)
    with pytest.raises(KnapSpecError, match=f"cannot load entry point '{PKG}:Nope'"):
        make_planner("missing", lay, cm)
    with pytest.raises(KnapSpecError, match=r"unknown strategy 'nope' \(available: .*middle"):
        make_planner("nope", lay, cm)


def test_config_validation_knows_registered_strategies(plugin):
    c = KnapSpecConfig.from_dict({"planner": {"strategy": "middle"}})
    assert c.planner.strategy == "middle" and PKG not in sys.modules
    with pytest.raises(KnapSpecError, match=r"planner\.strategy: unknown strategy 'midle' "
                                            r"\(available: .*middle-2"):
        KnapSpecConfig.from_dict({"planner": {"strategy": "midle"}})
    with pytest.raises(KnapSpecError, match=r"planner\.n_skip_layers: does not apply to "
                                            r"strategy 'middle'"):
        KnapSpecConfig.from_dict({"planner": {"strategy": "middle", "n_skip_layers": 2}})


def test_knapspec_bench_runs_a_registered_strategy(plugin):
    """The bar: a package on the path makes ``--strategies middle`` a bench row."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "knapspec", "bench", "--strategies", "middle,ar",
         "--model", "random:smollm2-135m", "--cost-model", "roofline",
         "--context-tokens", "100", "--prompts", "1", "--repeats", "1",
         "--max-new-tokens", "6", "--data", str(ROOT / "tests" / "data" /
                                                "specbench_qa3.jsonl"),
         "--out", str(plugin / "bench.json")],
        cwd=plugin, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| middle |" in proc.stdout  # the table's row
    out = json.loads((plugin / "bench.json").read_text(encoding="utf-8"))
    strategies = {r["strategy"] for r in out["rows"]}
    assert strategies == {"middle", "ar"}, strategies
    row = next(r for r in out["rows"] if r["strategy"] == "middle")
    drafting = [p for p in row["plans"] if p["drafted"]]  # its forced plan drafted
    assert drafting and all(p["strategy"] == "middle" and p["forced"] for p in drafting)


def test_import_knapspec_loads_no_plugin(plugin):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT)])}
    code = (f"import sys, knapspec, knapspec.cli; "
            f"from knapspec.config import KnapSpecConfig; "
            f"KnapSpecConfig.from_dict({{'planner': {{'strategy': 'middle'}}}}); "
            f"print({PKG!r} in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------- docs/research.md
RESEARCH = ROOT / "docs" / "research.md"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_research_doc_examples_run_and_print_what_they_say(capsys):
    """The page's Python blocks, in order in one namespace; each ``print(...)  # x`` line
    must print ``x``."""
    blocks = _python_blocks(RESEARCH)
    assert len(blocks) == 3
    planner_lines = [ln for ln in blocks[0].splitlines() if ln.strip()]
    assert len(planner_lines) < 50  # "a planner in under 50 lines", imports included
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(RESEARCH), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    promised = [ln.split("  # ", 1)[1] for b in blocks for ln in b.splitlines()
                if ln.startswith("print(") and "  # " in ln]
    assert printed == promised


def test_research_doc_planner_registers_and_decodes(tmp_path, monkeypatch):
    """The page's planner as an installed package's strategy: built by name, lossless."""
    (tmp_path / "mystrategies.py").write_text(_python_blocks(RESEARCH)[0], encoding="utf-8")
    info = tmp_path / "mystrategies-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mystrategies\nVersion: 0.1\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[knapspec.strategies]\nattention-only = mystrategies:AttentionOnlyPlanner\n",
        encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "attention-only" in strategy_names()
        be = FakeBackend(vocab=24, n_layers=6)
        planner = make_planner("attention-only", be.layout, fake_cost_model(), 4)
        assert planner.name == "attention-only" and planner.max_draft_length == 4
        cfg = GenerationConfig(max_new_tokens=30)
        ar = SpeculativeDecoder(be, make_planner("ar", be.layout, fake_cost_model()))
        res = SpeculativeDecoder(be, planner).generate([1, 2, 3], cfg)
        assert res.tokens == ar.generate([1, 2, 3], cfg).tokens
        assert all(not r["mlp_skipped"] for r in res.plan_history)  # attention only
    finally:
        sys.modules.pop("mystrategies", None)
