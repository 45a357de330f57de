"""Acceptance that learns from drafting: a per-mask Beta posterior around the proxy.

A planner predicts a skip mask's per-token acceptance ``alpha`` from a proxy (logit agreement
on a few tokens, or a fidelity profile); only drafting shows the truth.  A round that drafts
``d`` tokens and keeps the first ``n`` is, under the geometric model of the TPT objective,
``n`` successes of a per-token Bernoulli(``alpha``) followed (when ``n < d``) by one
failure.  With a Beta prior of mean ``p`` (the proxy's prediction) and strength ``s``
pseudo-tokens, the posterior after ``A`` accepted tokens and ``R`` rejecting rounds is
``Beta(s p + A, s (1 - p) + R)``, of mean ``(s p + A) / (s + A + R)``.  The prior mean is
the prediction corrected by how far the predictions missed on the other masks drafted with
in the same generation (``CalibratedPlanner.proxy_shift``): a planner that searches a new
mask at every plan (CLaSp) would otherwise never have more than a few rounds of evidence.

``CalibratedPlanner`` wraps any planner (``make_planner`` wraps every strategy by default):

* each plan the inner planner returns, once anything was drafted in this generation, gets
  its mask's posterior mean as its ``alpha`` and is scored again by ``select_plan``; a plan
  that then loses to plain decoding is dropped for the autoregressive plan (the
  never-slower guarantee under observed acceptance), unless it was forced
  (``DraftPlan.forced``: a fixed draft length), which keeps drafting and reports the
  calibrated alpha;
* the mask in use, once it has drafted, competes with each new proposal at its own
  posterior, so a mask whose acceptance was seen is not displaced by one that only
  predicts better;
* ``observe`` records a round and returns True, asking the loop to re-plan, when the
  posterior and the ``alpha`` the plan in use was made with part by more than
  ``replan_margin``.

Observations are kept per draft, a (skip mask, draft head) pair: a reduced-vocabulary
head drafts with another acceptance.  A round under a confidence stop ends early only after
an unsure draft, so its counts mix the acceptance of sure and unsure drafts; the posterior
is still read as the draft's per-token acceptance (a slight overestimate when stops are
frequent).

Observations are kept per generation (``reset`` forgets them): acceptance depends on the
text, and a generation's result then depends on its prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..costmodels.base import CostModel
from ..errors import KnapSpecError
from .plan import DraftPlan, select_plan
from .planners import PlanContext, Planner


@dataclass
class MaskStats:
    """What drafting under one skip mask showed (counts over a generation)."""

    proxy_alpha: float  # the inner planner's latest prediction for the mask, in [0, 1]
    accepted: int = 0  # drafted tokens kept by verification (successes)
    rejected: int = 0  # rounds that ended in a rejected draft (failures)
    drafted: int = 0  # drafted tokens
    rounds: int = 0  # drafting rounds

    @property
    def observed_alpha(self) -> float | None:
        """Maximum-likelihood per-token acceptance ``A / (A + R)`` (None: not drafted)."""
        trials = self.accepted + self.rejected
        return self.accepted / trials if trials else None

    @property
    def trials(self) -> int:
        """Bernoulli trials observed: accepted tokens plus rejecting rounds."""
        return self.accepted + self.rejected

    def posterior(self, strength: float, shift: float = 0.0) -> float:
        """Posterior mean acceptance under a prior of mean ``proxy_alpha + shift`` (clipped
        to [0, 1]) and ``strength`` pseudo-tokens."""
        prior = min(1.0, max(0.0, self.proxy_alpha + shift))
        return (strength * prior + self.accepted) / (strength + self.trials)


def round_outcome(drafted: int, accepted: int) -> tuple[int, int]:
    """(successes, failures) of a round that drafted ``drafted`` tokens and kept the first
    ``accepted``; raises ``KnapSpecError`` for impossible counts."""
    if isinstance(drafted, bool) or not isinstance(drafted, (int, np.integer)) or drafted < 1:
        raise KnapSpecError(f"observe: drafted must be an integer >= 1, got {drafted!r}")
    if (isinstance(accepted, bool) or not isinstance(accepted, (int, np.integer))
            or not 0 <= accepted <= drafted):
        raise KnapSpecError(
            f"observe: accepted must be an integer in [0, {drafted}], got {accepted!r}")
    return int(accepted), int(accepted < drafted)


def draft_key(mask: np.ndarray, draft_vocab: int = 0) -> bytes:
    """The key observations are kept under: skip mask ``[2L]`` and draft head size."""
    return np.asarray(mask, dtype=bool).tobytes() + int(draft_vocab).to_bytes(4, "little")


class CalibratedPlanner(Planner):
    """``inner``'s plans with acceptance calibrated on what drafting showed (module doc).

    Args:
        inner: the planner whose plans are calibrated; ``name``, ``needs_oracle``,
            ``wants_oracle``, ``warmup`` and ``reset`` are its, and any other attribute
            is read from it.
        cost_model: seconds per block, to score calibrated plans (the inner planner's).
        max_draft_length: largest draft length (tokens) a calibrated, unforced plan may
            take (lowered to the inner planner's ``max_draft_length`` when it has one).
        prior_strength: the proxy's weight in pseudo-tokens (> 0): after that many
            observed tokens the observation weighs as much as the prediction.
        replan_margin: ``observe`` asks for a re-plan when the posterior and the plan's
            alpha differ by more than this (> 0; >= 1: never).
    """

    def __init__(
        self,
        inner: Planner,
        cost_model: CostModel,
        max_draft_length: int = 8,
        prior_strength: float = 8.0,
        replan_margin: float = 0.1,
    ) -> None:
        if not isinstance(inner, Planner):
            raise KnapSpecError(f"CalibratedPlanner wraps a Planner, got {type(inner).__name__}")
        if not prior_strength > 0:
            raise KnapSpecError(f"prior_strength must be > 0, got {prior_strength!r}")
        if not replan_margin > 0:
            raise KnapSpecError(f"replan_margin must be > 0, got {replan_margin!r}")
        if max_draft_length < 1:
            raise KnapSpecError(f"max_draft_length must be >= 1, got {max_draft_length}")
        self.inner = inner
        self.cost_model = cost_model
        own = getattr(inner, "max_draft_length", None)  # an inner planner's own bound wins
        self.max_draft_length = int(max_draft_length if not isinstance(own, int)
                                    else min(own, max_draft_length))
        self.prior_strength = float(prior_strength)
        self.replan_margin = float(replan_margin)
        self.stats: dict[bytes, MaskStats] = {}  # mask bytes -> this generation's counts

    # ------------------------------------------------------------ delegated to inner
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def needs_oracle(self) -> bool:  # type: ignore[override]
        return self.inner.needs_oracle

    @property
    def knobs(self) -> Any:  # type: ignore[override]
        return self.inner.knobs

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def wants_oracle(self, context: int) -> bool:
        return self.inner.wants_oracle(context)

    def warmup(self) -> float:
        return self.inner.warmup()

    def reset(self) -> None:
        """Forget this generation's observations, and the inner planner's state."""
        self.inner.reset()
        self.stats = {}

    # ------------------------------------------------------------ calibration
    def proxy_shift(self, key: bytes) -> float:
        """How far the inner planner's predictions missed on the *other* masks drafted with
        this generation: ``sum_j (A_j - n_j p_j) / (s + sum_j n_j)`` over masks ``j`` with
        ``n_j`` trials, ``A_j`` accepted and prediction ``p_j`` (shrunk to 0 by the prior
        strength ``s``).  Added to a mask's prediction, it is the prior mean of its
        posterior: a proxy that overestimated elsewhere is trusted less here."""
        miss = trials = 0.0
        for k, st in self.stats.items():
            if k != key and st.trials:
                miss += st.accepted - st.trials * st.proxy_alpha
                trials += st.trials
        return miss / (self.prior_strength + trials)

    def _posterior(self, key: bytes, st: MaskStats) -> float:
        return st.posterior(self.prior_strength, self.proxy_shift(key))

    def calibrated_alpha(self, mask: np.ndarray, draft_vocab: int = 0) -> float | None:
        """Posterior mean acceptance of ``mask`` ``[2L]`` drafting with the head of
        ``draft_vocab`` ids (0: full) (None: never planned with)."""
        key = draft_key(mask, draft_vocab)
        st = self.stats.get(key)
        return None if st is None else self._posterior(key, st)

    def acceptance(self, plan: DraftPlan) -> float:
        """The current estimate of ``plan``'s per-token acceptance: its draft's posterior."""
        alpha = self.calibrated_alpha(plan.mask, plan.draft_vocab)
        return plan.alpha if alpha is None or plan.is_autoregressive else alpha

    def plan(self, ctx: PlanContext) -> DraftPlan:
        return self.calibrate(self.inner.plan(ctx), ctx)

    def calibrate(self, plan: DraftPlan, ctx: PlanContext) -> DraftPlan:
        """``plan`` with its mask's calibrated acceptance, scored again (module doc).

        The mask in use (``ctx.current_mask``), when it has drafted, is scored beside it at
        its own posterior, and the better of the two by TPT is returned: a proposal the
        inner planner rates above the plan in use only on its prediction does not displace a
        mask whose acceptance was seen, unless it is still predicted faster after
        calibration.  Autoregressive plans pass unchanged (the inner planner's decision).
        """
        if plan.is_autoregressive:
            return plan
        key = draft_key(plan.mask, plan.draft_vocab)
        st = self.stats.setdefault(key, MaskStats(proxy_alpha=float(plan.alpha)))
        st.proxy_alpha = float(plan.alpha)
        shift = self.proxy_shift(key)
        if st.trials == 0 and shift == 0.0:
            return plan  # nothing observed: the proxy's prediction stands
        masks, alphas, proxies = [plan.mask], [st.posterior(self.prior_strength, shift)], [
            float(plan.alpha)]
        cur = None if ctx.current_mask is None else np.asarray(ctx.current_mask, dtype=bool)
        cur_key = None if cur is None else draft_key(cur, plan.draft_vocab)
        held = None if cur is None else self.stats.get(cur_key)
        if held is not None and held.trials and cur_key != key:
            masks.append(cur)
            alphas.append(self._posterior(cur_key, held))
            proxies.append(held.proxy_alpha)
        lengths = [plan.draft_length] if plan.forced else self.max_draft_length
        # the alphas are the draft's with its head: no coverage to apply again
        knobs = self.knobs.only_head(plan.draft_vocab, 1.0) if self.knobs is not None else None
        new = select_plan(np.array(masks), alphas, self.cost_model, ctx.context, lengths,
                          strategy=plan.strategy, remaining_tokens=ctx.remaining_tokens,
                          switch_price=ctx.switch_price, force=plan.forced, knobs=knobs)
        k = 0 if new.is_autoregressive or np.array_equal(new.mask, plan.mask) else 1
        extra = {**plan.extra, "proxy_alpha": proxies[k], "calibrated_alpha": alphas[k],
                 "proxy_shift": shift if k == 0 else self.proxy_shift(cur_key),
                 "kept_current_mask": k == 1}
        if new.is_autoregressive:
            reason = (f"skip {plan.describe()} loses to plain decoding at context "
                      f"{ctx.context} under its observed acceptance (calibrated "
                      f"{alphas[0]:.2f}, predicted {plan.alpha:.2f})")
            return replace(new, extra=extra, reason=reason)
        return replace(new, extra=extra)

    def observe(self, plan: DraftPlan, drafted: int, accepted: int) -> bool:
        """Record a round (``Planner.observe``); True: the posterior left the plan's alpha
        by more than ``replan_margin``, re-plan before the next round."""
        self.inner.observe(plan, drafted, accepted)
        ok, failed = round_outcome(drafted, accepted)
        key = draft_key(plan.mask, plan.draft_vocab)
        st = self.stats.get(key)
        if st is None:
            proxy = plan.extra.get("proxy_alpha", plan.alpha)
            st = self.stats[key] = MaskStats(proxy_alpha=float(proxy))
        st.accepted += ok
        st.rejected += failed
        st.drafted += int(drafted)
        st.rounds += 1
        return abs(self._posterior(key, st) - plan.alpha) > self.replan_margin


__all__ = ["CalibratedPlanner", "MaskStats", "draft_key", "round_outcome"]
