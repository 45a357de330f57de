"""Is the calibrated acceptance honest?  Predicted vs observed acceptance of the last plan.

For each held-out-style prompt (Spec-Bench, the first turn; ``--per-category`` prompts of
each category, skipping the three question ids shipped in ``tests/data``), generate with
``--strategy`` (default ``clasp``: it always drafts) on the torch backend and read the last
drafting ``plan_history`` entry:

* ``observed``: per-token acceptance while that plan was in use,
  ``accepted / (accepted + rounds with a rejection)``;
* ``predicted``: the planner's estimate for its mask as last calibrated
  (``predicted_alpha``);
* ``at plan``: the alpha the plan was made with (``plan_alpha``: calibrated on the rounds
  before it, when its mask had drafted before);
* ``proxy``: the model-in-the-loop prediction alone (the plan's ``proxy_alpha`` when it was
  calibrated, else its alpha).

The bar (issue 11): median over prompts of ``|predicted - observed|`` <= 0.05 with at
least ``--min-tokens`` generated.  Acceptance counts only, no timing: the cost model is the
roofline so nothing is profiled.

Usage:
    python benchmarks/calibration_check.py [--per-category 2] [--max-new-tokens 96] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "specbench_dev.jsonl"
SHIPPED = ROOT / "tests" / "data" / "specbench_qa3.jsonl"


def prompts(path: Path, per_category: int) -> list[dict]:
    """First-turn prompts, ``per_category`` of each category, in file order, minus those in
    the test data."""
    shipped = {json.loads(line)["question_id"]
               for line in SHIPPED.read_text(encoding="utf-8").splitlines() if line.strip()}
    taken: dict[str, int] = {}
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        cat = row["category"]
        if row["question_id"] in shipped or taken.get(cat, 0) >= per_category:
            continue
        taken[cat] = taken.get(cat, 0) + 1
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="Spec-Bench jsonl")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--strategy", default="clasp")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override in TOML syntax, as on the command line")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from knapspec.commands.common import parse_set
    from knapspec.config import KnapSpecConfig
    from knapspec.runtime import build_session_from_config

    config = KnapSpecConfig().with_overrides({
        "planner.strategy": args.strategy, "costmodel.source": "roofline",
        "generation.max_new_tokens": args.max_new_tokens, **parse_set(args.set)})
    session = build_session_from_config(config, progress=False)
    be = session.backend
    rows = []
    for p in prompts(args.data, args.per_category):
        searches = getattr(session.planner, "dp_runs", 0)  # model-in-the-loop searches
        res = session.decoder.generate(be.encode(p["turns"][0]), config.generation_config())
        searches = getattr(session.planner, "dp_runs", 0) - searches
        drafting = [r for r in res.plan_history if r["drafted"]]
        if res.new_tokens < args.min_tokens or not drafting:
            print(f"skip {p['question_id']}: {res.new_tokens} tokens, "
                  f"{len(drafting)} drafting plans", file=sys.stderr)
            continue
        last = drafting[-1]
        rows.append({
            "question_id": p["question_id"], "category": p["category"],
            "tokens": res.new_tokens, "plans": len(res.plan_history), "searches": searches,
            "rounds": res.rounds,
            "last_rounds": last["rounds"], "observed": last["observed_alpha"],
            "predicted": last["predicted_alpha"], "at_plan": last["plan_alpha"],
            "proxy": last["proxy_alpha"],
            "acceptance_rate": res.acceptance_rate,
        })
        r = rows[-1]
        print(f"{r['question_id']:>4} {r['category']:<13} tokens {r['tokens']:>3} plans "
              f"{r['plans']:>2} searches {r['searches']:>2}/{r['rounds']:>2} rounds, last: "
              f"rounds {r['last_rounds']:>2} observed "
              f"{r['observed']:.3f} predicted {r['predicted']:.3f} at plan {r['at_plan']:.3f}"
              f" proxy {r['proxy']:.3f}", file=sys.stderr)
    if not rows:
        print("no prompt generated enough tokens with a drafting plan", file=sys.stderr)
        return 1
    summary = {key: statistics.median(abs(r[key] - r["observed"]) for r in rows)
               for key in ("predicted", "at_plan", "proxy")}
    out = {"strategy": args.strategy, "prompts": len(rows),
           "median_abs_error": summary, "bar": 0.05,
           "passes": summary["predicted"] <= 0.05, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{len(rows)} prompts, median |x - observed| of the last plan: "
              + ", ".join(f"{k} {v:.3f}" for k, v in summary.items())
              + f"  (bar: predicted <= 0.05: {'pass' if out['passes'] else 'FAIL'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
