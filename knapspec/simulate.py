"""Simulated acceptance: time every part of speculative decoding at an acceptance you choose.

A simulated run drafts under the plan's mask, verifies with the full model, rolls back,
plans and switches masks for real; only the number of drafts each round keeps is drawn
instead of decided by the target: each successive draft is accepted with probability
``alpha`` until the first rejection (a geometric law truncated at the ``d`` drafted
tokens, whose mean is the cost model's expected tokens per round minus one):

    P(n = k) = alpha^k (1 - alpha)  for k < d,     P(n = d) = alpha^d.

The kept tokens are then the drafts, not the model's own choice, so the text means nothing
and every result is flagged ``timing_only``.  This measures the wall-clock speedup a given
acceptance buys on this hardware (e.g. with random weights, where real acceptance is
meaningless), and lets a forced-plan sweep check the cost model without the noise of
acceptance prediction.

``alpha`` is, per the spec string (``parse_simulate_acceptance``): the plan's own predicted
acceptance (``predicted``, ``DraftPlan.alpha``), a fixed value (``0.7``), or the prediction
scaled (``0.9xpredicted``), clipped to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import KnapSpecError

_USAGE = ("expected 'predicted', an acceptance in [0, 1] such as 0.7, or SCALExpredicted "
          "such as 0.9xpredicted")


@dataclass(frozen=True)
class AcceptanceSimulator:
    """Draws each round's accepted-draft count from a per-token acceptance ``alpha``.

    ``alpha`` set: that fixed acceptance; ``None``: ``scale`` times the plan's prediction,
    clipped to [0, 1].  Draws come from a generator seeded with ``seed`` at the start of
    every generation, so a run is reproducible and independent of the sampling seed.
    """

    spec: str  # the option as given, recorded with the results (e.g. "0.9xpredicted")
    alpha: float | None = None  # fixed per-token acceptance in [0, 1], or None: predicted
    scale: float = 1.0  # factor on the plan's predicted acceptance (when alpha is None)
    seed: int = 0  # seed of the draws

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise KnapSpecError(f"simulated acceptance must lie in [0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.scale) and self.scale >= 0.0):
            raise KnapSpecError(
                f"simulated acceptance scale must be finite and >= 0, got {self.scale!r}"
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

    def generator(self) -> np.random.Generator:
        """A fresh generator for one generation's draws."""
        return np.random.default_rng(self.seed)

    def draw(self, predicted: float, drafted: int, rng: np.random.Generator) -> int:
        """Accepted drafts (``0..drafted``) of one round whose plan predicts ``predicted``:
        each successive draft accepted with probability ``alpha_for(predicted)``, stopping
        at the first rejection."""
        a = self.alpha_for(predicted)
        for i in range(drafted):
            if rng.random() >= a:  # a = 1 never rejects, a = 0 always does
                return i
        return drafted


def parse_simulate_acceptance(text: str, seed: int = 0) -> AcceptanceSimulator:
    """``"predicted"``, ``"0.7"`` or ``"0.9xpredicted"`` -> an ``AcceptanceSimulator``.

    Raises ``KnapSpecError`` with one line naming the problem on anything else (a value
    outside [0, 1], a negative or non-finite scale, an unknown word).
    """
    spec = str(text).strip().lower().replace(" ", "")
    if spec == "predicted":
        return AcceptanceSimulator(spec, None, 1.0, seed)
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
        return AcceptanceSimulator(spec, None, value, seed)
    alpha = value
    if not 0.0 <= alpha <= 1.0:  # also refuses nan
        raise KnapSpecError(
            f"--simulate-acceptance {text!r}: a fixed acceptance must lie in [0, 1]"
        )
    return AcceptanceSimulator(spec, alpha, 1.0, seed)
