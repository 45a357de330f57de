"""One-token steps, eager vs ``torch-compile``, interleaved in one process.

Both backends share the default SmolLM2 weights (``LoadedModel``) and the same prompt;
each round runs 16 one-token steps on each backend through ``verify`` (the decode loop's
plain step) and 16 through ``forward``, alternating backends, then rolls back.  The first
round is dropped; medians and percentiles of the per-step wall time are printed.  The
compiled backend's weight packing is the first argument (``auto``, ``on``, ``off``).

    PYTHONPATH=. python benchmarks/compile_step_ab.py [auto|on|off]

Run it with nothing else on the machine.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from knapspec.backends.torch.compile import TorchCompileBackend
from knapspec.backends.torch.eager import TorchEagerBackend
from knapspec.sampling import SamplingParams

GREEDY = SamplingParams()
ROUNDS, STEPS = 6, 16


def steps(be, n: int, how: str, rng: np.random.Generator) -> list[float]:
    """Seconds of ``n`` one-token steps from the cached prompt (rolled back after)."""
    p0, last, out = be.length, 1000, []
    for _ in range(n):
        t = time.perf_counter()
        if how == "verify":
            _, last = be.verify(last, [], None, GREEDY, rng)
        else:
            last = int(be.forward([last], None, all_logits=False)[-1].argmax())
        out.append(time.perf_counter() - t)
    be.rollback(p0)
    return out


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "auto"
    rng = np.random.default_rng(0)
    eager = TorchEagerBackend(threads=2)
    t0 = time.perf_counter()
    comp = TorchCompileBackend(eager.loaded, threads=2, prepack=mode)
    print(f"compile setup {time.perf_counter() - t0:.1f} s, prepacked weights "
          f"{comp.describe().get('prepacked_weights')}", flush=True)
    prompt = eager.encode("Explain how a refrigerator works, step by step.")
    for be in (eager, comp):
        be.prefill(prompt)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS):
        for name, be in (("eager", eager), ("compile", comp)):
            for how in ("verify", "forward"):
                times.setdefault((name, how), []).extend(steps(be, STEPS, how, rng))
    for (name, how), v in times.items():
        ms = np.array(v[STEPS:]) * 1e3  # the first round warms up
        print(f"{name:>8} {how:>8}: median {np.median(ms):.1f} ms, p10 "
              f"{np.percentile(ms, 10):.1f}, p90 {np.percentile(ms, 90):.1f}, min {ms.min():.1f}")


if __name__ == "__main__":
    main()
