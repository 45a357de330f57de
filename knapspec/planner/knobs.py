"""Round knobs: what a draft can change besides its skip mask and draft length.

Two knobs raise what any mask earns (``docs/theory.md`` derives the objective with both):

* **a reduced-vocabulary draft head** (FR-Spec, Zhao et al., ACL 2025): the draft scores
  only the ``K`` most frequent token ids; verification always uses the full head, so
  greedy output is unchanged and rejection sampling keeps the target distribution.  A
  draft step saves the head's cost over the other ``V - K`` ids; a draft whose target token
  lies outside the top ``K`` can no longer match, so acceptance is scaled by the measured
  **coverage** of the top ``K`` (``DraftHead``).
* **a confidence stop** (as SWIFT and CLaSp): a round drafts until its draft length, or up
  to and including the first token whose top-1 draft probability is below a threshold
  ``tau``.  How acceptance depends on that confidence is measured on real text and kept
  with the fidelity profile (``ConfidenceTable``).

``DraftKnobs`` carries the choices a planner may make; ``select_plan`` scores every
(mask, head, threshold, draft length) by tokens per second.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import numpy as np

from ..errors import KnapSpecError

#: thresholds ``select_plan`` considers when a confidence table is known (0: no stop)
DEFAULT_THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class DraftHead:
    """One draft head a backend can run: the top-``vocab`` ids, or the full head."""

    vocab: int  # ids the draft head scores; 0 = the full head (every id)
    seconds: float | None = None  # one-token head seconds (None: the cost model's price)
    coverage: float = 1.0  # share of the target's tokens inside the top ``vocab``, in [0, 1]

    def __post_init__(self) -> None:
        if isinstance(self.vocab, bool) or int(self.vocab) != self.vocab or self.vocab < 0:
            raise KnapSpecError(f"draft_vocab must be an integer >= 0, got {self.vocab!r}")
        if not 0.0 <= self.coverage <= 1.0:
            raise KnapSpecError(f"draft head coverage must lie in [0, 1], got {self.coverage!r}")
        if self.seconds is not None and not (np.isfinite(self.seconds) and self.seconds >= 0):
            raise KnapSpecError(f"draft head seconds must be >= 0, got {self.seconds!r}")


FULL_HEAD = DraftHead(0)


@dataclass(frozen=True)
class ConfidenceTable:
    """Acceptance by draft confidence, measured on real text for a few reference drafts.

    For reference draft ``r`` (a skip mask of measured acceptance ``alphas[r]``), of its
    draft steps a share ``fraction[r, b]`` had top-1 probability in bin ``b``
    (``edges[b] <= c < edges[b + 1]``) and those were accepted at rate ``accept[r, b]``.
    A draft of acceptance ``alpha`` between two references is interpolated linearly in
    ``alpha`` (clipped at the ends), which keeps ``sum_b fraction * accept == alpha``.
    """

    edges: np.ndarray  # [B + 1] bin edges of the top-1 probability, 0 .. 1
    alphas: np.ndarray  # [R] measured acceptance of each reference draft, increasing
    fraction: np.ndarray  # [R, B] share of draft steps per bin (rows sum to 1)
    accept: np.ndarray  # [R, B] acceptance rate per bin, in [0, 1]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance

    def __post_init__(self) -> None:
        e = np.asarray(self.edges, dtype=np.float64)
        a = np.asarray(self.alphas, dtype=np.float64)
        f = np.asarray(self.fraction, dtype=np.float64)
        p = np.asarray(self.accept, dtype=np.float64)
        b = len(e) - 1
        if (e.ndim != 1 or b < 1 or e[0] != 0.0 or e[-1] < 1.0 or np.any(np.diff(e) <= 0)):
            raise KnapSpecError("confidence table: edges must increase from 0 to 1")
        if a.ndim != 1 or a.size < 1 or f.shape != (a.size, b) or p.shape != (a.size, b):
            raise KnapSpecError(f"confidence table: expected alphas [R], fraction and accept "
                                f"[R, {b}]; got {a.shape}, {f.shape}, {p.shape}")
        if not (np.isfinite(f).all() and np.isfinite(p).all() and np.isfinite(a).all()):
            raise KnapSpecError("confidence table: NaN or inf")
        if np.any(f < 0) or np.any(p < 0) or np.any(p > 1) or np.any(np.diff(a) < 0):
            raise KnapSpecError("confidence table: fractions >= 0, rates in [0, 1], alphas "
                                "increasing")
        f = f / np.maximum(f.sum(axis=1, keepdims=True), 1e-300)
        for name, v in (("edges", e), ("alphas", a), ("fraction", f), ("accept", p)):
            object.__setattr__(self, name, v)

    def stop_stats(self, alpha: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(s, alpha_hi)`` for drafts of acceptance ``alpha`` and thresholds ``tau``
        (broadcastable arrays): ``s`` the share of draft steps at confidence ``>= tau``,
        ``alpha_hi`` their acceptance (``alpha`` where ``s == 0``).  ``tau`` is rounded down
        to a bin edge; ``tau = 0`` gives ``(1, alpha)``."""
        alpha = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)
        tau = np.asarray(tau, dtype=np.float64)
        alpha, tau = np.broadcast_arrays(alpha, tau)
        # interpolation weights between references, per alpha
        r = len(self.alphas)
        if r == 1:
            f = np.broadcast_to(self.fraction[0], (*alpha.shape, self.fraction.shape[1]))
            fa = f * self.accept[0]
        else:
            hi = np.clip(np.searchsorted(self.alphas, alpha, side="right"), 1, r - 1)
            lo = hi - 1
            span = np.maximum(self.alphas[hi] - self.alphas[lo], 1e-12)
            w = np.clip((alpha - self.alphas[lo]) / span, 0.0, 1.0)[..., None]
            f = (1 - w) * self.fraction[lo] + w * self.fraction[hi]  # [..., B]
            fa = ((1 - w) * self.fraction[lo] * self.accept[lo]
                  + w * self.fraction[hi] * self.accept[hi])  # [..., B]
        # outside the references, rescale so the bins' acceptance adds up to the draft's own
        # alpha: below them scale the accepted share down, above them the rejected share
        # (scaling acceptance up would pass 1 in the surest bins and claim sure drafts are
        # never rejected); inside them ``total == alpha`` already
        total = fa.sum(axis=-1)
        down = np.where(total > 0, alpha / np.maximum(total, 1e-300), 0.0)[..., None]
        up = np.where(total < 1, (1 - alpha) / np.maximum(1 - total, 1e-300), 0.0)[..., None]
        fa = np.where((alpha > total)[..., None], f - (f - fa) * up, fa * down)
        # bin holding tau; the slack keeps a tau on an edge made inexactly (np.linspace's
        # 0.30000000000000004) on that edge rather than a bin below it
        first = np.searchsorted(self.edges, tau + 1e-9, side="right") - 1
        keep = np.arange(f.shape[-1]) >= np.clip(first, 0, None)[..., None]  # [..., B]
        s = np.where(tau <= 0, 1.0, (f * keep).sum(axis=-1))
        s_hi = np.where(tau <= 0, alpha, (fa * keep).sum(axis=-1))
        alpha_hi = np.where(s > 0, np.minimum(s_hi / np.maximum(s, 1e-300), 1.0), alpha)
        return np.clip(s, 0.0, 1.0), alpha_hi

    def to_dict(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "alphas": self.alphas.tolist(),
                "fraction": self.fraction.tolist(), "accept": self.accept.tolist(),
                **({"meta": self.meta} if self.meta else {})}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "confidence table") -> ConfidenceTable:
        if not isinstance(obj, dict) or not {"edges", "alphas", "fraction", "accept"} <= set(obj):
            raise KnapSpecError(f"{where}: expected an object with edges, alphas, fraction and "
                                "accept")
        try:
            return cls(np.asarray(obj["edges"], float), np.asarray(obj["alphas"], float),
                       np.asarray(obj["fraction"], float), np.asarray(obj["accept"], float),
                       dict(obj.get("meta", {})))
        except (TypeError, ValueError) as e:
            raise KnapSpecError(f"{where}: {e}") from None

    @classmethod
    def default(cls) -> ConfidenceTable | None:
        """The table shipped with the default fidelity profile (measured on SmolLM2-135M by
        ``scripts/measure_confidence.py``), or None when it has none."""
        from .fidelity import DEFAULT_PROFILE

        text = resources.files("knapspec.data").joinpath(DEFAULT_PROFILE).read_text("utf-8")
        obj = json.loads(text).get("confidence")
        return None if obj is None else cls.from_dict(obj, f"{DEFAULT_PROFILE}: confidence")


@dataclass(frozen=True)
class DraftKnobs:
    """The round knobs a planner may choose, with what it needs to price them.

    ``heads`` always includes the full head; ``thresholds`` always includes 0 (no stop).
    Thresholds other than 0 are considered only with a ``confidence`` table.
    """

    heads: tuple[DraftHead, ...] = (FULL_HEAD,)  # draft heads the backend can run
    thresholds: tuple[float, ...] = (0.0,)  # confidence stops to consider, in [0, 1)
    confidence: ConfidenceTable | None = None  # acceptance by confidence (None: no stops)

    def __post_init__(self) -> None:
        heads = tuple(self.heads)
        if not heads or not all(isinstance(h, DraftHead) for h in heads):
            raise KnapSpecError("DraftKnobs.heads: expected at least one DraftHead")
        if len({h.vocab for h in heads}) != len(heads):
            raise KnapSpecError("DraftKnobs.heads: one entry per vocabulary size")
        taus = tuple(float(t) for t in self.thresholds)
        if not taus or any(not 0.0 <= t < 1.0 for t in taus):
            raise KnapSpecError(f"stop_confidence must lie in [0, 1), got {self.thresholds!r}")
        if self.confidence is None:
            taus = tuple(t for t in taus if t == 0.0)
            if not taus:
                raise KnapSpecError("a confidence stop needs an acceptance-by-confidence table "
                                    "(none is known for this model)")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "thresholds", tuple(sorted(set(taus))))

    @property
    def trivial(self) -> bool:
        """Only the full head and no stop: plans as without knobs."""
        return self.heads == (FULL_HEAD,) and self.thresholds == (0.0,)

    def only_head(self, vocab: int, coverage: float | None = None) -> DraftKnobs:
        """These knobs restricted to the head of ``vocab`` ids (its coverage replaced by
        ``coverage`` when given: e.g. 1.0 for acceptances already measured with it)."""
        head = next((h for h in self.heads if h.vocab == vocab), None)
        if head is None:
            raise KnapSpecError(f"draft_vocab {vocab} is not a head this backend offers "
                                f"({', '.join(str(h.vocab) for h in self.heads)})")
        if coverage is not None:
            head = replace(head, coverage=float(coverage))
        return replace(self, heads=(head,))

    def only_threshold(self, tau: float) -> DraftKnobs:
        """These knobs with the confidence stop fixed at ``tau``."""
        return replace(self, thresholds=(float(tau),))


def make_knobs(
    heads: Sequence[DraftHead] = (),
    confidence: ConfidenceTable | None = None,
    *,
    draft_vocab: int | str = "auto",
    stop_confidence: float | str = "auto",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> DraftKnobs:
    """Knobs from what a backend offers (``heads``, the full head added) and the settings
    ``planner.draft_vocab`` / ``planner.stop_confidence``: ``"auto"`` lets TPT choose, a
    number fixes the knob (``0``: the full head / no stop)."""
    pool = [FULL_HEAD, *[h for h in heads if h.vocab != 0]]
    knobs = DraftKnobs(tuple(pool), tuple(thresholds) if confidence is not None else (0.0,),
                       confidence)
    if draft_vocab != "auto":
        knobs = knobs.only_head(int(draft_vocab))
    if stop_confidence != "auto":
        knobs = DraftKnobs(knobs.heads, (float(stop_confidence),), confidence)
    return knobs


__all__ = ["DEFAULT_THRESHOLDS", "FULL_HEAD", "ConfidenceTable", "DraftHead", "DraftKnobs",
           "make_knobs"]
