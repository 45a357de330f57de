"""The benchmark harness on the fake backend: rows, summaries, tables, errors."""

from __future__ import annotations

import pytest
from fake_backend import FakeBackend, fake_cost_model

from knapspec.benchmarking import (
    Prompt,
    benchmark,
    forward_alphas,
    markdown_table,
    pearson,
    summarize,
    sweep,
)


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
    for s, sel in ((s, [r for r in rows if r["strategy"] == s["strategy"]]) for s in summary):
        # the round knobs of the drafting plans, and wasted drafts per generated token
        drafting = [p for r in sel for p in r["plans"] if p["draft_length"] > 0]
        assert s["draft_vocab"] == sorted({p["draft_vocab"] for p in drafting})
        assert s["stop_confidence"] == sorted({p["stop_confidence"] for p in drafting})
        assert s["wasted_per_token"] >= 0.0


def test_sweep_without_a_block_oracle_measures_alphas_through_forward():
    be = FakeBackend(vocab=24, n_layers=4)
    ids = list(range(1, 20))
    points = sweep(be, fake_cost_model(), Prompt("p", 19, ids), 8, skip_counts=(1, 2),
                   draft_lengths=(1, 2))
    assert len(points) == 1 + 2 * 2
    masks = [be.layout.mask_from_blocks([b]) for b in range(8) if be.layout.skippable[b]]
    alphas = forward_alphas(be, ids, masks, 8)
    assert all(0.0 <= a <= 1.0 for a in alphas)
    # the same measurement by hand: full vs draft argmax over the window
    be.reset()
    be.prefill(ids)
    be.rollback(11)
    full = be.forward(ids[11:], None).argmax(-1)
    be.rollback(11)
    assert alphas[0] == pytest.approx((be.forward(ids[11:], masks[0]).argmax(-1) == full).mean())


def test_pearson_of_points():
    pts = [{"predicted_tps": x, "measured_tps": 2 * x + 1} for x in (1.0, 2.0, 3.0)]
    assert pearson(pts) == pytest.approx(1.0)


def test_summary_of_several_backends_side_by_side():
    rows = []
    be = FakeBackend(vocab=24, n_layers=4)
    got = benchmark(be, fake_cost_model(), [Prompt("p0", 16, [1, 2, 3, 4])],
                    ["ar", "knapspec"], [], 12, 1)
    for name, scale in (("torch", 1.0), ("llamacpp", 3.0)):
        rows += [{**r, "backend": name, "tokens_per_second": r["tokens_per_second"] * scale}
                 for r in got]
    summary = summarize(rows)
    assert [(s["strategy"], s["backend"]) for s in summary] == [
        ("ar", "torch"), ("ar", "llamacpp"), ("knapspec", "torch"), ("knapspec", "llamacpp")]
    for s in summary:
        assert s["cross_backend_ratio"] == pytest.approx(3.0 if s["backend"] == "llamacpp"
                                                         else 1.0)
    table = markdown_table(summary)
    assert "| backend |" in table and "tok/s vs torch" in table
    assert "| llamacpp | knapspec |" in table and "3.000x" in table


def test_sampled_benchmarks_do_not_claim_identical_tokens():
    from knapspec.decoding import GenerationConfig

    be = FakeBackend(vocab=24, n_layers=4)
    rows = benchmark(be, fake_cost_model(), [Prompt("p0", 16, [1, 2, 3])], ["ar", "knapspec"],
                     [], 12, 1, generation=GenerationConfig(temperature=0.8, seed=1))
    assert all(r["identical_to_ar"] is None for r in rows)
    summary = summarize(rows)
    assert all(s["identical_to_ar"] is None for s in summary)
    assert "| - |" in markdown_table(summary)


def test_bench_cli_compares_backends_in_one_run(monkeypatch, tmp_path, capsys):
    """``knapspec bench --backends``: one backend at a time, backend column, cross ratios,
    warm-up seconds apart from decode time (fake backends: no model needed)."""
    import json

    import knapspec.benchmarking as bench_mod
    import knapspec.runtime as runtime
    from knapspec.cli import main

    built = []

    class Warm(FakeBackend):
        warmup_seconds = 1.5

    def fake_build(config):
        built.append((config.backend.name, config.backend.options_for()))
        return (Warm if config.backend.name == "torch-compile" else FakeBackend)(
            vocab=24, n_layers=4)

    monkeypatch.setattr(runtime, "build_backend", fake_build)
    def fake_cost(config, backend, progress=True, notice=None):
        notice(f"measuring {config.backend.name} once")  # what a first profile says
        return fake_cost_model()

    monkeypatch.setattr(runtime, "config_cost_model", fake_cost)
    monkeypatch.setattr(bench_mod, "make_prompts", lambda be, ctx, n, data=None:
                        [Prompt("p", c, [1, 2, 3, 4]) for c in ctx])
    cfg = tmp_path / "knapspec.toml"
    cfg.write_text('[backend]\nthreads = 2\n[backend.torch-compile]\ncompile_mode = "default"\n'
                   '[planner]\nstrategy = "knapspec"\nmax_draft_length = 3\n'
                   "[generation]\nmax_new_tokens = 10\n", encoding="utf-8")
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    assert main(["bench", "--config", str(cfg), "--backends", "torch,torch-compile,llamacpp",
                 "--context-tokens", "16", "--repeats", "1", "--out", str(out),
                 "--markdown", str(md)]) == 0
    assert built == [("torch", {"threads": 2}),
                     ("torch-compile", {"threads": 2, "compile_mode": "default"}),
                     ("llamacpp", {"threads": 2})]
    result = json.loads(out.read_text())
    assert [b["name"] for b in result["backends"]] == ["torch", "torch-compile", "llamacpp"]
    assert result["backends"][1]["warmup_seconds"] == 1.5
    assert "warmup_seconds" not in result["backends"][0]
    summary = result["summary"]
    assert {(s["backend"], s["strategy"]) for s in summary} == {
        (b, s) for b in ("torch", "torch-compile", "llamacpp") for s in ("ar", "knapspec")}
    assert all(s["cross_backend_ratio"] == 1.0 for s in summary if s["backend"] == "torch")
    assert all(r["new_tokens"] == 10 for r in result["rows"])
    captured = capsys.readouterr()
    text = captured.out
    assert "knapspec: measuring torch-compile once" in captured.err  # said before profiling
    assert "| torch-compile | knapspec |" in text and "tok/s vs torch" in text
    assert "warm-up (outside decode time): torch-compile 1.5 s" in text
    assert md.read_text().startswith("| context")


def test_bench_cli_rejects_an_option_one_backend_lacks_before_loading(monkeypatch, capsys):
    import knapspec.runtime as runtime
    from knapspec.cli import main

    monkeypatch.setattr(runtime, "build_backend", lambda c: pytest.fail("built a backend"))
    assert main(["bench", "--backends", "torch,llamacpp", "--set", "backend.dtype=float32",
                 "--strategies", "ar,knapspec"]) == 2
    err = capsys.readouterr().err
    assert "option 'dtype' is not supported by backend 'llamacpp'" in err
