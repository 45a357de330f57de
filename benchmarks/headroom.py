"""What speedup can self-speculation reach on this machine?  Answered from a cost model.

For skip sets of the ``k`` least important blocks (measured profile order) at a context
length, print the draft-step and verify costs and the acceptance each needs to break even
and to reach a target speedup at its best draft length.  Compare with the acceptance the
sweep measured (``knapspec bench --sweep``) to see whether a target is reachable.

Usage:
    python benchmarks/headroom.py --cost-model COST.json --context 6000 [--target 1.3]
"""

from __future__ import annotations

import argparse

import numpy as np

from knapspec import BlockLayout
from knapspec.costmodels import load_cost_model
from knapspec.planner import default_block_scores, expected_tokens


def needed_alpha(speedup: float, draft_s: float, verify_s: list[float], ar_s: float) -> float:
    """Smallest alpha reaching ``speedup`` at some draft length (nan if none can)."""
    best = np.nan
    for d, v in enumerate(verify_s, start=1):
        round_s = d * draft_s + v
        want = speedup * round_s / ar_s  # expected tokens needed per round
        if want > d + 1:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if expected_tokens(mid, d) < want else (lo, mid)
        best = hi if np.isnan(best) else min(best, hi)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cost-model", required=True)
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--target", type=float, default=1.3)
    ap.add_argument("--max-draft-length", type=int, default=8)
    args = ap.parse_args()
    cm = load_cost_model(args.cost_model)
    layout = BlockLayout(args.layers)
    scores = np.where(layout.skippable, default_block_scores(args.layers), np.inf)
    order = np.argsort(scores)
    ar = cm.full_step_seconds(args.layers, args.context, 1)
    verify = [cm.full_step_seconds(args.layers, args.context, d + 1)
              for d in range(1, args.max_draft_length + 1)]
    print(f"context {args.context}: full step {1e3 * ar:.1f} ms; verify of 2/5/9 tokens = "
          f"{verify[0] / ar:.2f}x / {verify[3] / ar:.2f}x / {verify[-1] / ar:.2f}x one step; "
          f"head {1e3 * cm.head(1):.1f} ms")
    print(f"{'skipped':>7} {'attn':>4} {'mlp':>3} {'draft ms':>8} {'draft/full':>10} "
          f"{'alpha for 1.0x':>14} {'alpha for ' + str(args.target) + 'x':>14}")
    for k in (4, 8, 12, 16, 24, 32, 40, 48, 56):
        if k > layout.skippable.sum():
            break
        mask = layout.mask_from_blocks(order[:k])
        draft = cm.step_seconds(mask, args.context, 1)
        a1 = needed_alpha(1.0, draft, verify, ar)
        at = needed_alpha(args.target, draft, verify, ar)
        fmt = lambda a: "unreachable" if np.isnan(a) else f"{a:.3f}"  # noqa: E731
        print(f"{k:>7} {int(mask[0::2].sum()):>4} {int(mask[1::2].sum()):>3} "
              f"{1e3 * draft:>8.1f} {draft / ar:>10.2f} {fmt(a1):>14} {fmt(at):>14}")
    nothing = cm.step_seconds(layout.skippable, args.context, 1)
    print(f"even a draft of only the pinned blocks costs {nothing / ar:.2f} of a full step "
          f"(head + overhead + 4 pinned blocks)")


if __name__ == "__main__":
    main()
