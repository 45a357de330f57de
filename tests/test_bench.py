"""The benchmark harness on the fake backend: rows, summaries, tables, errors."""

from __future__ import annotations

import pytest
from fake_backend import FakeBackend, fake_cost_model

from knapspec.bench import Prompt, benchmark, markdown_table, pearson, summarize, sweep
from knapspec.errors import KnapSpecError


def test_benchmark_rows_summary_and_table():
    be = FakeBackend(vocab=24, n_layers=4)
    prompts = [Prompt("p0", 16, [1, 2, 3, 4]), Prompt("p1", 16, [5, 6, 7])]
    rows = benchmark(be, fake_cost_model(), prompts, ["ar", "knapspec", "static"], [], 20, 2)
    assert len(rows) == 6
    for r in rows:
        assert r["identical_to_ar"] is True  # greedy strategies are lossless
        assert r["tokens_per_second"] > 0 and r["speedup"] > 0
    assert all(r["speedup"] == 1.0 for r in rows if r["strategy"] == "ar")
    summary = summarize(rows)
    assert [s["strategy"] for s in summary] == ["ar", "knapspec", "static"]
    assert all(s["prompts"] == 2 for s in summary)
    table = markdown_table(summary)
    assert table.count("\n") == 4 and "| knapspec |" in table


def test_sweep_needs_a_block_oracle():
    be = FakeBackend(vocab=24, n_layers=4)
    with pytest.raises(KnapSpecError, match="no block oracle"):
        sweep(be, fake_cost_model(), Prompt("p", 8, [1, 2, 3]), 8)


def test_pearson_of_points():
    pts = [{"predicted_tps": x, "measured_tps": 2 * x + 1} for x in (1.0, 2.0, 3.0)]
    assert pearson(pts) == pytest.approx(1.0)
