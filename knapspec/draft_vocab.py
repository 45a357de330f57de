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
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

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
        if ids.ndim != 1 or ids.size == 0 or len(np.unique(ids)) != ids.size:
            raise KnapSpecError("vocab ranking: ids must list distinct token ids")
        for k, c in self.coverage.items():
            if not 0 < int(k) < ids.size or not 0.0 <= float(c) <= 1.0:
                raise KnapSpecError(f"vocab ranking: bad coverage entry {k!r}: {c!r}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "coverage",
                           {int(k): float(c) for k, c in sorted(self.coverage.items())})

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


__all__ = ["VocabRanking", "find_ranking", "shipped_rankings", "tokenizer_digest"]
