"""The command line: outputs, the paper's central effect, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from knapspec.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knapspec", *args],
                          capture_output=True, text=True, timeout=300)


def test_plan_json_shows_the_central_effect():
    out = _run("plan", "--model-spec", "llama-3.1-8b", "--hardware", "h100",
               "--context", "1024,32768,131072", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["context"] for r in rows] == [1024, 32768, 131072]
    for r in rows:
        assert set(r) >= {"context", "attn_skipped", "mlp_skipped", "draft_length",
                          "predicted_alpha", "predicted_tpt", "predicted_speedup"}
        assert r["predicted_speedup"] >= 1.0
    share = [r["attn_skipped"] / max(r["attn_skipped"] + r["mlp_skipped"], 1) for r in rows]
    assert rows[-1]["attn_skipped"] > rows[0]["attn_skipped"]
    assert share[-1] > share[0]


def test_plan_json_reports_the_round_knobs(capsys):
    """Every plan says its draft head and confidence stop; a fixed stop is what it reports
    (and a stop the config sets is still scored: the plan still pays)."""
    assert main(["plan", "--model-spec", "llama-3.1-8b", "--hardware", "h100", "--context",
                 "1024", "--json"]) == 0
    free = json.loads(capsys.readouterr().out)[0]
    assert isinstance(free["draft_vocab"], int) and isinstance(free["stop_confidence"], float)
    assert main(["plan", "--model-spec", "llama-3.1-8b", "--hardware", "h100", "--context",
                 "1024", "--json", "--set", "planner.stop_confidence=0.5"]) == 0
    fixed = json.loads(capsys.readouterr().out)[0]
    assert fixed["stop_confidence"] == 0.5 and fixed["draft_length"] >= 1
    assert fixed["expected_draft_steps"] < fixed["draft_length"]  # the stop shortens rounds
    assert fixed["predicted_tpt"] <= free["predicted_tpt"] + 1e-9  # free choice is no worse


def test_plan_table_and_plot(tmp_path, capsys):
    png = tmp_path / "plans.png"
    assert main(["plan", "--model-spec", "qwen3-8b", "--hardware", "a100",
                 "--context", "4k,32k", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "speedup" in text and "32768" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plans.png"]  # no temp files left


def test_plan_with_scores_file_and_cost_model(tmp_path, capsys):
    from knapspec.costmodels import LinearCostModel, save_cost_model

    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({"attention": [0.001] * 30, "mlp": [0.002] * 30}))
    cost = tmp_path / "c.json"
    save_cost_model(LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4,
                                    head_s=2e-3, overhead_s=1e-3), cost)
    assert main(["plan", "--scores", str(scores), "--cost-model", str(cost), "--json",
                 "--context", "512"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["draft_length"] >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--model-spec", "gpt-17"], "unknown"),
        (["plan", "--hardware", "tpu9"], "unknown"),
        (["plan", "--context", "1024,abc"], "--context"),
        (["plan", "--context", "-5"], "--context"),
        (["plan", "--context", "200000"], "context limit"),
        (["plan", "--plot", "/nonexistent-dir/x.png"], "does not exist"),
        (["plan", "--scores", "/nonexistent.json"], "not found"),
        (["plan", "--cost-model", "/nonexistent.json"], "nonexistent"),
        (["generate"], "no prompt"),
        (["generate", "   "], "empty"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "--prompt-file", "/nonexistent.txt"], "not found"),
        (["plan", "--bogus"], "unrecognized"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    out = _run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert message in lines[0]


def _fake_session(monkeypatch, planner_name: str) -> None:
    """``knapspec generate`` on the fake numpy model (no weights) with a named planner."""
    from types import SimpleNamespace

    from fake_backend import FakeBackend, fake_cost_model

    import knapspec.runtime
    from knapspec.decoding import SpeculativeDecoder
    from knapspec.planner import AutoregressivePlanner, StaticPlanner

    be = FakeBackend(vocab=24, n_layers=4)
    planner = (AutoregressivePlanner(be.layout, fake_cost_model()) if planner_name == "ar"
               else StaticPlanner(be.layout, fake_cost_model(), be.layout.mask_from_blocks([2]),
                                  alpha=0.5, draft_length=3))
    session = SimpleNamespace(backend=be, decoder=SpeculativeDecoder(be, planner))
    monkeypatch.setattr(knapspec.runtime, "build_session_from_config",
                        lambda *args, **kwargs: session)


@pytest.mark.parametrize("json_out", [False, True])
def test_generate_says_why_it_decoded_plainly(monkeypatch, capsys, json_out):
    _fake_session(monkeypatch, "ar")
    args = ["generate", "hello", "--strategy", "ar", "--max-new-tokens", "6"]
    assert main([*args, "--json"] if json_out else args) == 0
    out = capsys.readouterr()
    if json_out:
        assert json.loads(out.out)["plain_reason"] == "plain decoding: the strategy is ar"
    else:
        assert "plain decoding: the strategy is ar" in out.err
        assert "acceptance" not in out.err


def test_generate_text_streams_up_to_the_stop_string(monkeypatch, capsys):
    _fake_session(monkeypatch, "fixed")
    assert main(["generate", "hello", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr()
    full = out.out.rstrip("\n")
    assert len(full) == 40 and "acceptance" in out.err and "plain decoding" not in out.err
    stop = full[15:18]
    assert main(["generate", "hello", "--max-new-tokens", "40", "--stop", stop]) == 0
    out = capsys.readouterr()
    assert out.out == full[: full.find(stop)] + "\n"  # nothing of the stop string shown
