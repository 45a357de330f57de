"""Is a draft step faster with a reduced-vocabulary head?  Full head vs each reduced head.

One process, one backend (SmolLM2 by default, torch on the CPU): after prefilling a real
prompt (``knapspec.benchmarking.make_prompts``: a Spec-Bench question, or a book slice for
``--context`` of 500 tokens and more), time ``draft`` calls of ``--steps`` greedy draft
steps each (the loop's hot path: blocks under the mask, the draft head, the argmax on the
device), the cache rolled back after each call.  For every skip mask (none, and the
``--skip`` blocks the default block scores rate least important, the forced plan of
``tests/test_draft_vocab.py``), the heads (full, then each reduced size the backend offers)
are timed in interleaved rounds (full, K1, K2, ..., full, K1, ...), so load drifts hit all
alike; the median per step and the saving against the full head are printed, and the
head alone (``time_draft_head``: final norm + head on one state) for reference.

Run it on an idle machine; numbers from a shared CPU are noise.

Usage:
    python benchmarks/draft_head.py [--backend torch] [--threads 2] [--context 100]
        [--steps 8] [--repeats 30] [--skip 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from knapspec.backends import create_backend
from knapspec.benchmarking import make_prompts
from knapspec.planner import default_block_scores
from knapspec.sampling import SamplingParams

GREEDY = SamplingParams()


def skip_masks(be, skip: int) -> dict[str, np.ndarray | None]:
    """``{"none": None, "skip<N>": mask}``: no skip, and the ``skip`` skippable blocks the
    default block scores rate least important."""
    masks: dict[str, np.ndarray | None] = {"none": None}
    if skip > 0:
        n = be.layout.n_layers
        scores = np.where(be.layout.skippable, default_block_scores(n), np.inf)
        masks[f"skip{skip}"] = be.layout.mask_from_blocks(np.argsort(scores)[:skip])
    return masks


def time_drafts(be, last: int, mask, heads: list[int], steps: int, repeats: int
                ) -> dict[int, list[float]]:
    """Seconds per draft step ``{K: [repeats]}`` (``K = 0``: the full head), interleaved."""
    rng = np.random.default_rng(0)
    p0 = be.length
    out: dict[int, list[float]] = {k: [] for k in heads}
    for k in heads:  # warm-up: heads made, kernels chosen
        be.draft(last, mask, steps, GREEDY, rng, frozenset(), vocab=k)
        be.rollback(p0)
    for _ in range(repeats):
        for k in heads:
            be.synchronize()
            t0 = time.perf_counter()
            ids, _ = be.draft(last, mask, steps, GREEDY, rng, frozenset(), vocab=k)
            be.synchronize()
            out[k].append((time.perf_counter() - t0) / steps)
            assert len(ids) == steps, "a draft was cut short: timings would mix lengths"
            be.rollback(p0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch", help="torch or torch-compile")
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=100, help="prompt tokens (bucket)")
    ap.add_argument("--steps", type=int, default=8, help="draft steps per timed call")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per (mask, head)")
    ap.add_argument("--skip", type=int, default=10, help="blocks skipped by the masked runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    options = {} if args.threads is None else {"threads": args.threads}
    be = create_backend(args.backend, model=args.model, **options)
    sizes = be.draft_vocab_sizes()
    if not sizes:
        raise SystemExit(f"the {be.name} backend offers no reduced draft heads for this "
                         "model (no token ranking for its tokenizer)")
    heads = [0, *sorted(sizes)]
    prompt = make_prompts(be, [args.context], 1)[0]
    last = int(np.argmax(be.prefill(prompt.ids)))
    print(f"{be.name}, {be.describe().get('model')}, {be.describe().get('threads')} threads, "
          f"context {be.length}, {args.steps} steps per call, {args.repeats} repeats, "
          f"load {os.getloadavg()[0]:.2f}")
    result: dict = {"backend": be.describe(), "context": be.length, "steps": args.steps,
                    "repeats": args.repeats, "coverage": sizes, "masks": {}}
    head_only = {k: be.time_draft_head(k, max(args.repeats, 5)) for k in heads}
    result["head_only_ms"] = {k: 1e3 * v for k, v in head_only.items()}
    print(f"{'mask':>8} {'K':>7} {'coverage':>8} {'ms/step':>8} {'vs full':>8} "
          f"{'head ms':>8}")
    for name, mask in skip_masks(be, args.skip).items():
        runs = time_drafts(be, last, mask, heads, args.steps, args.repeats)
        med = {k: statistics.median(v) for k, v in runs.items()}
        result["masks"][name] = {
            "skipped_blocks": 0 if mask is None else int(np.sum(mask)),
            "median_step_ms": {k: 1e3 * v for k, v in med.items()},
            "saving_vs_full": {k: 1.0 - med[k] / med[0] for k in heads if k},
            "samples_ms": {k: [1e3 * x for x in v] for k, v in runs.items()},
        }
        for k in heads:
            cov = "1" if k == 0 else f"{sizes[k]:.4f}"
            saving = "" if k == 0 else f"{100 * (1 - med[k] / med[0]):+7.1f}%"
            print(f"{name:>8} {k or 'full':>7} {cov:>8} {1e3 * med[k]:>8.3f} {saving:>8} "
                  f"{1e3 * head_only[k]:>8.3f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
