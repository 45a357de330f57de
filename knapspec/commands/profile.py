"""``knapspec profile``: measure a backend's latencies into a cost-model JSON file.

Example::

    knapspec profile --out smollm2-torch.json
    knapspec profile --config knapspec.toml      # the [model] and [backend] of the file
    knapspec profile --check                     # is the cached profile still right here?

A profile whose timings look disturbed by other work on the CPU is refused (one-line
error, exit status 2) unless ``--force`` keeps it, marked untrusted.  ``--check`` exits
with status 1 when a point is off by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_backend_arguments

EXIT_CHECK_FAILED = 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure per-block latencies against context length into a cost model",
        description="Time real forward passes (full, attention-free, MLP-free, block-free) at "
        "several context lengths and token counts; write a table cost model (JSON). Timings "
        "disturbed by other work on the CPU are measured again, and a profile that stays "
        "disturbed is refused unless --force.",
    )
    add_backend_arguments(p, cost_model=False)
    p.add_argument("--out", metavar="FILE", default=None,
                   help="where to write the cost model (default: the backend's cache entry, "
                   "which generate and bench reuse); with --check, the file to check")
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths (default: 64 ... the model's limit)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per point, the median is kept (default: 5; --check: 3)")
    p.add_argument("--force", action="store_true",
                   help="save the profile even if its timings fail the trust checks (it is "
                   "marked untrusted)")
    p.add_argument("--check", action="store_true",
                   help="measure a few points quickly and report how far the cached profile "
                   "is from them (exit status 1 when off by more than --tolerance)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="with --check: largest acceptable ratio either way (default: 1.5)")
    p.set_defaults(func=run)


def _notice(message: str) -> None:
    sys.stderr.write(f"knapspec: {message}\n")


def run(args: argparse.Namespace) -> int:
    from .._io import check_writable
    from ..backends.profiling import cached_profile
    from ..errors import KnapSpecError
    from ..runtime import build_backend
    from .common import load_config
    from .plan import parse_contexts

    if args.tolerance is not None and not args.check:
        raise KnapSpecError("--tolerance only applies with --check")
    if args.check:
        if args.force or args.contexts:
            raise KnapSpecError("--check measures its own few points: drop --force/--contexts")
        return _check(args, build_backend(load_config(args)))
    if args.out:
        check_writable(args.out)
    contexts = parse_contexts(args.contexts) if args.contexts else None
    backend = build_backend(load_config(args))
    model = cached_profile(backend, path=args.out, refresh=True, contexts=contexts,
                           repeats=5 if args.repeats is None else args.repeats,
                           allow_untrusted=args.force, notice=_notice)
    n_layers = backend.layout.n_layers
    ns = [int(n) for n in model.n_tokens]
    measured = model.meta.get("measured_full_step_s")  # [contexts][n_tokens] seconds
    sys.stdout.write(f"{'context':>8} {'attn ms':>8} {'mlp ms':>7} {'head ms':>8} "
                     f"{'full 1 tok ms':>13} {'verify 5/1':>10} {'measured':>8}\n")
    for i, c in enumerate(model.contexts):
        full1 = model.full_step_seconds(n_layers, c, 1)
        full5 = model.full_step_seconds(n_layers, c, 5)
        seen = "-"  # the full steps of 5 and 1 tokens as timed, when 5 was a profiled count
        if measured is not None and 5 in ns and i < len(measured):
            seen = f"{measured[i][ns.index(5)] / measured[i][ns.index(1)]:.2f}x"
        sys.stdout.write(
            f"{int(c):>8} {1e3 * model.attention(c):>8.3f} {1e3 * model.mlp():>7.3f} "
            f"{1e3 * model.head():>8.3f} {1e3 * full1:>13.2f} {full5 / full1:>9.2f}x "
            f"{seen:>8}\n"
        )
    err = model.meta.get("full_step_max_rel_error")
    sys.stdout.write(f"fit: sum-of-blocks vs measured full step, worst error {err:.1%}\n")
    trust = model.meta.get("trust") or {}
    if trust.get("trusted") is False:
        sys.stdout.write(f"UNTRUSTED (kept by --force): {'; '.join(trust['reasons'])}\n")
    _timing_only_note(model.meta.get("timing_only_reason"))
    return 0


def _timing_only_note(reason: str | None) -> None:
    """One line on stdout when the profiled model is not a real one (random weights)."""
    if reason:
        sys.stdout.write(f"TIMING ONLY: {reason}; these latencies hold for any weights of "
                         "these shapes, dtype and device\n")


def _check(args: argparse.Namespace, backend: Any) -> int:
    """``--check``: the cached profile against a quick measurement, as one table."""
    from pathlib import Path

    from ..backends.profile_check import DEFAULT_TOLERANCE, check_profile
    from ..backends.profiling import default_profile_path
    from ..costmodels.io import load_cost_model
    from ..errors import KnapSpecError

    path = Path(args.out) if args.out else default_profile_path(backend)
    if not path.exists():
        raise KnapSpecError(f"no profile to check at {path}: run `knapspec profile` first")
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    result = check_profile(backend, load_cost_model(path),
                           repeats=3 if args.repeats is None else args.repeats,
                           tolerance=tolerance)
    sys.stdout.write(f"cached profile: {path}\n{result.table()}\n")
    _timing_only_note(getattr(backend, "timing_only_reason", None))
    if result.ok:
        sys.stdout.write(f"within {tolerance}x of this machine now\n")
        return 0
    sys.stderr.write(f"knapspec: warning: the cached profile is off by more than {tolerance}x "
                     "at the points marked 'off'; re-profile with `knapspec profile` on an "
                     "idle machine\n")
    return EXIT_CHECK_FAILED
