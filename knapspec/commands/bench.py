"""``knapspec bench``: every strategy (and Hugging Face peers) on the same prompts in one run.

Examples::

    knapspec bench --strategies ar,knapspec,clasp --peers --context-tokens 100,2000,6000 \
        --out results.json --plot bench.png
    knapspec bench --sweep --context-tokens 2000,6000 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import KnapSpecError
from ..planner.factory import STRATEGIES
from .generate import add_backend_arguments
from .plan import parse_contexts

PEERS = ("hf-generate", "hf-prompt-lookup", "hf-early-exit")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="compare strategies (and Hugging Face peers) on real prompts in one run",
        description="Tokens/s (decode, prefill excluded), speedup over the same backend's "
        "autoregressive decoding, acceptance and time split; medians over repeats.",
    )
    add_backend_arguments(p)
    p.add_argument("--strategies", default="ar,knapspec,clasp,static,early-exit,additive",
                   help=f"comma-separated, from {', '.join(STRATEGIES)}")
    p.add_argument("--peers", action="store_true",
                   help="add Hugging Face generate(): greedy, prompt lookup, early-exit assisted")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="Spec-Bench jsonl or the folder holding it and the books "
                   "(default: ../shared/data)")
    p.add_argument("--context-tokens", default="100,2000,6000",
                   help="context buckets in tokens (< 500: Spec-Bench questions; else book slices)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per context bucket")
    p.add_argument("--prompt-file", metavar="F", default=None,
                   help="for --sweep: the text to fill the context with (default: a book slice)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-draft-length", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; medians reported")
    p.add_argument("--peer-repeats", type=int, default=1,
                   help="runs per Hugging Face peer cell (each pays a full prefill)")
    p.add_argument("--sweep", action="store_true",
                   help="force plans (skip budgets x draft lengths) and report predicted vs "
                   "measured tokens/s")
    p.add_argument("--out", metavar="FILE", default=None, help="write all results as JSON")
    p.add_argument("--markdown", metavar="FILE", default=None, help="write the table as markdown")
    p.add_argument("--plot", metavar="PNG", default=None, help="draw the results")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    sys.stderr.write(f"\r\x1b[K[bench] {msg}")
    sys.stderr.flush()


def _sweep_prompt(args: argparse.Namespace, backend: Any, ctx: int) -> Any:
    from ..bench import Prompt, make_prompts

    if not args.prompt_file:
        return make_prompts(backend, [ctx], 1, Path(args.data) if args.data else None)[0]
    try:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as e:
        raise KnapSpecError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    ids = backend.encode(text, chat=False)[:ctx]
    if len(ids) < ctx:
        raise KnapSpecError(f"--prompt-file has {len(ids)} tokens, fewer than the {ctx} asked")
    return Prompt(Path(args.prompt_file).name, ctx, ids)


def _plot(path: str, summary: list[dict[str, Any]], points: list[dict[str, Any]] | None) -> None:
    from .._io import atomic_write

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KnapSpecError("--plot needs matplotlib: pip install 'knapspec[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    if points is not None:
        x = [p["predicted_tps"] for p in points]
        y = [p["measured_tps"] for p in points]
        ax.scatter(x, y, c=[p["context"] for p in points], cmap="viridis")
        lim = [0, max(x + y) * 1.05]
        ax.plot(lim, lim, "k--", lw=0.5)
        ax.set_xlabel("predicted tokens/s")
        ax.set_ylabel("measured tokens/s")
        ax.set_title("forced plans: predicted vs measured")
    else:
        strategies = list(dict.fromkeys(s["strategy"] for s in summary))
        contexts = sorted({s["context"] for s in summary})
        width = 0.8 / len(strategies)
        for i, st in enumerate(strategies):
            vals = [next((s["speedup"] for s in summary
                          if s["strategy"] == st and s["context"] == c), 0) for c in contexts]
            ax.bar([j + i * width for j in range(len(contexts))], vals, width, label=st)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))],
                      [str(c) for c in contexts])
        ax.set_xlabel("context bucket (tokens)")
        ax.set_ylabel("speedup over autoregressive (x)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), suffix=".png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from .._io import atomic_write_text, check_writable
    from ..backends import create_backend
    from ..bench import benchmark, make_prompts, markdown_table, pearson, summarize, sweep
    from ..runtime import backend_cost_model

    for path in (args.out, args.markdown, args.plot):
        if path:
            check_writable(path)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise KnapSpecError(f"unknown strategy {unknown[0]!r} (available: {', '.join(STRATEGIES)})")
    if args.repeats < 1 or args.prompts < 1 or args.max_new_tokens < 2:
        raise KnapSpecError("--repeats and --prompts must be >= 1, --max-new-tokens >= 2")
    contexts = parse_contexts(args.context_tokens)
    options = {} if args.threads is None else {"threads": args.threads}
    backend = create_backend(args.backend, model=args.model, **options)
    cost_model = backend_cost_model(backend, args.cost_model)
    result: dict[str, Any] = {"backend": backend.describe(), "contexts": contexts}

    if args.sweep:
        points = []
        for c in contexts:
            points += sweep(backend, cost_model, _sweep_prompt(args, backend, c),
                            args.max_new_tokens, progress=_progress)
        sys.stderr.write("\n")
        result.update(pearson=pearson(points), points=points)
        summary = None
        table = "\n".join(
            f"{p['context']:>6} attn {p['attn_skipped']:>2} mlp {p['mlp_skipped']:>2} "
            f"d {p['draft_length']} alpha {p['predicted_alpha']:.2f}/{p['measured_alpha']:.2f} "
            f"predicted {p['predicted_tps']:7.2f} measured {p['measured_tps']:7.2f} tok/s"
            for p in points) + f"\nPearson r = {result['pearson']:.3f}"
    else:
        prompts = make_prompts(backend, contexts, args.prompts,
                               Path(args.data) if args.data else None)
        peers = PEERS if args.peers else ()
        rows = benchmark(backend, cost_model, prompts, strategies, peers, args.max_new_tokens,
                         args.repeats, args.max_draft_length, progress=_progress,
                         peer_repeats=args.peer_repeats)
        sys.stderr.write("\n")
        summary = summarize(rows)
        result.update(rows=rows, summary=summary)
        table = markdown_table(summary)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))
    if args.markdown:
        atomic_write_text(args.markdown, table + "\n")
    if args.plot:
        _plot(args.plot, summary or [], result.get("points"))
    if args.json:
        json.dump({k: v for k, v in result.items() if k != "rows"}, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table + "\n")
    return 0
