"""Acceptance calibration: the Beta posterior, the wrapper's plans (never slower, forced plans
kept, re-plan signal) and the decoder's feedback and plan-history statistics."""

from __future__ import annotations

import numpy as np
import pytest
from fake_backend import FakeBackend, fake_cost_model

from knapspec.blocks import BlockLayout
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.errors import KnapSpecError
from knapspec.planner import (
    AutoregressivePlanner,
    CalibratedPlanner,
    MaskStats,
    PlanContext,
    Planner,
    StaticPlanner,
    make_planner,
    select_plan,
)
from knapspec.planner.calibration import draft_key, round_outcome
from knapspec.simulate import parse_simulate_acceptance

LAYOUT = BlockLayout(4)
MASK = LAYOUT.mask_from_blocks([2, 3, 4])


def _wrapped(alpha: float = 0.9, draft_length: int | None = None, **kw) -> CalibratedPlanner:
    inner = StaticPlanner(LAYOUT, fake_cost_model(), MASK, alpha, draft_length, 4)
    return CalibratedPlanner(inner, fake_cost_model(), 4, **kw)


def test_round_outcome_is_successes_then_one_failure():
    assert round_outcome(4, 4) == (4, 0)  # every draft kept: no failure seen
    assert round_outcome(4, 1) == (1, 1)  # one kept, the second rejected
    assert round_outcome(1, 0) == (0, 1)
    for drafted, accepted in [(0, 0), (3, 4), (3, -1), (2.0, 1), (True, 0)]:
        with pytest.raises(KnapSpecError, match="observe: "):
            round_outcome(drafted, accepted)


def test_posterior_is_the_beta_mean_around_the_prediction():
    st = MaskStats(proxy_alpha=0.9)
    assert st.posterior(8.0) == 0.9 and st.observed_alpha is None
    st.accepted, st.rejected = 6, 4
    assert st.observed_alpha == pytest.approx(0.6)
    assert st.posterior(8.0) == pytest.approx((8 * 0.9 + 6) / (8 + 10))
    assert st.posterior(1e-9) == pytest.approx(0.6)  # no prior weight: the observation


def test_the_posterior_finds_a_true_acceptance_from_geometric_rounds():
    """Rounds drawn as the decoder sees them (keep a prefix of Bernoulli(0.55) tokens): the
    posterior moves from the proxy's 0.9 to the truth."""
    rng = np.random.default_rng(1)
    planner = _wrapped(alpha=0.9, draft_length=4)
    plan = planner.plan(PlanContext(context=64))
    for _ in range(3000):  # about 6000 Bernoulli trials: standard error 0.007
        ok = rng.random(4) < 0.55
        n = int(np.argmin(ok)) if not ok.all() else 4
        planner.observe(plan, 4, n)
    assert planner.calibrated_alpha(MASK) == pytest.approx(0.55, abs=0.02)


def test_unobserved_masks_keep_the_inner_plan():
    planner = _wrapped()
    ctx = PlanContext(context=64)
    got, want = planner.plan(ctx), planner.inner.plan(ctx)
    assert got.to_dict() == want.to_dict() and got.extra == want.extra


def test_observed_rejections_drop_a_plan_that_loses_to_ar():
    planner = _wrapped(alpha=0.9)
    ctx = PlanContext(context=64)
    first = planner.plan(ctx)
    assert first.draft_length > 0 and not first.forced
    for _ in range(20):
        planner.observe(first, first.draft_length, 0)  # every first draft rejected
    later = planner.plan(ctx)
    assert later.is_autoregressive
    assert "loses to plain decoding" in later.reason and "calibrated" in later.reason
    assert later.extra["proxy_alpha"] == 0.9 and later.extra["calibrated_alpha"] < 0.4
    # and it is what select_plan says for the observed acceptance: never slower than AR
    ar = AutoregressivePlanner(LAYOUT, fake_cost_model()).plan(ctx)
    assert later.tokens_per_second == pytest.approx(ar.tokens_per_second)


def test_good_observations_keep_an_unforced_plan_and_rescore_it():
    planner = _wrapped(alpha=0.8)
    ctx = PlanContext(context=64)
    first = planner.plan(ctx)
    assert first.draft_length == 1  # at 0.8 only one draft token pays
    for _ in range(30):
        planner.observe(first, first.draft_length, first.draft_length)  # all kept
    later = planner.plan(ctx)
    alpha = planner.calibrated_alpha(MASK)
    assert alpha > 0.9 and later.alpha == pytest.approx(alpha)
    assert later.draft_length > first.draft_length  # drafts further at the learnt acceptance
    best = select_plan(MASK[None], [alpha], fake_cost_model(), 64, 4)
    assert (later.draft_length, later.tokens_per_second) == (best.draft_length,
                                                            best.tokens_per_second)


def test_forced_plans_keep_drafting_with_the_calibrated_alpha():
    planner = _wrapped(alpha=0.9, draft_length=3)
    ctx = PlanContext(context=64)
    first = planner.plan(ctx)
    assert first.forced and first.draft_length == 3
    for _ in range(20):
        planner.observe(first, 3, 0)
    later = planner.plan(ctx)
    assert later.draft_length == 3 and later.forced
    assert later.alpha == pytest.approx(planner.calibrated_alpha(MASK)) and later.alpha < 0.4


def test_observe_asks_for_a_replan_when_posterior_and_plan_part():
    planner = _wrapped(alpha=0.9, draft_length=4, prior_strength=8.0, replan_margin=0.1)
    plan = planner.plan(PlanContext(context=64))
    assert planner.observe(plan, 4, 4) is False  # agrees with 0.9
    assert planner.observe(plan, 4, 0) is False  # (8*.9 + 4) / 13 = 0.86: within 0.1
    assert planner.observe(plan, 4, 0) is True  # (8*.9 + 4) / 14 = 0.80: re-plan
    replanned = planner.plan(PlanContext(context=65))
    assert replanned.alpha == pytest.approx(11.2 / 14)
    assert planner.observe(replanned, 4, 1) is False  # judged against the new alpha


def test_what_other_masks_showed_corrects_a_new_masks_prediction():
    other = LAYOUT.mask_from_blocks([5])
    planner = _wrapped(alpha=0.9)
    first = select_plan(other[None], [0.9], fake_cost_model(), 64, 4, force=True)
    planner.calibrate(first, PlanContext(context=64))  # the inner planner proposed `other`
    for _ in range(10):
        planner.observe(first, 1, 0)  # 0.9 predicted, nothing ever kept: 10 trials
    shift = (0 - 10 * 0.9) / (8 + 10)
    assert planner.proxy_shift(draft_key(MASK)) == pytest.approx(shift)
    assert planner.proxy_shift(draft_key(other)) == 0.0  # its own data is not counted twice
    plan = planner.plan(PlanContext(context=64))  # MASK: never drafted, predicted 0.9
    assert plan.extra["proxy_shift"] == pytest.approx(shift)
    assert planner.calibrated_alpha(MASK) == pytest.approx(0.9 + shift)
    assert plan.is_autoregressive  # at 0.4 it no longer pays


def test_a_mask_whose_acceptance_was_seen_keeps_its_place():
    seen = LAYOUT.mask_from_blocks([2, 3, 4, 5])  # cheaper drafts than MASK = [2, 3, 4]
    planner = _wrapped(alpha=0.95, draft_length=4)  # proposes MASK at 0.95, forced d = 4
    old = select_plan(seen[None], [0.99], fake_cost_model(), 64, [4], force=True)
    planner.calibrate(old, PlanContext(context=64))
    for _ in range(40):
        planner.observe(old, 4, 3)  # 0.99 predicted, 3 of 4 kept: 0.75 per token
    seen_alpha = planner.calibrated_alpha(seen)
    assert seen_alpha == pytest.approx((8 * 0.99 + 120) / (8 + 160))
    # MASK is predicted 0.95, less what predictions missed elsewhere: below the seen 0.75
    kept = planner.plan(PlanContext(context=64, current_mask=seen))
    assert np.array_equal(kept.mask, seen) and kept.extra["kept_current_mask"]
    assert kept.alpha == pytest.approx(seen_alpha) and kept.draft_length == 4
    # without a mask in use the proposal stands, at its calibrated acceptance
    fresh = planner.plan(PlanContext(context=64))
    assert np.array_equal(fresh.mask, MASK) and not fresh.extra["kept_current_mask"]
    assert fresh.alpha == pytest.approx(0.95 + (120 - 160 * 0.99) / (8 + 160))
    assert fresh.alpha < seen_alpha


def test_the_wrapper_delegates_to_the_inner_planner():
    planner = make_planner("clasp", LAYOUT, fake_cost_model(), 3)
    assert isinstance(planner, CalibratedPlanner)
    assert planner.name == "clasp" and planner.needs_oracle and planner.wants_oracle(10)
    assert planner.draft_length == 3  # other attributes are the inner planner's
    assert planner.warmup() == 0.0
    bare = make_planner("clasp", LAYOUT, fake_cost_model(), 3, calibrate=False)
    assert type(bare).__name__ == "ClaspPlanner"
    static = _wrapped()
    plan = static.plan(PlanContext(context=64))
    static.observe(plan, 2, 1)
    static.reset()  # a new generation: nothing observed
    assert static.stats == {} and static.calibrated_alpha(MASK) is None
    with pytest.raises(KnapSpecError, match="prior_strength must be > 0"):
        _wrapped(prior_strength=0)
    with pytest.raises(KnapSpecError, match="replan_margin must be > 0"):
        _wrapped(replan_margin=-1)
    with pytest.raises(KnapSpecError, match="wraps a Planner"):
        CalibratedPlanner(object(), fake_cost_model())


# ------------------------------------------------------------------ through the decoder
def test_plan_history_says_what_happened_under_each_plan():
    be = FakeBackend(vocab=24, n_layers=4)
    prompt, cfg = [1, 5, 7, 2], GenerationConfig(max_new_tokens=60, replan_interval=4)
    ref = SpeculativeDecoder(be, make_planner("ar", be.layout, fake_cost_model())).generate(
        prompt, cfg)
    planner = make_planner("static", be.layout, fake_cost_model(), 4, mask=[2, 3, 4],
                           draft_length=3, alpha=0.95)
    res = SpeculativeDecoder(be, planner).generate(prompt, cfg)
    assert res.tokens == ref.tokens  # calibration changes plans, never the output
    hist = res.plan_history
    assert sum(r["drafted"] for r in hist) == res.drafted
    assert sum(r["accepted"] for r in hist) == res.accepted
    assert sum(r["rounds"] for r in hist) == res.rounds
    last = hist[-1]
    assert last["observed_alpha"] == pytest.approx(
        last["accepted"] / (last["accepted"] + last["rejected"]))
    # predicted_alpha is the posterior over every round run under the mask
    st = planner.stats[draft_key(be.layout.mask_from_blocks([2, 3, 4]))]
    assert st.drafted == res.drafted and st.rounds == res.rounds
    assert last["predicted_alpha"] == pytest.approx((8 * 0.95 + st.accepted)
                                                    / (8 + st.accepted + st.rejected))
    assert last["proxy_alpha"] == 0.95
    assert res.to_dict()["plan_history"] == hist


class _Spy(Planner):
    """Drafts a fixed mask; counts plans and reports; asks for a re-plan when told to."""

    name = "spy"

    def __init__(self, layout: BlockLayout, replan: bool) -> None:
        self.inner = StaticPlanner(layout, fake_cost_model(), layout.mask_from_blocks([2]),
                                   0.8, draft_length=2)
        self.replan, self.plans, self.reports = replan, 0, []

    def plan(self, ctx: PlanContext):
        self.plans += 1
        return self.inner.plan(ctx)

    def observe(self, plan, drafted, accepted) -> bool:
        self.reports.append((drafted, accepted))
        return self.replan


@pytest.mark.parametrize("replan", [False, True])
def test_the_decoder_reports_every_drafting_round_and_replans_when_asked(replan):
    be = FakeBackend(vocab=24, n_layers=4)
    spy = _Spy(be.layout, replan)
    res = SpeculativeDecoder(be, spy).generate([1, 2, 3], GenerationConfig(40, replan_interval=8))
    assert len(spy.reports) == res.rounds
    assert sum(d for d, _ in spy.reports) == res.drafted
    assert sum(a for _, a in spy.reports) == res.accepted
    rounds = res.rounds + res.ar_steps
    # asked every round: a plan before each; otherwise one per 8 rounds
    assert spy.plans == (rounds if replan else -(-rounds // 8))


def test_simulated_acceptance_teaches_the_planner_nothing():
    be = FakeBackend(vocab=24, n_layers=4)
    spy = _Spy(be.layout, replan=False)
    sim = parse_simulate_acceptance("0.5")
    res = SpeculativeDecoder(be, spy, simulator=sim).generate([1, 2, 3], GenerationConfig(30))
    assert res.rounds > 0 and spy.reports == []
    assert sum(r["drafted"] for r in res.plan_history) == res.drafted  # still recorded
