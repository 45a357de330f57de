"""Tokens/s of llama-cpp-python alone and with knapspec's draft model (``draft_model=``).

For each prompt, in one process and with the same thread count, this decodes
``--new-tokens`` tokens greedily with ``llama_cpp.Llama.generate`` three ways:

* ``llama-cpp-python``: plain ``Llama`` (one-token decoding);
* ``knapspec-draft (<strategy>)``: ``Llama(draft_model=KnapSpecDraftModel(...))`` with the
  configured strategy and cost model (the planner's choice; it returns no drafts where none
  pays);
* ``knapspec-draft (forced)``: the same with a forced plan (every 4th attention block from
  layer 2 skipped, ``--draft-length`` tokens per round).

Each mode first decodes a short warm-up prompt, untimed (the forced draft's GGUF is written
and loaded there).  Decode time runs from the first generated token to the last (prefill
excluded; a drafting generation's first KV copy into the draft is included), so tokens/s
is ``(new_tokens - 1) / seconds``.  Modes alternate within each repeat; each row reports the
median over repeats and prompts, the speedup over plain llama-cpp-python, the draft model's
acceptance, and whether every output equals plain greedy (llama.cpp's batched verification
may differ on near-ties, see docs/backends.md).  One JSON document to stdout (and
``--json``), then a markdown table on stderr.

Usage:
    python benchmarks/llama_cpp_draft.py [--model GGUF] [--threads 2] [--contexts 100,2000]
        [--prompts 3] [--new-tokens 128] [--repeats 3] [--draft-length 4]
        [--config knapspec.toml] [--no-flash-attn] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from llama_cpp import Llama

from knapspec.benchmarking import make_prompts
from knapspec.costmodels import LinearCostModel
from knapspec.integrations.llama_cpp import KnapSpecDraftModel, as_knapspec_config
from knapspec.planner import StaticPlanner

# the forced plan is used as given whatever this predicts (no figure comes from it)
_COST = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4, head_s=2e-3,
                        overhead_s=1e-3)


def decode(llm: Llama, prompt: list[int], n: int) -> tuple[list[int], float]:
    """``n`` greedy tokens and the seconds from the first to the last of them."""
    out: list[int] = []
    t0 = 0.0
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        if not out:
            t0 = time.perf_counter()
        out.append(int(tok))
        if len(out) == n:
            break
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="100,2000",
                    help="context buckets (< 500: Spec-Bench questions, else book slices)")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per context")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-length", type=int, default=4, help="the forced plan's")
    ap.add_argument("--config", default=None,
                    help="knapspec.toml for the planner's-choice mode (default: defaults)")
    ap.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                    help="Llama's default (off); on by default here, as the docs advise")
    ap.add_argument("--json", metavar="FILE", default=None)
    args = ap.parse_args()

    contexts = [int(c) for c in args.contexts.split(",")]
    n_ctx = max(contexts) + args.new_tokens + 64
    config = as_knapspec_config(args.config)
    opts = {"threads": args.threads, "max_context": n_ctx}
    chosen = KnapSpecDraftModel(args.model, config, **opts)
    layout = chosen.backend.layout
    mask = layout.empty_mask()
    mask[[2 * i for i in range(2, layout.n_layers - 1, 4)]] = True
    forced = KnapSpecDraftModel(
        args.model, config, planner=StaticPlanner(layout, _COST, mask, 0.8,
                                                  draft_length=args.draft_length), **opts)
    path = str(chosen.backend.model_path)
    strategy = config.planner.strategy
    common = {"n_ctx": n_ctx, "n_threads": args.threads, "n_threads_batch": args.threads,
              "flash_attn": args.flash_attn, "verbose": False}
    # logits_all=True with a draft model: llama-cpp-python 0.3.x needs it past n_batch tokens
    modes: dict[str, tuple[Llama, KnapSpecDraftModel | None]] = {
        "llama-cpp-python": (Llama(path, **common), None),
        f"knapspec-draft ({strategy})": (
            Llama(path, draft_model=chosen, logits_all=True, **common), chosen),
        "knapspec-draft (forced)": (
            Llama(path, draft_model=forced, logits_all=True, **common), forced),
    }
    # once per mode, untimed: the draft GGUF is written (first use on this machine) and
    # loaded, and llama.cpp's first calls warm up
    warm = chosen.backend.encode("Say hello.")
    for llm, _ in modes.values():
        decode(llm, warm, 8)
    rows: list[dict[str, Any]] = []
    for c in contexts:
        prompts = make_prompts(chosen.backend, [c], args.prompts, None)
        tps: dict[str, list[float]] = {m: [] for m in modes}
        same = dict.fromkeys(modes, True)
        before = {m: dm.stats.to_dict() for m, (_, dm) in modes.items() if dm is not None}
        for p in prompts:
            plain_tokens = None
            for _ in range(args.repeats):
                for m, (llm, _dm) in modes.items():
                    toks, secs = decode(llm, p.ids, args.new_tokens)
                    tps[m].append((len(toks) - 1) / secs if secs > 0 else 0.0)
                    if m == "llama-cpp-python":
                        plain_tokens = toks
                    else:
                        same[m] &= toks == plain_tokens
        base = statistics.median(tps["llama-cpp-python"])
        for m, (_, dm) in modes.items():
            med = statistics.median(tps[m])
            row = {"context": c, "prompt_tokens": statistics.median(len(p.ids) for p in prompts),
                   "mode": m, "tokens_per_second": med, "speedup": med / base,
                   "runs": len(tps[m]), "same_tokens_as_plain": same[m]}
            if dm is not None:
                a, b = dm.stats.to_dict(), before[m]
                drafted = a["drafted"] - b["drafted"]
                reported = a["reported"] - b["reported"]
                row.update(drafted=drafted, acceptance=(a["accepted"] - b["accepted"]) / reported
                           if reported else 0.0, plans=a["plans"][len(b["plans"]):][:4])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plans"}), file=sys.stderr)
    out = {"model": Path(path).name, "threads": args.threads, "new_tokens": args.new_tokens,
           "flash_attn": args.flash_attn,
           "repeats": args.repeats, "prompts_per_context": args.prompts,
           "forced_plan": {"skipped_blocks": [int(b) for b in mask.nonzero()[0]],
                           "draft_length": args.draft_length},
           "strategy": strategy, "rows": rows}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    print("\n| context (prompt tokens) | mode | tok/s | speedup vs llama-cpp-python | "
          "acceptance | drafted | same tokens as plain |\n|---|---|---|---|---|---|---|",
          file=sys.stderr)
    for r in rows:
        acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "-"
        print(f"| {r['context']} ({r['prompt_tokens']:.0f}) | {r['mode']} | "
              f"{r['tokens_per_second']:.2f} | {r['speedup']:.3f}x | {acc} | "
              f"{r.get('drafted', '-')} | {'yes' if r['same_tokens_as_plain'] else 'NO'} |",
              file=sys.stderr)
    for dm in (chosen, forced):
        dm.close()


if __name__ == "__main__":
    main()
