"""``benchmarks/device_check.py --quick``: the device script's whole code path, tiny shapes,
on the CPU, from a plain checkout (``PYTHONPATH=.``), writing every key it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what the device machine does not have: the script must not need them
ABSENT = ("gguf", "llama_cpp", "matplotlib", "scipy", "hypothesis")  # (networkx: torch needs it)


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" /
                                                  "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_device_check_writes_every_key(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("numba")
    out = tmp_path / "dc"
    # as if not installed: ``import`` fails and ``importlib.util.find_spec`` says None
    code = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({ABSENT!r}))\n"
        f"sys.argv = ['device_check.py', '--quick', '--device', 'cpu', '--out', {str(out)!r}]\n"
        "runpy.run_path('benchmarks/device_check.py', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    dc = _load_script()
    report = json.loads((out / "device_check.json").read_text())
    assert set(dc.TOP_KEYS) <= set(report)
    assert report["timing_only"] is True and report["quick"] is True
    assert report["device"] == "cpu" and report["dtype"] == "bfloat16"
    assert list(report["models"]) == list(dc.MODELS)
    for name, rec in report["models"].items():
        assert (out / rec["profile"]["file"]).exists(), name
        assert rec["profile"]["timer"] == "perf_counter"
        assert [e["context"] for e in rec["contexts"]] == list(dc.QUICK_CONTEXTS)
        for e in rec["contexts"]:
            assert set(dc.CONTEXT_KEYS) <= set(e)
            where = f"{name} @ {e['context']}"
            assert e["ar_tok_s_eager"] > 0, where
            assert e["ar_tok_s_compiled"] is None or e["ar_tok_s_compiled"] > 0, where
            assert list(e["verify_cost_rel"]) == [str(k) for k in dc.VERIFY_KS], where
            assert e["verify_cost_rel"]["1"] == 1.0 and e["verify_ms_k1"] > 0, where
            s = e["sweep"]
            assert s["n_points"] >= 5 and math.isfinite(s["pearson"]), where
            assert all(p["simulated_alpha"] == 0.8 for p in s["points"][1:]), where
            p = e["chosen_plan"]
            assert {"predicted_speedup", "measured_speedup", "predicted_speedup_0_9",
                    "measured_speedup_0_9", "predicted_alpha"} <= set(p), where
            assert e["roofline"]["hardware"] == "cpu-small", where
    # a compiled figure is either there or skipped with its reason
    compiled = [e["ar_tok_s_compiled"] for r in report["models"].values()
                for e in r["contexts"]]
    assert all(c is not None for c in compiled) or any(
        "compiled" in s for s in report["skipped"])
    for name, rec in report["models"].items():
        if rec.get("compiled_steps") is not None:  # the GPU's fixed-shape steps, uncaptured
            assert rec["compiled_steps"]["static_steps"] is True, name
            assert rec["compiled_steps"]["cuda_graphs_captured"] == 0, name
            assert rec["compile_recompilations"] == 0, name
    table = (out / "device_check.md").read_text()
    assert "TIMING ONLY" in table and "QUICK" in table
    assert table.count("| llama-3.1-8b |") == 2 * len(dc.QUICK_CONTEXTS)  # both tables


def test_device_check_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("numba")
    dc = _load_script()
    assert dc.main(["--quick", "--out", str(tmp_path), "--models", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt-5" in err and "llama-3.1-8b" in err
    assert dc.main(["--quick", "--out", str(tmp_path), "--hardware", "tpu"]) == 2
    assert "tpu" in capsys.readouterr().err
    assert not (tmp_path / "device_check.json").exists()
