"""knapspec inside transformers as its users call it: ``model.generate(custom_generate=...)``
against ``model.generate(do_sample=False)`` on the same SmolLM2 model and prompts.

Whole ``generate`` calls are timed (prefill included), 64 new tokens, 3 interleaved repeats
over two chat prompts, medians; the first knapspec call (backend build, warm-up, cost
model) is timed and reported apart.  Run with nothing else on the machine:

    python benchmarks/transformers_generate.py
"""

from __future__ import annotations

import statistics
import time

import torch

from knapspec.backends.torch.loading import load_torch_model
from knapspec.integrations.transformers import generate as knapspec_generate

PROMPTS = ("Explain how a refrigerator works, step by step.",
           "Write a short story about a lighthouse keeper who finds a message in a bottle.")
NEW_TOKENS, REPEATS = 64, 3


def main() -> None:
    torch.set_num_threads(2)
    loaded = load_torch_model(None)
    model, tok = loaded.model, loaded.tokenizer
    inputs = [tok.apply_chat_template([{"role": "user", "content": p}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True) for p in PROMPTS]
    t0 = time.perf_counter()
    out = model.generate(**inputs[0], custom_generate=knapspec_generate, max_new_tokens=8,
                         return_dict_in_generate=True)
    print(f"first knapspec call (one-time): {time.perf_counter() - t0:.1f} s; "
          f"{out.knapspec.plain_reason or 'drafted'}")
    tps: dict[str, list[float]] = {"hf greedy": [], "knapspec": []}
    same = True
    for _ in range(REPEATS):
        for x in inputs:
            t0 = time.perf_counter()
            a = model.generate(**x, do_sample=False, max_new_tokens=NEW_TOKENS)
            tps["hf greedy"].append(NEW_TOKENS / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            b = model.generate(**x, custom_generate=knapspec_generate, max_new_tokens=NEW_TOKENS)
            tps["knapspec"].append(NEW_TOKENS / (time.perf_counter() - t0))
            same &= a.tolist() == b.tolist()
    for name, values in tps.items():
        print(f"{name}: {statistics.median(values):.2f} tok/s (runs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(tps["knapspec"]) / statistics.median(tps["hf greedy"])
    print(f"knapspec / hf greedy: {ratio:.3f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
