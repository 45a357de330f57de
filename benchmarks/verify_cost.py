"""Verification of k drafts against one decoding step, eager vs ``torch-compile``, interleaved.

Issue 10's bar "verifies 5 tokens at <= 1.5x its own one-token step": both backends share
the default SmolLM2 weights and one prompt padded to each context; every round runs, on
each backend in turn, ``STEPS`` pairs of a one-token step (``verify`` with no drafts, what
plain decoding runs) and a verification of ``k`` drafts (``verify`` with ``k`` drafts: a
``k + 1``-token forward and the on-device greedy check), rolling back after each.  The
first round is dropped; the medians of every call's wall time are compared, so both sides
of each ratio come from the same minutes of the same process.

    PYTHONPATH=. python benchmarks/verify_cost.py [--contexts 64,2000] [--drafts 4]
        [--rounds 6] [--threads 2] [--prepack auto]

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from knapspec.backends.torch.compile import TorchCompileBackend
from knapspec.backends.torch.eager import TorchEagerBackend
from knapspec.sampling import SamplingParams

GREEDY = SamplingParams()
STEPS = 8


def pair(be, drafts: list[int], rng: np.random.Generator) -> tuple[float, float]:
    """Seconds of one plain step and of one verification of ``drafts`` from the cache."""
    p0 = be.length
    t = time.perf_counter()
    be.verify(1000, [], None, GREEDY, rng)
    one = time.perf_counter() - t
    be.rollback(p0)
    t = time.perf_counter()
    be.verify(1000, drafts, None, GREEDY, rng)
    many = time.perf_counter() - t
    be.rollback(p0)
    return one, many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="64,2000")
    ap.add_argument("--drafts", type=int, default=4, help="k: drafts verified (k + 1 tokens)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepack", default="auto")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    eager = TorchEagerBackend(threads=args.threads)
    comp = TorchCompileBackend(eager.loaded, threads=args.threads, prepack=args.prepack)
    d = comp.describe()
    print(f"torch-compile: prepack {args.prepack}, kernel policy {d.get('kernel_policy')} "
          f"{d.get('kernel_policy_ms')}", flush=True)
    base = eager.encode("Explain how a refrigerator works, step by step. " * 400)
    drafts = [int(t) for t in base[1 : 1 + args.drafts]]
    print(f"| context | backend | 1-token step ms | verify {args.drafts + 1} tokens ms "
          f"| ratio | p10-p90 step | p10-p90 verify |")
    print("|---|---|---:|---:|---:|---|---|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        prompt = base[:ctx]
        times: dict[str, tuple[list[float], list[float]]] = {"torch": ([], []),
                                                               "torch-compile": ([], [])}
        for be in (eager, comp):
            be.reset()
            be.prefill(prompt)
        for r in range(args.rounds + 1):
            for name, be in (("torch", eager), ("torch-compile", comp)):
                for _ in range(STEPS):
                    one, many = pair(be, drafts, rng)
                    if r:  # the first round warms up
                        times[name][0].append(one)
                        times[name][1].append(many)
        for name, (one, many) in times.items():
            a, b = np.array(one) * 1e3, np.array(many) * 1e3
            print(f"| {ctx} | {name} | {np.median(a):.1f} | {np.median(b):.1f} | "
                  f"{np.median(b) / np.median(a):.2f}x | {np.percentile(a, 10):.1f}-"
                  f"{np.percentile(a, 90):.1f} | {np.percentile(b, 10):.1f}-"
                  f"{np.percentile(b, 90):.1f} |", flush=True)


if __name__ == "__main__":
    main()
