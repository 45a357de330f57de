"""Simulated acceptance: time every part of speculative decoding at an acceptance you choose.

A simulated run drafts under the plan's mask, verifies with the full model, rolls back,
plans and switches masks for real; only the number of drafts each round keeps is drawn
instead of decided by the target: each successive draft is accepted with probability
``alpha`` until the first rejection (a geometric law truncated at the ``d`` drafted
tokens, whose mean is the cost model's expected tokens per round minus one):

    P(n = k) = alpha^k (1 - alpha)  for k < d,     P(n = d) = alpha^d,

that is ``P(n >= k) = alpha^k`` for ``k = 0..d``.

The kept tokens are then the drafts, not the model's own choice, so the text means nothing
and every result is flagged ``timing_only``.  This measures the wall-clock speedup a given
acceptance buys on this hardware (e.g. with random weights, where real acceptance is
meaningless), and lets a forced-plan sweep check the cost model without the noise of
acceptance prediction.

How the counts are drawn (``draws``):

* ``"qmc"`` (the default): round ``r`` of a generation takes one uniform
  ``u_r = frac(u_0 + r * g)``, with ``g`` the golden ratio conjugate and ``u_0`` drawn once
  per generation from the seeded generator (a Cranley-Patterson rotation of a Kronecker
  sequence), and keeps ``n = #{k in 1..d : u_r < alpha^k}`` drafts.  Each ``u_r`` alone is
  exactly Uniform[0, 1), so each round's count has exactly the law above; but the rounds
  are *not* independent: the sequence spreads its points evenly, so the empirical law of
  N rounds approaches the exact one like O(log N / N) instead of 1 / sqrt(N).  Why: a
  96-token generation has only ~35 rounds, and with independent draws the realized mean
  tokens per round is off by ~8% (one standard deviation at alpha 0.7, d 4), which hides
  the cost model's own error in a sweep; with these draws it is typically 1-2% (at most
  ~5% at that size).
* ``"iid"``: independent draws, each draft accepted with probability ``alpha`` by its own
  uniform from the seeded generator (the draws of earlier versions, bit for bit).

``alpha`` is, per the spec string (``parse_simulate_acceptance``): the plan's own predicted
acceptance (``predicted``, ``DraftPlan.alpha``), a fixed value (``0.7``), or the prediction
scaled (``0.9xpredicted``), clipped to [0, 1]; a suffix ``,qmc`` or ``,iid`` picks the draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import KnapSpecError

_USAGE = ("expected 'predicted', an acceptance in [0, 1] such as 0.7, or SCALExpredicted "
          "such as 0.9xpredicted, optionally followed by ',qmc' or ',iid'")

DRAW_KINDS = ("qmc", "iid")  # low-discrepancy uniforms per round / independent per draft
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # the step of the rounds' uniforms, 0.6180339887...


def accepted_count(u: float, alpha: float, drafted: int) -> int:
    """Accepted drafts (``0..drafted``) for one uniform ``u`` in [0, 1) at per-token
    acceptance ``alpha`` in [0, 1]: ``#{k in 1..drafted : u < alpha^k}``.  The thresholds
    shrink with ``k``, so ``n >= k`` exactly when ``u < alpha^k``: for a uniform ``u``,
    ``P(n >= k) = alpha^k``, the truncated geometric law (``alpha`` 0 keeps nothing, 1 all).
    Non-increasing in ``u``."""
    n, threshold = 0, alpha
    while n < drafted and u < threshold:
        n += 1
        threshold *= alpha
    return n


@dataclass
class RoundDraws:
    """One generation's source of accepted counts (``AcceptanceSimulator.start``): the
    seeded generator and, for ``"qmc"``, the rotation ``u_0`` and the round counter."""

    kind: str  # "qmc" or "iid" (see the module docstring)
    rng: np.random.Generator  # seeded with the simulator's seed ("qmc": only u_0 comes from it)
    start: float  # "qmc": u_0 in [0, 1), drawn once per generation; "iid": unused
    rounds: int = 0  # rounds drawn so far ("qmc": the index r of the next uniform)

    def uniform(self) -> float:
        """The next round's uniform ``u_r = frac(u_0 + r * GOLDEN)`` in [0, 1) (``"qmc"``)."""
        u = (self.start + self.rounds * GOLDEN) % 1.0
        self.rounds += 1
        return u


@dataclass(frozen=True)
class AcceptanceSimulator:
    """Draws each round's accepted-draft count from a per-token acceptance ``alpha``.

    ``alpha`` set: that fixed acceptance; ``None``: ``scale`` times the plan's prediction,
    clipped to [0, 1].  ``start`` seeds the draws with ``seed`` at the start of every
    generation, so a run is reproducible and independent of the sampling seed.  ``draws``:
    ``"qmc"`` low-discrepancy uniforms, one per round (each round exact, rounds correlated),
    or ``"iid"`` independent ones, one per draft (see the module docstring).
    """

    spec: str  # the option as recorded with the results, draw kind included ("0.9xpredicted,qmc")
    alpha: float | None = None  # fixed per-token acceptance in [0, 1], or None: predicted
    scale: float = 1.0  # factor on the plan's predicted acceptance (when alpha is None)
    seed: int = 0  # seed of the draws
    draws: str = "qmc"  # how the counts are drawn: "qmc" or "iid"

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise KnapSpecError(f"simulated acceptance must lie in [0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.scale) and self.scale >= 0.0):
            raise KnapSpecError(
                f"simulated acceptance scale must be finite and >= 0, got {self.scale!r}"
            )
        if self.draws not in DRAW_KINDS:
            raise KnapSpecError(
                f"simulated acceptance draws must be 'qmc' or 'iid', got {self.draws!r}"
            )

    @property
    def reason(self) -> str:
        """Why results of a simulated run are timing-only (the ``timing_only_reason``)."""
        return (f"simulated acceptance ({self.spec}): accepted drafts are drawn, not "
                "verified, so the tokens are not the model's output")

    def alpha_for(self, predicted: float) -> float:
        """The acceptance simulated for a plan predicting ``predicted``, in [0, 1]."""
        if self.alpha is not None:
            return self.alpha
        return min(max(self.scale * float(predicted), 0.0), 1.0)

    def start(self) -> RoundDraws:
        """A fresh, seeded state for one generation's draws (``"qmc"``: ``u_0`` drawn)."""
        rng = np.random.default_rng(self.seed)
        return RoundDraws(self.draws, rng, float(rng.random()) if self.draws == "qmc" else 0.0)

    def draw(self, predicted: float, drafted: int, state: RoundDraws) -> int:
        """Accepted drafts (``0..drafted``) of the next round of the generation ``state``
        belongs to, whose plan predicts ``predicted``: truncated geometric at
        ``alpha_for(predicted)``.  A round with nothing drafted keeps 0 and draws nothing."""
        if drafted <= 0:
            return 0
        a = self.alpha_for(predicted)
        if state.kind == "qmc":
            return accepted_count(state.uniform(), a, drafted)
        state.rounds += 1
        for i in range(drafted):
            if state.rng.random() >= a:  # a = 1 never rejects, a = 0 always does
                return i
        return drafted


def parse_simulate_acceptance(text: str, seed: int = 0) -> AcceptanceSimulator:
    """``"predicted"``, ``"0.7"`` or ``"0.9xpredicted"``, each optionally followed by
    ``",qmc"`` (the default) or ``",iid"`` -> an ``AcceptanceSimulator`` whose ``spec``
    always names the draw kind (``"0.7,qmc"``).

    Raises ``KnapSpecError`` with one line naming the problem on anything else (a value
    outside [0, 1], a negative or non-finite scale, an unknown word or draw kind).
    """
    spec = str(text).strip().lower().replace(" ", "")
    spec, comma, kind = spec.partition(",")
    if not comma:
        kind = "qmc"
    elif kind not in DRAW_KINDS:
        raise KnapSpecError(
            f"--simulate-acceptance {text!r}: the draws after ',' must be 'qmc' or 'iid'"
        )
    recorded = f"{spec},{kind}"
    if spec == "predicted":
        return AcceptanceSimulator(recorded, None, 1.0, seed, kind)
    head, x, tail = spec.rpartition("x")
    scaled = bool(x) and tail == "predicted"
    try:
        value = float(head if scaled else spec)
    except ValueError:
        raise KnapSpecError(f"--simulate-acceptance: {_USAGE}; got {text!r}") from None
    if scaled:
        if not (math.isfinite(value) and value >= 0.0):
            raise KnapSpecError(
                f"--simulate-acceptance {text!r}: the scale must be finite and >= 0"
            )
        return AcceptanceSimulator(recorded, None, value, seed, kind)
    alpha = value
    if not 0.0 <= alpha <= 1.0:  # also refuses nan
        raise KnapSpecError(
            f"--simulate-acceptance {text!r}: a fixed acceptance must lie in [0, 1]"
        )
    return AcceptanceSimulator(recorded, alpha, 1.0, seed, kind)
