"""The Python examples in the docs and README run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


_BLOCKS = python_blocks(ROOT / "docs" / "planner.md")


@pytest.mark.parametrize("block", _BLOCKS, ids=[f"block{i}" for i in range(len(_BLOCKS))])
def test_planner_doc_examples_run(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/planner.md", "exec"), {})


def test_readme_planner_example_runs():
    blocks = python_blocks(ROOT / "README.md")
    planner_block = next(b for b in blocks if "AdditivePlanner" in b)
    exec(compile(planner_block, "README.md", "exec"), {})


_INTEGRATIONS = python_blocks(ROOT / "docs" / "integrations.md")
# the first two load SmolLM2 through transformers / llama-cpp-python (skipped without them)
_NEEDS = {0: ("torch", "transformers"), 1: ("llama_cpp",)}


@pytest.mark.parametrize("index", range(len(_INTEGRATIONS)),
                         ids=[f"block{i}" for i in range(len(_INTEGRATIONS))])
def test_integrations_doc_examples_run(index, tmp_path, monkeypatch):
    """Each example in docs/integrations.md runs as written; the transformers and llama.cpp
    ones assert that they drafted (and, for transformers, equal plain greedy)."""
    for module in _NEEDS.get(index, ()):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(_INTEGRATIONS[index], "docs/integrations.md", "exec"), {})


def test_integrations_doc_has_the_examples_it_promises():
    text = "\n".join(_INTEGRATIONS)
    assert len(_INTEGRATIONS) == 3
    for call in ("custom_generate=knapspec_generate", "draft_model=draft", "observe(plan"):
        assert call in text
