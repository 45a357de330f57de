"""``knapspec bench``: every strategy (and Hugging Face peers) on the same prompts in one run.

Examples::

    knapspec bench --strategies ar,knapspec,clasp --peers --context-tokens 100,2000,6000 \
        --out results.json --plot bench.png
    knapspec bench --sweep --context-tokens 2000,6000 --json
    knapspec bench --config knapspec.toml --backends torch,torch-compile,llamacpp
    knapspec bench --sweep --simulate-acceptance predicted --context-tokens 2000,6000
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import KnapSpecError
from ..planner.factory import STRATEGIES, strategy_names, unknown_strategy
from .common import add_backend_arguments, add_generation_arguments, add_planner_arguments
from .plan import parse_contexts

ALL_STRATEGIES = "ar,knapspec,clasp,static,early-exit,additive"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="compare strategies (and Hugging Face peers) on real prompts in one run",
        description="Tokens/s (decode, prefill excluded), speedup over the same backend's "
        "autoregressive decoding, acceptance and time split; medians over repeats.  With "
        "--backends, the same prompts, contexts and strategies on each backend in turn, with "
        "each backend's tokens/s over the first's.  Model, backend options, planner, cost "
        "model and sampling come from --config FILE, overridden by flags.",
    )
    add_backend_arguments(p)
    p.add_argument("--backends", metavar="A,B,...", default=None,
                   help="comma-separated backends to compare in one run (one in memory at a "
                   "time); overrides --backend and backend.name")
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated, from {', '.join(STRATEGIES)} or a strategy an "
                   "installed package registers (default: ar and "
                   f"planner.strategy when the config or --strategy sets it, else "
                   f"{ALL_STRATEGIES})")
    p.add_argument("--strategy", default=None,
                   help="set planner.strategy (bench runs ar and it unless --strategies)")
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
    add_generation_arguments(p, sampling=False)
    add_planner_arguments(p, strategy=False)
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; medians reported")
    p.add_argument("--peer-repeats", type=int, default=1,
                   help="runs per Hugging Face peer cell (each pays a full prefill)")
    p.add_argument("--sweep", action="store_true",
                   help="force plans (skip budgets x draft lengths) and report predicted vs "
                   "measured tokens/s")
    p.add_argument("--sweep-draft-vocab", metavar="K", type=int, default=0,
                   help="with --sweep: also force every plan with the backend's reduced draft "
                   "head of K ids (torch backends; see draft_vocab_sizes)")
    p.add_argument("--simulate-acceptance", metavar="SPEC", default=None,
                   help="timing only: run everything for real but draw each round's accepted "
                   "drafts at the plan's predicted acceptance ('predicted'), a fixed one "
                   "('0.7') or the prediction scaled ('0.9xpredicted'); a suffix ',qmc' "
                   "(default: each round's count from a rotated golden-ratio sequence, "
                   "low variance) or ',iid' (independent draws) picks the draws; seeded by "
                   "generation.seed (default 0); results are flagged timing-only")
    p.add_argument("--out", metavar="FILE", default=None, help="write all results as JSON")
    p.add_argument("--markdown", metavar="FILE", default=None, help="write the table as markdown")
    p.add_argument("--plot", metavar="PNG", default=None, help="draw the results")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    sys.stderr.write(f"\r\x1b[K[bench] {msg}")
    sys.stderr.flush()


def _sweep_prompt(args: argparse.Namespace, backend: Any, ctx: int) -> Any:
    from ..benchmarking import Prompt, make_prompts

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
        series = list(dict.fromkeys((s.get("backend"), s["strategy"]) for s in summary))
        contexts = sorted({s["context"] for s in summary})
        width = 0.8 / len(series)
        multi = len({b for b, _ in series}) > 1
        for i, (be, st) in enumerate(series):
            vals = [next((s["speedup"] for s in summary if s["strategy"] == st
                          and s.get("backend") == be and s["context"] == c), 0)
                    for c in contexts]
            ax.bar([j + i * width for j in range(len(contexts))], vals, width,
                   label=f"{be} {st}" if multi else st)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))],
                      [str(c) for c in contexts])
        ax.set_xlabel("context bucket (tokens)")
        ax.set_ylabel("speedup over autoregressive (x)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), suffix=".png")
    plt.close(fig)


def _strategies(args: argparse.Namespace, config: Any) -> list[str]:
    from ..config import DEFAULT

    if args.strategies is not None:
        text = args.strategies
    elif config.source_of("planner.strategy") != DEFAULT:
        text = f"ar,{config.planner.strategy}"
    else:
        text = ALL_STRATEGIES
    strategies = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    known = strategy_names()
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise unknown_strategy(unknown[0])
    return strategies


def _backend_configs(args: argparse.Namespace, config: Any, strategies: list[str]) -> list[Any]:
    """One validated config per backend, before any model loads: a shared option a backend
    does not take, or a planner key a strategy does not take, fails here."""
    from ..backends import backend_entry

    names = ([b.strip() for b in args.backends.split(",") if b.strip()]
             if args.backends is not None else [config.backend.name])
    if not names:
        raise KnapSpecError("--backends: expected comma-separated backend names")
    configs = []
    for name in dict.fromkeys(names):
        backend_entry(name)  # unknown names: the registry's message
        configs.append(config.for_backend(name))
    for s in strategies:
        if s != "ar":  # the baseline takes no options; it always runs
            config.planner.options_for(s)
    return configs


def _simulator(args: argparse.Namespace, config: Any) -> Any:
    """The ``--simulate-acceptance`` simulator (``None`` without the option), checked before
    any model loads."""
    if args.simulate_acceptance is None:
        return None
    from ..simulate import parse_simulate_acceptance

    seed = config.generation.seed
    return parse_simulate_acceptance(args.simulate_acceptance, 0 if seed is None else seed)


def _run_backend(
    args: argparse.Namespace, config: Any, strategies: list[str], contexts: list[int],
    simulator: Any = None,
) -> dict[str, Any]:
    """Build one backend, benchmark (or sweep) it, release it; rows carry its name."""
    from ..benchmarking import benchmark, make_prompts, peers_for, sweep
    from ..planner.factory import make_planner
    from ..runtime import build_backend, config_cost_model, config_planner

    name = config.backend.name
    backend = build_backend(config)
    layout = backend.layout
    try:
        cost_model = config_cost_model(
            config, backend, notice=lambda line: sys.stderr.write(f"knapspec: {line}\n"))
        info: dict[str, Any] = {"name": name, **backend.describe(),
                                "costmodel": config.costmodel.source}
        if args.sweep:
            points = []
            for c in contexts:
                points += sweep(backend, cost_model, _sweep_prompt(args, backend, c),
                                config.generation.max_new_tokens, progress=_progress,
                                simulator=simulator, draft_vocab=args.sweep_draft_vocab)
            rows = [{"backend": name, **p} for p in points]
        else:
            prompts = make_prompts(backend, contexts, args.prompts,
                                   Path(args.data) if args.data else None)
            peers = peers_for(backend) if args.peers else ()
            rows = benchmark(
                backend, cost_model, prompts, strategies, peers,
                config.generation.max_new_tokens, args.repeats,
                config.planner.max_draft_length, progress=_progress,
                peer_repeats=args.peer_repeats,
                planner_factory=lambda s: (make_planner(s, layout, cost_model) if s == "ar"
                                           else config_planner(config, layout, cost_model, s,
                                                              backend=backend)),
                generation=config.generation_config(), simulator=simulator,
            )
            rows = [{"backend": name, **r} for r in rows]
        warmup = getattr(backend, "warmup_seconds", None)
        if warmup is not None:  # e.g. torch.compile: compile time, outside decode time
            info["warmup_seconds"] = float(warmup)
        sys.stderr.write("\n")
        return {"info": info, "rows": rows}
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()


def run(args: argparse.Namespace) -> int:
    from .._io import atomic_write_text, check_writable
    from ..benchmarking import markdown_table, pearson, summarize, timing_only_note
    from .common import load_config

    for path in (args.out, args.markdown, args.plot):
        if path:
            check_writable(path)
    config = load_config(args)
    strategies = _strategies(args, config)
    if args.repeats < 1 or args.prompts < 1 or config.generation.max_new_tokens < 2:
        raise KnapSpecError("--repeats and --prompts must be >= 1, --max-new-tokens >= 2")
    if args.sweep_draft_vocab and not args.sweep:
        raise KnapSpecError("--sweep-draft-vocab applies to --sweep only")
    if args.sweep_draft_vocab < 0:
        raise KnapSpecError(f"--sweep-draft-vocab: expected K >= 1 ids, got "
                            f"{args.sweep_draft_vocab}")
    contexts = parse_contexts(args.context_tokens)
    simulator = _simulator(args, config)
    configs = _backend_configs(args, config, strategies)
    runs = []
    for c in configs:  # one backend in memory at a time
        runs.append(_run_backend(args, c, strategies, contexts, simulator))
        gc.collect()
    infos = [r["info"] for r in runs]
    rows = [row for r in runs for row in r["rows"]]
    result: dict[str, Any] = {"backend": infos[0], "backends": infos, "contexts": contexts,
                              "config": config.to_dict(),
                              "simulated_acceptance": simulator.spec if simulator else None,
                              "timing_only": any(r.get("timing_only") for r in rows)}
    warmups = "".join(f"\nwarm-up (outside decode time): {i['name']} {i['warmup_seconds']:.1f} s"
                      for i in infos if "warmup_seconds" in i)

    if args.sweep:
        result.update(pearson=pearson(rows), points=rows)
        summary = None
        table = "\n".join(
            f"{p['backend']:>13} {p['context']:>6} attn {p['attn_skipped']:>2} "
            f"mlp {p['mlp_skipped']:>2} "
            f"d {p['draft_length']} K {p.get('draft_vocab') or 'full':>5} "
            f"alpha {p['predicted_alpha']:.2f}/{p['measured_alpha']:.2f} "
            f"predicted {p['predicted_tps']:7.2f} measured {p['measured_tps']:7.2f} tok/s"
            for p in rows)
        for info in infos:
            pts = [p for p in rows if p["backend"] == info["name"]]
            info["pearson"] = pearson(pts)
            table += f"\nPearson r ({info['name']}) = {info['pearson']:.3f}"
        if simulator is not None:
            table += ("\nalpha: predicted/simulated (accepted drafts drawn, not verified); "
                      "predicted tok/s at the simulated alpha")
        table += timing_only_note(rows)
    else:
        summary = summarize(rows)
        result.update(rows=rows, summary=summary)
        table = markdown_table(summary)
    table += warmups
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
