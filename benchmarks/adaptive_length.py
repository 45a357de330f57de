"""Forced drafting with and without the confidence stop (and the reduced draft head), in one
process: wasted draft tokens per generated token and decode tokens/s.

SmolLM2-135M-Instruct, eager torch on the CPU, greedy, a fixed skip mask and draft length
(``planner.mask`` / ``planner.draft_length``, drafted whatever the cost model says), on
Spec-Bench prompts the acceptance-by-confidence table was not measured on.
Variants, run interleaved per prompt and repeat (``--repeats``), medians:

* ``fixed``: every round drafts ``d`` tokens with the full head (``stop_confidence = 0``,
  ``draft_vocab = 0``);
* ``adaptive``: the planner chooses the confidence stop by TPT (``stop_confidence`` unset),
  full head;
* ``adaptive+head``: the stop and the draft head both chosen by TPT;
* ``ar``: plain decoding, the reference every variant's tokens must equal.

Wasted = drafted - accepted, per generated token (deterministic under greedy decoding).
Run with nothing else on the machine (the cost model is the backend's cached profile,
measured first if missing, reported apart):

    python benchmarks/adaptive_length.py --out /tmp/adaptive.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from knapspec.backends.torch.eager import TorchEagerBackend
from knapspec.benchmarking import default_data_dir
from knapspec.config import KnapSpecConfig
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.planner.factory import make_planner
from knapspec.planner.knobs import ConfidenceTable
from knapspec.runtime import backend_cost_model, config_planner

#: the forced plan of the transformers integration test: 10 blocks of SmolLM2's middle
MASK = [20, 21, 22, 23, 24, 25, 36, 37, 40, 41]
CATEGORIES = ("writing", "reasoning", "math", "coding", "stem", "humanities")


def measured_ids() -> set[int]:
    """Spec-Bench question ids the shipped confidence table was measured on (held out here)."""
    table = ConfidenceTable.default()
    texts = table.meta.get("texts", []) if table is not None else []
    return {int(t["text"].rsplit(":", 1)[1]) for t in texts
            if str(t.get("text", "")).startswith("specbench:")}


def prompts(backend: TorchEagerBackend, n_per: int) -> list[tuple[str, list[int]]]:
    out, seen, held = [], {}, measured_ids()
    for line in (default_data_dir() / "specbench_dev.jsonl").read_text("utf-8").splitlines():
        obj = json.loads(line)
        cat = obj["category"]
        if cat in CATEGORIES and seen.get(cat, 0) < n_per and obj["question_id"] not in held:
            seen[cat] = seen.get(cat, 0) + 1
            out.append((f"{cat}[{seen[cat] - 1}]", backend.encode(obj["turns"][0])))
    return out


def _weighted(plans: list[dict], key: str) -> float | None:
    """``key`` of the plans, weighted by the rounds each ran (None: no round)."""
    n = sum(p["rounds"] for p in plans)
    return sum(p[key] * p["rounds"] for p in plans) / n if n else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft-length", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    be = TorchEagerBackend(threads=2)
    cost = backend_cost_model(be, notice=lambda s: print(s, file=sys.stderr))
    base = {"planner.strategy": "static", "planner.mask": MASK,
            "planner.draft_length": args.draft_length}
    variants = {
        "fixed": {"planner.stop_confidence": 0.0, "planner.draft_vocab": 0},
        "adaptive": {"planner.draft_vocab": 0},
        "adaptive+head": {},
    }
    planners = {"ar": make_planner("ar", be.layout, cost)}
    for name, keys in variants.items():
        cfg = KnapSpecConfig().with_overrides({**base, **keys}, source="benchmark")
        planners[name] = config_planner(cfg, be.layout, cost, backend=be)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    rows = []
    for pname, ids in prompts(be, args.per_category):
        decs = {k: SpeculativeDecoder(be, p) for k, p in planners.items()}
        for dec in decs.values():  # warm-up, untimed
            dec.generate(ids, GenerationConfig(max_new_tokens=8, stop_at_eos=False))
        runs: dict[str, list] = {k: [] for k in decs}
        for _ in range(args.repeats):
            for k, dec in decs.items():
                runs[k].append(dec.generate(ids, gen))
        ref = runs["ar"][0].tokens
        for k, rs in runs.items():
            r0 = rs[0]
            plans = [p for p in r0.plan_history if p["draft_length"]]
            rows.append({
                "prompt": pname, "variant": k,
                "tokens_per_second": statistics.median(r.tokens_per_second for r in rs),
                "runs_tps": [r.tokens_per_second for r in rs],
                "new_tokens": r0.new_tokens, "drafted": r0.drafted, "accepted": r0.accepted,
                "rounds": r0.rounds,
                "wasted_per_token": (r0.drafted - r0.accepted) / r0.new_tokens,
                "same_as_ar": all(r.tokens == ref for r in rs),
                "stop_confidence": sorted({p["stop_confidence"] for p in plans}),
                # the stop model's honesty: predicted vs observed per round (round-weighted
                # over the drafting plans; the prediction at each plan's own alpha)
                "predicted_steps_per_round": _weighted(plans, "expected_draft_steps"),
                "observed_steps_per_round": r0.drafted / r0.rounds if r0.rounds else None,
                "predicted_tokens_per_round": _weighted(plans, "expected_tokens"),
                "observed_tokens_per_round":
                    (r0.accepted + r0.rounds) / r0.rounds if r0.rounds else None,
                "draft_vocab": sorted({p["draft_vocab"] for p in plans}),
            })
            print(f"{pname:>14} {k:>14} {rows[-1]['tokens_per_second']:6.2f} tok/s "
                  f"wasted/token {rows[-1]['wasted_per_token']:.3f} drafted {r0.drafted} "
                  f"accepted {r0.accepted} same {rows[-1]['same_as_ar']} "
                  f"stop {rows[-1]['stop_confidence']} K {rows[-1]['draft_vocab']}",
                  flush=True)
    summary = {}
    for k in planners:
        sel = [r for r in rows if r["variant"] == k]
        summary[k] = {
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in sel),
            "wasted_per_token": sum(r["drafted"] - r["accepted"] for r in sel)
            / sum(r["new_tokens"] for r in sel),
            "same_as_ar": all(r["same_as_ar"] for r in sel),
        }
        for what in ("steps", "tokens"):
            pairs = [(r[f"predicted_{what}_per_round"], r[f"observed_{what}_per_round"])
                     for r in sel if r[f"observed_{what}_per_round"] is not None]
            if pairs:
                summary[k][f"{what}_per_round"] = {
                    "predicted": statistics.mean(p for p, _ in pairs),
                    "observed": statistics.mean(o for _, o in pairs)}
    for k in ("adaptive", "adaptive+head"):
        f, a = summary["fixed"], summary[k]
        ratio = statistics.median(
            r["tokens_per_second"] / q["tokens_per_second"]
            for r in rows if r["variant"] == k
            for q in rows if q["variant"] == "fixed" and q["prompt"] == r["prompt"])
        a["tps_vs_fixed"] = ratio
        a["wasted_change"] = a["wasted_per_token"] / f["wasted_per_token"] - 1.0
    for k, v in summary.items():
        print(k, json.dumps(v))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary,
                                        "args": vars(args) | {"out": str(args.out)},
                                        "mask": MASK}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
