"""``knapspec vocab``: rank a tokenizer's ids by frequency for reduced-vocabulary draft heads.

Example (the command that made ``knapspec/data/vocab/smollm2-135m.json``)::

    knapspec vocab --text ../shared/data/pg1342.txt ../shared/data/pg84.txt \\
        ../shared/data/tinyshakespeare.txt --heldout ../shared/data/specbench_dev.jsonl \\
        --max-len 256 --out knapspec/data/vocab/smollm2-135m.json

(run in the repository root: 630K tokens counted, 32K held-out predictions).

The ids are counted over the ``--text`` files with the model's tokenizer; the coverage of
each head size ``K`` is the share of the model's own greedy next-token predictions
(teacher-forced over the ``--heldout`` documents, which are not counted) that lie in the
top ``K`` ids.  The file records its provenance (files, token counts, this command) in
``meta``; a file in ``knapspec/data/vocab/`` is found by the torch backends of any model
whose tokenizer has the same vocabulary (``knapspec.draft_vocab.find_ranking``).
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from pathlib import Path
from typing import Any

from .common import add_backend_arguments

DEFAULT_MAX_LEN = 512  # held-out ids scored per document


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "vocab",
        help="rank the tokenizer's ids by frequency for reduced draft heads (JSON)",
        description="Count token ids over text files with the model's tokenizer, rank them "
        "(ties and unseen ids by id), and measure for each head size K the share of the "
        "model's greedy next-token predictions on held-out text that lie in the top K. "
        "Writes a ranking that the torch backends' reduced draft heads use.",
    )
    add_backend_arguments(p, cost_model=False)
    p.add_argument("--text", metavar="FILE", nargs="+", required=True,
                   help="UTF-8 text files whose tokens are counted")
    p.add_argument("--heldout", metavar="FILE", nargs="+", required=True,
                   help="held-out documents the coverage is measured on: a text file is one "
                   "document, a .jsonl file one per line ('turns' or 'text', as Spec-Bench)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated head sizes K (default: V/16, V/8, V/4, V/2, rounded "
                   "to a multiple of 64)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                   help=f"held-out ids scored per document (default: {DEFAULT_MAX_LEN})")
    p.add_argument("--out", metavar="FILE", required=True, help="where to write the ranking")
    p.set_defaults(func=run)


def parse_sizes(text: str) -> list[int]:
    """``"3072,6144"`` -> ``[3072, 6144]``; ``KnapSpecError`` naming a bad entry."""
    from ..errors import KnapSpecError

    out = []
    for part in text.split(","):
        try:
            k = int(part.strip())
        except ValueError:
            raise KnapSpecError(f"--sizes: not an integer: {part.strip()!r}") from None
        if k < 1:
            raise KnapSpecError(f"--sizes: head sizes must be >= 1, got {k}")
        out.append(k)
    return sorted(set(out))


def _file_info(path: str) -> dict[str, Any]:
    data = Path(path).read_bytes()
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args`` (options in a fixed order)."""
    parts = ["knapspec", "vocab"]
    for flag, dest in (("--config", "config"), ("--backend", "backend"), ("--model", "model"),
                       ("--device", "device")):
        if getattr(args, dest, None) is not None:
            parts += [flag, str(getattr(args, dest))]
    for item in getattr(args, "set_keys", None) or ():
        parts += ["--set", item]
    parts += ["--text", *args.text, "--heldout", *args.heldout]
    if args.sizes is not None:
        parts += ["--sizes", args.sizes]
    if args.max_len != DEFAULT_MAX_LEN:
        parts += ["--max-len", str(args.max_len)]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import __version__
    from .._io import check_writable
    from ..draft_vocab import measure_ranking, read_heldout, save_ranking
    from ..errors import KnapSpecError
    from ..runtime import build_backend
    from .common import load_config

    sizes = parse_sizes(args.sizes) if args.sizes is not None else None
    if args.max_len < 2:
        raise KnapSpecError(f"--max-len must be >= 2, got {args.max_len}")
    check_writable(args.out)
    for path in (*args.text, *args.heldout):
        if not Path(path).is_file():
            raise KnapSpecError(f"no such file: {path}")
    try:
        texts = [Path(p).read_text("utf-8") for p in args.text]
        heldout = [doc for p in args.heldout for doc in read_heldout(p)]
    except UnicodeDecodeError as e:
        raise KnapSpecError(f"not UTF-8 text ({e.reason})") from None
    backend = build_backend(load_config(args))
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise KnapSpecError(f"the {backend.name} backend has no tokenizer to count with")
    if sizes is not None and sizes[-1] >= backend.vocab_size:
        raise KnapSpecError(f"--sizes: head sizes must be below the model's "
                            f"{backend.vocab_size} ids, got {sizes[-1]}")

    def predict(ids: list[int]) -> np.ndarray:
        backend.reset()
        logits = backend.forward(ids, None, all_logits=True)  # [T, V]
        backend.reset()
        return np.asarray(logits).argmax(axis=-1)

    meta = {
        "model": backend.describe().get("model"),
        "backend": backend.name,
        "vocab_size": backend.vocab_size,
        "text_files": [_file_info(p) for p in args.text],
        "heldout_files": [_file_info(p) for p in args.heldout],
        "command": _command(args),
        "knapspec": __version__,
    }
    ranking = measure_ranking(tokenizer, backend.vocab_size, texts, heldout, predict,
                              sizes=sizes, max_len=args.max_len, meta=meta)
    save_ranking(ranking, args.out)
    info = ranking.meta
    sys.stdout.write(f"{info['tokens_counted']} tokens counted ({info['ids_seen']} distinct "
                     f"ids of {backend.vocab_size}); coverage on {info['heldout_predictions']} "
                     f"held-out predictions ({info['heldout_documents']} documents):\n")
    sys.stdout.write(f"{'K':>8} {'K/V':>6} {'coverage':>9}\n")
    for k, c in ranking.coverage.items():
        sys.stdout.write(f"{k:>8} {k / backend.vocab_size:>6.3f} {c:>9.4f}\n")
    sys.stdout.write(f"wrote {args.out}\n")
    return 0
