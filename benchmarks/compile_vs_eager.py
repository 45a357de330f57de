"""Does torch.compile pay on this machine?  Eager vs ``torch-compile`` backend, same run.

For each context bucket (Spec-Bench question for ~100 tokens, book slices for longer ones,
from ``knapspec.benchmarking.make_prompts``), decode ``--new-tokens`` tokens with plain
autoregressive decoding (``ar``) and with KnapSpec (``knapspec`` strategy), on the eager and
on the compiled backend, runs interleaved (eager, compiled, eager, compiled, ...), and print
the median decode tokens/s of each and the compiled/eager ratio.  Both backends plan with
the same cost model (the eager backend's cached profile, ``--cost-model`` to override), so
the plans are comparable and only the block execution differs.  Prefill is excluded from
tokens/s; one prefill per context is shared: the eager backend's KV cache is copied into the
compiled one, after which both reuse it through prompt caching.

A micro-benchmark of single block calls (attention at the context length, MLP, one token)
shows the per-call picture: compiled wrapper overhead against the work inside a block.

Usage:
    python benchmarks/compile_vs_eager.py [--contexts 100,2000,6000] [--new-tokens 32]
        [--repeats 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from knapspec.backends.profiling import cached_profile
from knapspec.backends.torch.blocks import attention_block, mlp_block
from knapspec.backends.torch.compile import TorchCompileBackend, compile_counters
from knapspec.backends.torch.eager import TorchEagerBackend
from knapspec.backends.torch.loading import load_torch_model
from knapspec.benchmarking import make_prompts
from knapspec.costmodels import load_cost_model
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.planner.factory import make_planner


def load() -> str:
    """``uptime``'s load averages (1, 5, 15 min)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def share_prompt(src: TorchEagerBackend, dst: TorchEagerBackend, ids: list[int]) -> None:
    """Prefill ``ids`` on ``src`` and copy its KV cache into ``dst`` (same model): ``dst``'s
    next ``prefill(ids)`` then recomputes only the last token (prompt caching)."""
    src.prefill(ids)
    n = src.length
    with torch.inference_mode():
        dst.k_cache[:, :, :n] = src.k_cache[:, :, :n]
        dst.v_cache[:, :, :n] = src.v_cache[:, :, :n]
    dst.reset()
    dst.cache.append(list(src.cached_tokens()), full=True)  # these full-model tokens


def block_micro(eager: TorchEagerBackend, comp: TorchCompileBackend, context: int,
                repeats: int = 200) -> dict[str, float]:
    """Median microseconds of one attention block (at ``context``) and one MLP block on one
    token, eager function vs compiled, calls interleaved in rounds of 20."""
    fns = {"eager": (attention_block, mlp_block),
           "compiled": (comp._compiled.attention, comp._compiled.mlp)}
    be = comp
    cfg, layer = be.attn_cfg, be.layout.n_layers // 2
    out: dict[str, list[float]] = {f"{k}_{b}": [] for k in fns for b in ("attn", "mlp")}
    with torch.inference_mode():
        x = torch.randn(1, be.dim, dtype=be.dtype)  # [1, D]
        cos, sin = be.cos[context : context + 1], be.sin[context : context + 1]  # [1, hd]
        k, v = be.k_cache[layer].clone(), be.v_cache[layer].clone()  # scratch [KV, C, hd]
        for _ in range(repeats // 20):
            for name, (attn, mlp) in fns.items():
                for _ in range(20):
                    t0 = time.perf_counter()
                    attn(x, be.attn_w[layer], cfg, k, v, cos, sin, context, None)
                    t1 = time.perf_counter()
                    mlp(x, be.mlp_w[layer], be.eps, be.act)
                    t2 = time.perf_counter()
                    out[f"{name}_attn"].append(t1 - t0)
                    out[f"{name}_mlp"].append(t2 - t1)
    return {k: 1e6 * statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="100,2000,6000")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", default="ar,knapspec")
    ap.add_argument("--cost-model", default=None, help="cost model JSON for both backends")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    strategies = args.strategies.split(",")

    torch.set_num_threads(args.threads)
    loaded = load_torch_model()
    eager = TorchEagerBackend(loaded, threads=args.threads)
    before = compile_counters()
    comp = TorchCompileBackend(loaded, threads=args.threads)
    print(f"compiled warm-up: {comp.warmup_seconds:.1f} s, {comp.warmup_graphs} graphs, "
          f"FX graph cache {comp.warmup_cache} (load {load()})")
    cost = (load_cost_model(args.cost_model) if args.cost_model
            else cached_profile(eager))  # measured once per machine, then cached
    backends = {"eager": eager, "compiled": comp}
    report: dict = {"warmup_seconds": comp.warmup_seconds, "warmup_graphs": comp.warmup_graphs,
                    "warmup_cache": comp.warmup_cache, "threads": args.threads, "rows": []}

    for prompt in make_prompts(eager, contexts, 1):
        t0 = time.perf_counter()
        share_prompt(eager, comp, prompt.ids)
        print(f"\ncontext {prompt.context} ({len(prompt.ids)} prompt tokens, {prompt.name}): "
              f"shared prefill {time.perf_counter() - t0:.0f} s, load {load()}")
        micro = block_micro(eager, comp, len(prompt.ids))
        print("  one block, 1 token (us): attention eager {eager_attn:.0f} compiled "
              "{compiled_attn:.0f}; MLP eager {eager_mlp:.0f} compiled {compiled_mlp:.0f}"
              .format(**micro))
        for strategy in strategies:
            tps: dict[str, list[float]] = {k: [] for k in backends}
            tokens: dict[str, list[int]] = {}
            drafted: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, be in backends.items():  # interleaved
                    planner = make_planner(strategy, be.layout, cost)
                    res = SpeculativeDecoder(be, planner).generate(
                        prompt.ids, GenerationConfig(args.new_tokens))
                    tps[name].append(res.tokens_per_second)
                    tokens[name] = res.tokens
                    drafted[name] = res.drafted
            med = {k: statistics.median(v) for k, v in tps.items()}
            ratio = med["compiled"] / med["eager"]
            print(f"  {strategy:>9}: eager {med['eager']:6.2f} tok/s, compiled "
                  f"{med['compiled']:6.2f} tok/s, compiled/eager {ratio:.3f} "
                  f"(runs {fmt(tps['eager'])} / {fmt(tps['compiled'])}; "
                  f"drafted {drafted}; same tokens "
                  f"{tokens['eager'] == tokens['compiled']}; load {load()})")
            report["rows"].append({
                "context": prompt.context, "prompt_tokens": len(prompt.ids),
                "strategy": strategy, "eager_tps": tps["eager"], "compiled_tps": tps["compiled"],
                "ratio": ratio, "drafted": drafted, "load": load(), "block_us": micro,
            })
    after = compile_counters()
    report["graphs_compiled_after_warmup"] = comp.recompilations()
    print(f"\ngraphs compiled after the warm-up: {comp.recompilations()} "
          f"(dynamo unique_graphs {before['unique_graphs']} -> {after['unique_graphs']})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
