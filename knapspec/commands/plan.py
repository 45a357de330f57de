"""``knapspec plan``: the additive planner's plans from a cost model alone, one per context.

The planner is ``AdditivePlanner.for_model_spec``, so Python callers get the same plans.

Example::

    knapspec plan --model-spec llama-3.1-8b --hardware h100 --context 1024,32768,131072
    knapspec plan --config knapspec.toml   # its [costmodel] and planner.max_draft_length
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..blocks import BlockLayout
from ..costmodels import (
    HARDWARE_SPECS,
    MODEL_SPECS,
    RooflineCostModel,
    get_hardware_spec,
    get_model_spec,
    load_cost_model,
)
from ..errors import KnapSpecError, MissingDependencyError
from ..planner import AdditivePlanner, PlanContext, load_block_scores
from ..planner.solvers import METHODS
from .common import DEFAULTS, add_config_arguments, load_config

DEFAULT_CONTEXTS = (512, 2048, 8192, 32768, 131072)


def parse_contexts(text: str) -> list[int]:
    """``'1024,32768'`` -> ``[1024, 32768]``; raise naming the bad item."""
    out = []
    for item in text.split(","):
        item = item.strip().lower().replace("_", "")
        mult = 1
        if item.endswith("k"):
            item, mult = item[:-1], 1024
        if not item.isdigit() or int(item) * mult <= 0:
            raise KnapSpecError(
                f"--context: expected comma-separated positive integers (e.g. 1024,32768 or 32k), "
                f"got {text!r}"
            )
        out.append(int(item) * mult)
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="plan draft configurations from a cost model alone",
        description="For each context length, the plan of the additive planner (KnapSpec's "
        "knapsack over a per-block fidelity profile, no model in the loop; plans say "
        "\"strategy\": \"additive\") from a cost model alone: blocks skipped, draft length, "
        "predicted acceptance, tokens/s and speedup.  The same plan as "
        "knapspec.planner.AdditivePlanner.for_model_spec in Python.",
    )
    add_config_arguments(p)
    p.add_argument("--model-spec", default=None,
                   help=f"built-in decoder spec ({', '.join(MODEL_SPECS)}; default: "
                   f"{DEFAULTS['costmodel.model_spec']})")
    p.add_argument("--hardware", default=None,
                   help="built-in hardware spec for the roofline model "
                   f"({', '.join(HARDWARE_SPECS)}; default: {DEFAULTS['costmodel.hardware']})")
    p.add_argument("--cost-model", metavar="FILE",
                   help="cost-model JSON (e.g. from 'knapspec profile') instead of the roofline")
    p.add_argument("--context", default=None,
                   help="comma-separated context lengths in tokens "
                   "(default: 512,2048,8192,32768,131072 up to the model's limit)")
    p.add_argument("--scores", metavar="FILE",
                   help="per-block fidelity profile JSON (default: measured on SmolLM2-135M)")
    p.add_argument("--max-draft-length", type=int, default=None,
                   help="largest draft length in tokens (default: "
                   f"{DEFAULTS['planner.max_draft_length']})")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="knapsack solver (default: planner.method of --config, else exact)")
    p.add_argument("--resolution", type=int, default=512,
                   help="integer cost units for all skippable blocks together")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--plot", metavar="PNG", help="draw skipped blocks and speedup vs context")
    p.set_defaults(func=run)


def plan_config(args: argparse.Namespace) -> Any:
    """The configuration ``plan`` reads: ``[costmodel]`` (roofline unless the file or
    ``--cost-model`` names a JSON file), ``planner.max_draft_length``, ``planner.method``
    and ``planner.pinned_blocks``."""
    config = load_config(args, {"costmodel.source": "roofline"})
    if config.costmodel.source == "profile":
        raise KnapSpecError(
            'costmodel.source: "profile" needs a backend; knapspec plan takes "roofline" or '
            "a cost-model JSON file"
        )
    return config


def make_plans(args: argparse.Namespace, config: Any = None) -> list[dict[str, Any]]:
    """One plan per context length (``config``: from ``plan_config(args)`` if not given)."""
    from ..runtime import config_layout, round_knobs

    config = plan_config(args) if config is None else config
    cm = config.costmodel
    spec = get_model_spec(cm.model_spec)
    if cm.is_file:
        cost_model = load_cost_model(cm.source)
    else:
        cost_model = RooflineCostModel(spec, get_hardware_spec(cm.hardware))
    if args.context is None:
        contexts = [c for c in DEFAULT_CONTEXTS if c <= spec.max_context] or [spec.max_context]
    else:
        contexts = parse_contexts(args.context)
    too_long = [c for c in contexts if c > spec.max_context]
    if too_long:
        raise KnapSpecError(
            f"--context {too_long[0]} exceeds {spec.name}'s context limit of {spec.max_context}"
        )
    layout = config_layout(config, BlockLayout(spec.n_layers))
    scores = load_block_scores(args.scores, spec.n_layers) if args.scores else None
    planner = AdditivePlanner.for_model_spec(
        spec, cost_model, layout=layout, scores=scores,
        max_draft_length=config.planner.max_draft_length, resolution=args.resolution,
        method=args.method or config.planner.method or "exact",
    )
    planner.knobs = round_knobs(config, prior_head_sizes(spec.vocab_size))
    rows = [planner.plan(PlanContext(context=c)).to_dict() for c in contexts]
    reason = (getattr(cost_model, "meta", None) or {}).get("timing_only_reason")
    if reason:  # measured on random weights: real latencies, flagged as everywhere else
        for r in rows:
            r.update(timing_only=True, timing_only_reason=f"cost model profiled on {reason}")
    return rows


def prior_head_sizes(vocab_size: int) -> dict[int, float]:
    """``{K: coverage}`` of reduced draft heads for a model of ``vocab_size`` ids with no
    backend to ask: the shipped ranking's sizes and coverages at the same fractions of the
    vocabulary (measured on SmolLM2-135M's tokenizer; a prior for other tokenizers, as the
    fidelity profile is).  ``{}`` when no ranking is shipped."""
    from ..draft_vocab import VocabRanking, shipped_rankings

    found = shipped_rankings()
    if not found:
        return {}
    name, obj = found[0]
    ranking = VocabRanking.from_json(obj, name)
    v0 = ranking.ids.size
    out = {}
    for k0, cover in ranking.sizes().items():
        k = k0 if v0 == vocab_size else max(64, round(k0 * vocab_size / v0 / 64) * 64)
        if k < vocab_size:
            out[k] = cover
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'context':>8} {'attn skip':>9} {'mlp skip':>8} {'d':>2} {'head K':>7} " \
           f"{'stop':>5} {'alpha':>6} {'tok/s':>10} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['context']:>8} {r['attn_skipped']:>9} {r['mlp_skipped']:>8} "
            f"{r['draft_length']:>2} {r['draft_vocab'] or 'full':>7} "
            f"{r['stop_confidence']:>5.2f} {r['predicted_alpha']:>6.3f} "
            f"{r['predicted_tpt']:>10.1f} "
            f"{r['predicted_speedup']:>7.3f}x"
        )
    return "\n".join(lines)


def plot_plans(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Skipped attention/MLP counts and predicted speedup against context (PNG, atomic)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError(
            "--plot needs matplotlib: pip install 'knapspec[plot]'"
        ) from None
    from .._io import atomic_write

    ctx = [r["context"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(ctx, [r["attn_skipped"] for r in rows], "o-", label="attention blocks skipped")
    ax1.plot(ctx, [r["mlp_skipped"] for r in rows], "s-", label="MLP blocks skipped")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context length (tokens)")
    ax1.set_ylabel("blocks skipped while drafting")
    ax2 = ax1.twinx()
    ax2.plot(ctx, [r["predicted_speedup"] for r in rows], "k^--", label="predicted speedup")
    ax2.set_ylabel("predicted speedup over autoregressive (x)")
    ax2.axhline(1.0, color="grey", lw=0.5)
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax1.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), suffix=".png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.plot:
        from .._io import check_writable

        check_writable(args.plot)
    config = plan_config(args)
    rows = make_plans(args, config)
    cm = config.costmodel
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        src = cm.source if cm.is_file else f"roofline on {cm.hardware}"
        sys.stdout.write(f"Additive-planner plans for {cm.model_spec} ({src})\n{_table(rows)}\n")
        if rows and rows[0].get("timing_only"):
            sys.stdout.write(f"TIMING ONLY: {rows[0]['timing_only_reason']}\n")
    if args.plot:
        where = cm.source if cm.is_file else cm.hardware
        plot_plans(rows, args.plot, f"Additive-planner plans: {cm.model_spec}, {where}")
    return 0
