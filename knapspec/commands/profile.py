"""``knapspec profile``: measure a backend's latencies into a cost-model JSON file.

Example::

    knapspec profile --out smollm2-torch.json
    knapspec profile --config knapspec.toml      # the [model] and [backend] of the file
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_backend_arguments


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure per-block latencies against context length into a cost model",
        description="Time real forward passes (full, attention-free, MLP-free, block-free) at "
        "several context lengths and token counts; write a table cost model (JSON).",
    )
    add_backend_arguments(p, cost_model=False)
    p.add_argument("--out", metavar="FILE", default=None,
                   help="where to write the cost model (default: the backend's cache entry, "
                   "which generate and bench reuse)")
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths (default: 64 ... the model's limit)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point (median)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._io import check_writable
    from ..backends.profiling import cached_profile
    from ..runtime import build_backend
    from .common import load_config
    from .plan import parse_contexts

    if args.out:
        check_writable(args.out)
    contexts = parse_contexts(args.contexts) if args.contexts else None
    backend = build_backend(load_config(args))
    model = cached_profile(backend, path=args.out, refresh=True, contexts=contexts,
                           repeats=args.repeats)
    n_layers = backend.layout.n_layers
    sys.stdout.write(f"{'context':>8} {'attn ms':>8} {'mlp ms':>7} {'head ms':>8} "
                     f"{'full 1 tok ms':>13} {'verify 4/1':>10}\n")
    for c in model.contexts:
        full1 = model.full_step_seconds(n_layers, c, 1)
        full4 = model.full_step_seconds(n_layers, c, 4)
        sys.stdout.write(
            f"{int(c):>8} {1e3 * model.attention(c):>8.3f} {1e3 * model.mlp():>7.3f} "
            f"{1e3 * model.head():>8.3f} {1e3 * full1:>13.2f} {full4 / full1:>9.2f}x\n"
        )
    err = model.meta.get("full_step_max_rel_error")
    sys.stdout.write(f"fit: sum-of-blocks vs measured full step, worst error {err:.1%}\n")
    return 0
