"""How often does llama.cpp speculative greedy output differ from llama.cpp greedy decoding?

llama.cpp's attention is not batch-invariant, so a token verified in a batch of ``d + 1``
can differ from what one-token decoding picks when its top-2 logits nearly tie.  For each
prompt this decodes ``--new-tokens`` tokens plainly and with a forced draft (so that
verification really batches), and reports whether the outputs are identical, where they
part, and the teacher-forced agreement: the share of the speculative tokens that one-token
greedy decoding picks given the same prefix, with the top-2 logit gap at each disagreement.

Usage:
    python benchmarks/llamacpp_agreement.py [--model GGUF] [--prompts 6] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from knapspec.backends import create_backend
from knapspec.benchmarking import make_prompts
from knapspec.costmodels import LinearCostModel
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.planner import StaticPlanner
from knapspec.planner.factory import make_planner

# a cost model under which the forced plan is used as given (timing is not measured here)
_COST = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4, head_s=2e-3,
                        overhead_s=1e-3)


def teacher_forced(backend, prompt: list[int], tokens: list[int]) -> tuple[int, list[float]]:
    """Tokens that one-token greedy decoding agrees with, and the top-2 gaps where not."""
    backend.reset()
    logits = backend.prefill(prompt)
    agree, gaps = 0, []
    for tok in tokens:
        best = int(np.argmax(logits))
        if best == tok:
            agree += 1
        else:
            gaps.append(float(logits[best] - logits[tok]))
        logits = backend.forward([tok], None, all_logits=False)[-1]
    return agree, gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="100,100,100,2000,2000,6000",
                    help="context bucket per prompt (< 500: Spec-Bench, else book slices)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-length", type=int, default=4)
    ap.add_argument("--json", metavar="FILE", default=None)
    args = ap.parse_args()
    be = create_backend("llamacpp", model=args.model, threads=args.threads)
    n = be.layout.n_layers
    # every 4th attention block from layer 2 on (a mid-fidelity draft that really drafts)
    mask = be.layout.empty_mask()
    mask[[2 * i for i in range(2, n - 1, 4)]] = True
    buckets = [int(c) for c in args.contexts.split(",")]
    prompts = []
    for c in sorted(set(buckets)):
        prompts += make_prompts(be, [c], buckets.count(c), None)
    cfg = GenerationConfig(args.new_tokens, stop_at_eos=False)
    ar = SpeculativeDecoder(be, make_planner("ar", be.layout, _COST))
    spec = SpeculativeDecoder(
        be, StaticPlanner(be.layout, _COST, mask, 0.8, draft_length=args.draft_length))
    rows, total, agreed = [], 0, 0
    for p in prompts:
        a = ar.generate(p.ids, cfg)
        s = spec.generate(p.ids, cfg)
        pairs = zip(a.tokens, s.tokens, strict=True)
        first = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
        ok, gaps = teacher_forced(be, p.ids, s.tokens)
        total += len(s.tokens)
        agreed += ok
        rows.append({"prompt": p.name, "prompt_tokens": len(p.ids), "identical": first is None,
                     "first_difference": first, "acceptance": s.acceptance_rate,
                     "teacher_forced_agreement": ok / len(s.tokens), "gaps": gaps})
        print(json.dumps(rows[-1]), file=sys.stderr)
    out = {"mask_attention_skipped": int(mask[0::2].sum()), "draft_length": args.draft_length,
           "rows": rows, "aggregate_agreement": agreed / total,
           "identical": sum(r["identical"] for r in rows), "prompts": len(rows)}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
