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
