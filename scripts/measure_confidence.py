"""Measure how a draft's confidence predicts its acceptance, and ship it with the profile.

The confidence stop (``knapspec.planner.knobs``) ends a round after the first draft whose
top-1 probability is below a threshold; the planner prices that with a
``ConfidenceTable``: for a few reference drafts, the share of draft steps per confidence
bin and their acceptance.  This script measures that table on SmolLM2-135M-Instruct (the
embedded default model, torch backend, float32) and stores it under the key
``"confidence"`` of ``knapspec/data/fidelity_smollm2-135m.json`` (the other keys are kept
as they are; the file is replaced atomically).

Reference drafts: skip the ``k`` least harmful skippable blocks of the shipped fidelity
profile (the first and last layer are pinned, as ``BlockLayout`` does by default), for a
few ``k`` whose acceptance spans ~0.2 to ~0.9.

Teacher forcing, as ``knapspec.benchmarking.forward_alphas`` and a real round do: the full
model is run over a text up to position ``p``; then each draft runs ``forward(ids[p:p+8],
mask)`` on top of the full model's cache (a round of 8 draft steps that sees the verified
history), the cache is rolled back to ``p``, and the full model runs the same 8 tokens to
advance.  At every position: confidence = softmax top-1 probability of the draft's logits
(temperature 1); accepted = the draft's argmax equals the full model's argmax.

Texts: slices of Pride and Prejudice, Frankenstein and tinyshakespeare, and Spec-Bench
prompts with the full model's own greedy continuations (only the continuation is measured:
the regime a greedy round drafts in), all from ``../shared/data``.  A correctness
measurement: no timings are taken, so any machine gives the same table.

Usage: python scripts/measure_confidence.py [--skips 6,12,...] [--tokens 384]
       [--prompts 8] [--continuation 128] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from knapspec.backends.torch.eager import TorchEagerBackend
from knapspec.blocks import BlockLayout
from knapspec.planner.fidelity import default_block_scores
from knapspec.planner.knobs import ConfidenceTable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PROFILE = ROOT / "knapspec" / "data" / "fidelity_smollm2-135m.json"
#: (file, character offset) of the book slices; other offsets than measure_fidelity.py's
BOOKS = (("pg1342.txt", 60000), ("pg1342.txt", 300000), ("pg84.txt", 90000),
         ("pg84.txt", 250000), ("tinyshakespeare.txt", 40000), ("tinyshakespeare.txt", 600000))
#: bin edges of the top-1 probability: tenths (the planner's thresholds fall on them), finer
#: at the top where most confident steps lie
EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
CHUNK = 8  # draft steps per teacher-forced round
WARM = 32  # leading tokens of a book slice that are context only (not measured)
MAX_PROMPT = 1024  # Spec-Bench prompts longer than this (tokens) are left out


def reference_masks(layout: BlockLayout, scores: np.ndarray, skips: list[int]) -> list[np.ndarray]:
    """``[2L]`` masks skipping the ``k`` skippable blocks of lowest ``scores`` ``[2L]``, per
    ``k`` in ``skips``."""
    order = [int(b) for b in np.argsort(scores, kind="stable") if layout.skippable[b]]
    if max(skips) > len(order):
        raise SystemExit(f"--skips: at most {len(order)} blocks are skippable")
    return [layout.mask_from_blocks(order[:k]) for k in skips]


def book_texts(be: TorchEagerBackend, tokens: int) -> list[tuple[str, list[int], int]]:
    """``(label, ids, start)`` per book slice: ``WARM + tokens`` ids, measured from ``start``."""
    out = []
    for name, offset in BOOKS:
        raw = (DATA / name).read_text(encoding="utf-8")[offset : offset + 8 * (tokens + WARM)]
        ids = be.encode(raw, chat=False)[: tokens + WARM]
        out.append((f"{name}@{offset}", ids, WARM))
    return out


def specbench_texts(
    be: TorchEagerBackend, n_prompts: int, new_tokens: int
) -> list[tuple[str, list[int], int]]:
    """``(label, ids, start)`` per Spec-Bench prompt (first turn, chat template) followed by
    the full model's greedy continuation of up to ``new_tokens``; measured from the
    prompt's last token (whose logits draft the first continuation token)."""
    rows = [json.loads(line) for line in
            (DATA / "specbench_dev.jsonl").read_text(encoding="utf-8").splitlines()]
    queues = {cat: [r for r in rows if r["category"] == cat]
              for cat in sorted({r["category"] for r in rows})}
    picked: list[dict] = []
    while len(picked) < n_prompts and any(queues.values()):
        for queue in queues.values():  # round robin over the categories
            while queue and len(picked) < n_prompts:
                r = queue.pop(0)
                if len(be.encode(r["turns"][0])) <= MAX_PROMPT:
                    picked.append(r)
                    break
    out = []
    for r in picked:
        prompt = be.encode(r["turns"][0])
        be.reset()
        logits = be.forward(prompt, None, all_logits=False)[-1]
        cont: list[int] = []
        for _ in range(new_tokens):
            tok = int(np.argmax(logits))
            cont.append(tok)
            if tok in be.eos_token_ids:
                break
            logits = be.forward([tok], None, all_logits=False)[-1]
        out.append((f"specbench:{r['category']}:{r['question_id']}", prompt + cont,
                    len(prompt) - 1))
    return out


def top1(logits: np.ndarray) -> np.ndarray:
    """Softmax top-1 probability (temperature 1) of logits ``[n, V]`` -> ``[n]``."""
    z = np.asarray(logits, dtype=np.float64)
    return 1.0 / np.exp(z - z.max(axis=-1, keepdims=True)).sum(axis=-1)


def measure(
    be: TorchEagerBackend, ids: list[int], start: int, masks: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced rounds of ``CHUNK`` draft steps over ``ids[start:]`` (module doc).

    Returns:
        ``(confidence, accepted)``: ``[M, n]`` float top-1 probabilities of each mask's
        draft and ``[M, n]`` bool agreement with the full model's argmax, ``n`` positions.
    """
    be.reset()
    be.forward(ids[:start], None, all_logits=False)
    conf: list[list[np.ndarray]] = [[] for _ in masks]
    acc: list[list[np.ndarray]] = [[] for _ in masks]
    for p in range(start, len(ids), CHUNK):
        chunk = ids[p : p + CHUNK]
        drafts = []
        for mask in masks:
            be.rollback(p)
            drafts.append(be.forward(chunk, mask))  # [c, V]
        be.rollback(p)
        full = be.forward(chunk, None).argmax(axis=-1)  # [c], advances the cache
        for m, z in enumerate(drafts):
            conf[m].append(top1(z))
            acc[m].append(z.argmax(axis=-1) == full)
    return (np.array([np.concatenate(c) for c in conf]),
            np.array([np.concatenate(a) for a in acc]))


def table(conf: np.ndarray, acc: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(alphas [M], fraction [M, B], accept [M, B])`` of confidences and agreements
    ``[M, n]`` over bins ``edges`` ``[B + 1]`` (an empty bin's acceptance is 0)."""
    b = len(edges) - 1
    bins = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, b - 1)  # [M, n]
    fraction = np.zeros((len(conf), b))
    accept = np.zeros((len(conf), b))
    for m in range(len(conf)):
        count = np.bincount(bins[m], minlength=b).astype(float)
        hits = np.bincount(bins[m], weights=acc[m].astype(float), minlength=b)
        fraction[m] = count / count.sum()
        accept[m] = np.where(count > 0, hits / np.maximum(count, 1), 0.0)
    return acc.mean(axis=1), fraction, accept


def _rate(hits: np.ndarray) -> float | None:
    """Mean of bool ``hits`` ``[n]`` to 4 places, None when empty."""
    return round(float(hits.mean()), 4) if hits.size else None


def write_profile(path: Path, confidence: dict) -> None:
    """Set key ``"confidence"`` of the profile at ``path``; the rest is kept; atomic."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    obj["confidence"] = confidence
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skips", default="2,4,6,8,12,16,20,24,28,32",
                    help="blocks skipped per reference draft, comma-separated")
    ap.add_argument("--tokens", type=int, default=384,
                    help="measured tokens per book slice (0: no books)")
    ap.add_argument("--prompts", type=int, default=8, help="Spec-Bench prompts (0: none)")
    ap.add_argument("--continuation", type=int, default=128,
                    help="greedy tokens generated (and measured) per prompt")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=PROFILE)
    ap.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    ap.add_argument("--raw", type=Path, help="also save the per-position confidence and "
                    "agreement [M, n] of every reference draft to this .npz")
    args = ap.parse_args()
    skips = [int(k) for k in args.skips.split(",")]

    be = TorchEagerBackend(None, dtype="float32", device="cpu", threads=args.threads)
    layout = be.layout
    masks = reference_masks(layout, default_block_scores(layout.n_layers), skips)
    texts = book_texts(be, args.tokens) if args.tokens > 0 else []
    if args.prompts:
        texts += specbench_texts(be, args.prompts, args.continuation)
    confs, accs = [], []
    for label, ids, start in texts:
        c, a = measure(be, ids, start, masks)
        confs.append(c)
        accs.append(a)
        print(f"{label}: {c.shape[1]} positions, alphas "
              + " ".join(f"{x:.3f}" for x in a.mean(axis=1)), file=sys.stderr)
    conf, acc = np.concatenate(confs, axis=1), np.concatenate(accs, axis=1)  # [M, n]
    if args.raw is not None:
        np.savez_compressed(args.raw, confidence=conf, accepted=acc, skips=np.array(skips))
    edges = np.array(EDGES)
    alphas, fraction, accept = table(conf, acc, edges)
    order = np.argsort(alphas, kind="stable")  # the table's rows by increasing acceptance
    rows = []
    for m in order:
        low = conf[m] < 0.5
        rows.append({
            "skipped_blocks": [int(b) for b in np.flatnonzero(masks[m])],
            "alpha": round(float(alphas[m]), 4),
            "share_below_0.5": round(float(low.mean()), 4),
            "accept_at_or_above_0.5": _rate(acc[m][~low]),
            "accept_below_0.5": _rate(acc[m][low]),
        })
    meta = {
        "method": "teacher forcing: the full model prefilled to p, each reference draft "
        f"runs forward(ids[p:p+{CHUNK}], mask) on its cache; confidence = softmax top-1 of "
        "the draft logits (temperature 1), accepted = draft argmax == full argmax; "
        "reference drafts skip the k least harmful skippable blocks of this profile "
        "(first and last layer pinned); SmolLM2-135M-Instruct, torch backend, float32",
        "texts": [{"text": label, "positions": len(ids) - start} for label, ids, start in texts],
        "tokens": int(conf.shape[1]),
        "masks": rows,
        "command": f"python scripts/measure_confidence.py --skips {args.skips} --tokens "
        f"{args.tokens} --prompts {args.prompts} --continuation {args.continuation}",
    }
    tab = ConfidenceTable(edges, alphas[order], fraction[order], accept[order], meta)
    print(json.dumps(rows, indent=1))
    print("fraction\n", np.round(tab.fraction, 3), "\naccept\n", np.round(tab.accept, 3))
    if not args.dry_run:
        write_profile(args.out, tab.to_dict())
        print(f"wrote 'confidence' into {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
