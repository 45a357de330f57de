"""Token rankings for reduced-vocabulary draft heads: which ids a draft head keeps.

A ranking lists a tokenizer's ids from the most to the least frequent on real text, and
records, for a few head sizes ``K``, the **coverage** of the top ``K``: the share of the
model's own next-token predictions (greedy, teacher-forced on held-out text) that fall
inside them; a draft over the top ``K`` ids cannot propose any other token, so its
acceptance is at most that share.  ``knapspec vocab`` measures one and writes it; the
rankings shipped in ``knapspec/data/vocab/`` were made that way (each file records how).

A ranking belongs to a tokenizer, identified by the SHA-256 of its vocabulary
(``tokenizer_digest``); ``find_ranking`` returns the shipped one that matches, or None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_text
from .errors import KnapSpecError

log = logging.getLogger(__name__)

RANKING_DIR = "vocab"  # under knapspec/data
SCHEMA = "knapspec.vocab-ranking"


@dataclass(frozen=True)
class VocabRanking:
    """Token ids by frequency, with the measured coverage of the top ``K`` per head size."""

    ids: np.ndarray  # [V] int64 token ids, most frequent first (every id once)
    coverage: dict[int, float]  # K -> share of the model's predictions in the top K
    tokenizer: str  # tokenizer_digest of the tokenizer the ids belong to
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64)
        if (ids.ndim != 1 or ids.size == 0 or len(np.unique(ids)) != ids.size
                or ids.min() != 0 or ids.max() != ids.size - 1):
            raise KnapSpecError("vocab ranking: ids must list every token id 0..V-1 once")
        for k, c in self.coverage.items():
            if not 0 < int(k) < ids.size or not 0.0 <= float(c) <= 1.0:
                raise KnapSpecError(f"vocab ranking: bad coverage entry {k!r}: {c!r}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "coverage",
                           {int(k): float(c) for k, c in sorted(self.coverage.items())})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabRanking):
            return NotImplemented
        return (self.tokenizer == other.tokenizer and self.coverage == other.coverage
                and np.array_equal(self.ids, other.ids))

    __hash__ = None  # type: ignore[assignment]  # holds an array

    def sizes(self) -> dict[int, float]:
        """``{K: coverage}`` of the head sizes measured."""
        return dict(self.coverage)

    def top(self, k: int) -> np.ndarray:
        """``[k]`` int64 ids of the ``k`` most frequent tokens."""
        if not 0 < int(k) <= self.ids.size:
            raise KnapSpecError(f"draft_vocab must lie in 1..{self.ids.size}, got {k!r}")
        return self.ids[: int(k)]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "tokenizer": self.tokenizer,
                "coverage": {str(k): c for k, c in self.coverage.items()},
                "meta": self.meta, "ids": self.ids.tolist()}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> VocabRanking:
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            raise KnapSpecError(f"{where}: not a knapspec vocabulary ranking")
        try:
            return cls(np.asarray(obj["ids"], dtype=np.int64),
                       {int(k): float(v) for k, v in obj["coverage"].items()},
                       str(obj["tokenizer"]), dict(obj.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KnapSpecError(f"{where}: {e!r}") from None


def tokenizer_digest(tokenizer: Any) -> str | None:
    """SHA-256 of a tokenizer's vocabulary (``get_vocab()``: token -> id), or None when it
    has none."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = get_vocab()
    text = json.dumps(sorted((str(t), int(i)) for t, i in vocab.items()), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shipped_rankings() -> list[tuple[str, Any]]:
    """``(file name, parsed JSON)`` of every ranking shipped in ``knapspec/data/vocab``."""
    root = resources.files("knapspec.data").joinpath(RANKING_DIR)
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out.append((entry.name, json.loads(entry.read_text("utf-8"))))
    return out


def find_ranking(tokenizer: Any, vocab_size: int) -> VocabRanking | None:
    """The shipped ranking of ``tokenizer`` with ``vocab_size`` ids, or None."""
    if tokenizer is None:
        return None
    digest = tokenizer_digest(tokenizer)
    if digest is None:
        return None
    for name, obj in shipped_rankings():
        if isinstance(obj, dict) and obj.get("tokenizer") == digest:
            ranking = VocabRanking.from_json(obj, name)
            if ranking.ids.size == vocab_size:
                return ranking
            log.warning("vocab ranking %s: %d ids, the model's head has %d: not used",
                        name, ranking.ids.size, vocab_size)
    return None


# ------------------------------------------------------------------ measuring a ranking


def default_sizes(vocab_size: int) -> list[int]:
    """Head sizes measured by default: ``V/16``, ``V/8``, ``V/4`` and ``V/2`` ids, each
    rounded to a multiple of 64 (to the nearest id below ``V = 1024``), distinct, in
    ``1..V-1``."""
    step = 64 if vocab_size >= 1024 else 1
    out = []
    for div in (16, 8, 4, 2):
        k = max(step, round(vocab_size / div / step) * step)
        if k < vocab_size and k not in out:
            out.append(k)
    return out


def count_tokens(tokenizer: Any, texts: Iterable[str], vocab_size: int) -> np.ndarray:
    """``[V]`` int64 occurrences of every id in ``texts``, each text tokenized whole
    without special tokens (the ids the model sees for it, separators included)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for text in texts:
        ids = np.asarray(_encode(tokenizer, text), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise KnapSpecError(f"the tokenizer produced id {int(ids.max())}, outside "
                                f"the model's {vocab_size} ids")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def _encode(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids without special tokens (a ``transformers`` tokenizer's call; no
    warning about texts longer than the model's context: nothing here runs them)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]


def rank_ids(counts: np.ndarray) -> np.ndarray:
    """``[V]`` ids by decreasing count ``counts`` ``[V]``; ties (unseen ids too) by id."""
    return np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable").astype(np.int64)


def coverage(ids: np.ndarray, predictions: np.ndarray, sizes: Iterable[int]) -> dict[int, float]:
    """``{K: share}`` of the predicted ids ``predictions`` ``[N]`` within the first ``K`` of
    the ranking ``ids`` ``[V]``."""
    pred = np.asarray(predictions, dtype=np.int64)
    if pred.size == 0:
        raise KnapSpecError("no held-out predictions to measure coverage on")
    position = np.empty(ids.size, dtype=np.int64)
    position[ids] = np.arange(ids.size)
    rank = position[pred]  # [N] where each predicted id lies in the ranking
    return {int(k): float(np.mean(rank < int(k))) for k in sizes}


def read_heldout(path: str | os.PathLike[str]) -> list[str]:
    """The held-out documents of a file: each line's ``turns`` (joined by a blank line) or
    ``text`` of a ``.jsonl`` file (Spec-Bench's format), else the whole file as one."""
    p = Path(path)
    text = p.read_text("utf-8")
    if p.suffix != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KnapSpecError(f"{p}:{n}: not JSON ({e.msg})") from None
        turns = obj.get("turns", obj.get("text")) if isinstance(obj, dict) else None
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise KnapSpecError(f"{p}:{n}: expected an object with 'turns' (strings) or 'text'")
        docs.append("\n\n".join(turns))
    return docs


def measure_ranking(
    tokenizer: Any,
    vocab_size: int,
    texts: Sequence[str],
    heldout: Sequence[str],
    predict: Callable[[list[int]], np.ndarray],
    sizes: Sequence[int] | None = None,
    max_len: int = 512,
    meta: dict[str, Any] | None = None,
) -> VocabRanking:
    """Rank ``tokenizer``'s ids by their count in ``texts`` and measure the coverage of the
    top ``K`` for each of ``sizes`` (default ``default_sizes``) on ``heldout``.

    Args:
        vocab_size: ``V``, the model's head rows (every id counted must lie below it).
        texts: the text counted (not scored).
        heldout: documents the coverage is measured on (not counted); each is tokenized
            without special tokens and cut to its first ``max_len`` ids.
        predict: the model's greedy predictions of a document, teacher-forced: ids ``[T]``
            in, ``[T]`` int ids out (position ``t``: the argmax after ``ids[: t + 1]``); the
            last one (past the document) is not scored.
        meta: provenance to record; ``tokens_counted``, ``heldout_documents`` and
            ``heldout_predictions`` are added.
    """
    sizes = default_sizes(vocab_size) if sizes is None else sorted({int(k) for k in sizes})
    if not sizes or sizes[0] < 1 or sizes[-1] >= vocab_size:
        raise KnapSpecError(f"sizes must lie in 1..{vocab_size - 1}, got {list(sizes)}")
    if max_len < 2:
        raise KnapSpecError(f"max_len must be >= 2, got {max_len}")
    digest = tokenizer_digest(tokenizer)
    if digest is None:
        raise KnapSpecError("the tokenizer has no get_vocab(): a ranking cannot name it")
    counts = count_tokens(tokenizer, texts, vocab_size)
    if not counts.any():
        raise KnapSpecError("the text files hold no tokens to count")
    ids = rank_ids(counts)
    preds, docs = [], 0
    for doc in heldout:
        toks = _encode(tokenizer, doc)[:max_len]
        if len(toks) < 2:
            continue
        out = np.asarray(predict(toks), dtype=np.int64)
        if out.shape != (len(toks),):
            raise KnapSpecError(f"predict returned shape {out.shape}, expected ({len(toks)},)")
        preds.append(out[:-1])
        docs += 1
        if docs % 50 == 0:
            log.info("vocab ranking: %d of %d held-out documents scored", docs, len(heldout))
    if not preds:
        raise KnapSpecError("the held-out files hold no document of 2 tokens or more")
    pred = np.concatenate(preds)
    info = {**(meta or {}), "tokens_counted": int(counts.sum()),
            "ids_seen": int(np.count_nonzero(counts)), "heldout_documents": docs,
            "heldout_predictions": int(pred.size), "heldout_max_len": int(max_len)}
    log.info("vocab ranking: %d tokens counted (%d distinct ids), %d held-out predictions",
             info["tokens_counted"], info["ids_seen"], pred.size)
    return VocabRanking(ids, coverage(ids, pred, sizes), digest, info)


def save_ranking(ranking: VocabRanking, path: str | os.PathLike[str]) -> Path:
    """Write ``ranking`` as JSON to ``path`` atomically (ids on one line)."""
    obj = ranking.to_json()
    ids = obj.pop("ids")
    head = json.dumps(obj, indent=1, ensure_ascii=False)
    text = head[:-2] + ',\n "ids": ' + json.dumps(ids, separators=(",", ":")) + "\n}\n"
    return atomic_write_text(path, text)


__all__ = ["VocabRanking", "count_tokens", "coverage", "default_sizes", "find_ranking",
           "measure_ranking", "rank_ids", "read_heldout", "save_ranking", "shipped_rankings",
           "tokenizer_digest"]
