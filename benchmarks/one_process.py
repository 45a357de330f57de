"""Never slower as users call it: one ``knapspec generate`` process per run.

Each run is a fresh ``python -m knapspec generate --json`` process, the way a user calls
knapspec; strategies are interleaved run by run (``ar``, ``knapspec``, ``ar``, ...) on the
same prompt so that drifts of a shared machine hit both alike.  Per run it records the
decode rate the process reports (new tokens / ``decode_seconds``, i.e. everything after
prefill: draft, verify, planning, switches), the planning time inside it, and the process's
whole wall time (model load, warm-ups and prefill included), reported apart.

Prompts are ones the project's tuning did not use: Spec-Bench ``stem``/``humanities``
questions for short contexts, and a Frankenstein (``pg84.txt``) passage far from the slices
``knapspec bench`` takes, with a summarisation request, for long ones.

Example (llama.cpp, short prompts; torch at ~2K tokens)::

    python benchmarks/one_process.py --backend llamacpp --context short --runs 3
    python benchmarks/one_process.py --backend torch --context 2000 --runs 3 --prompts 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def short_prompts(n: int) -> list[str]:
    """First turns of Spec-Bench ``stem`` and ``humanities`` questions."""
    out = []
    for line in (DATA / "specbench_dev.jsonl").read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        if obj["category"] in ("stem", "humanities"):
            out.append(obj["turns"][0])
    return out[:n]


def long_prompts(n: int, tokens: int) -> list[str]:
    """Frankenstein passages of about ``tokens`` tokens (~4 characters each)."""
    text = (DATA / "pg84.txt").read_text(encoding="utf-8")
    out = []
    for i in range(n):
        start = 200_000 + 60_000 * i
        passage = text[start : start + 4 * tokens]
        out.append(f"Here is a passage from a novel:\n\n{passage}\n\n"
                   "Summarize this passage in a few paragraphs.")
    return out


def run_once(args: argparse.Namespace, strategy: str, prompt_file: Path) -> dict:
    cmd = [sys.executable, "-m", "knapspec", "generate", "--json", "--prompt-file",
           str(prompt_file), "--backend", args.backend, "--strategy", strategy,
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["new_tokens"] < args.max_new_tokens // 2:
        print(f"warning: {strategy} stopped after {res['new_tokens']} tokens "
              f"({res['stop_reason']}): this prompt measures little decoding", flush=True)
    return {
        "strategy": strategy,
        "tokens_per_second": res["tokens_per_second"],
        "decode_seconds": res["decode_seconds"],
        "plan_seconds": res["plan_seconds"],
        "prefill_seconds": res["prefill_seconds"],
        "new_tokens": res["new_tokens"],
        "prompt_tokens": res["prompt_tokens"],
        "drafted": res["drafted"],
        "process_seconds": wall,
        "tokens": res["tokens"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--context", default="short", help="'short' or a token count (e.g. 2000)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="runs per strategy and prompt")
    ap.add_argument("--strategies", default="ar,knapspec")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    texts = (short_prompts(args.prompts) if args.context == "short"
             else long_prompts(args.prompts, int(args.context)))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for p, text in enumerate(texts):
            f = Path(tmp) / f"prompt{p}.txt"
            f.write_text(text, encoding="utf-8")
            for r in range(args.runs):
                for s in strategies:
                    row = run_once(args, s, f) | {"prompt": p, "run": r}
                    runs.append(row)
                    print(f"prompt {p} run {r} {s:>9}: {row['tokens_per_second']:6.2f} tok/s "
                          f"(ctx {row['prompt_tokens']}, plan {row['plan_seconds']:.3f} s of "
                          f"{row['decode_seconds']:.2f} s, drafted {row['drafted']}, "
                          f"process {row['process_seconds']:.1f} s)", flush=True)
    base = strategies[0]
    print(f"\n| strategy | median tok/s | ratio to {base} | plan share | drafted | "
          "same tokens | median process s |")
    print("|---|---|---|---|---|---|---|")
    med = {s: statistics.median(r["tokens_per_second"] for r in runs if r["strategy"] == s)
           for s in strategies}
    for s in strategies:
        rs = [r for r in runs if r["strategy"] == s]
        share = sum(r["plan_seconds"] for r in rs) / sum(r["decode_seconds"] for r in rs)
        same = all(r["tokens"] == b["tokens"] for r in rs for b in runs
                   if b["strategy"] == base and b["prompt"] == r["prompt"])
        print(f"| {s} | {med[s]:.2f} | {med[s] / med[base]:.3f}x | {100 * share:.1f}% | "
              f"{sum(r['drafted'] for r in rs)} | {same} | "
              f"{statistics.median(r['process_seconds'] for r in rs):.1f} |")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
