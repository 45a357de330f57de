"""Round knobs: the acceptance-by-confidence table, the stopped-round objective against a
brute-force enumeration of its model, and ``select_plan`` with knobs.

The round model (``knapspec.planner.objective``): a round drafts until ``d`` tokens or up to
and including the first draft whose confidence is below ``tau``.  Each step is independently
confident with probability ``s``; a confident draft is accepted with probability
``alpha_hi``, an unsure one with ``alpha_lo``, so ``alpha = s alpha_hi + (1 - s) alpha_lo``.
The round yields its accepted prefix plus one token and verifies what it drafted.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from fake_backend import linear_cost_model
from hypothesis import given, settings
from hypothesis import strategies as st

from knapspec.blocks import BlockLayout
from knapspec.errors import KnapSpecError
from knapspec.planner import CalibratedPlanner, PlanContext, StaticPlanner, select_plan
from knapspec.planner.calibration import draft_key
from knapspec.planner.knobs import (
    DEFAULT_THRESHOLDS,
    FULL_HEAD,
    ConfidenceTable,
    DraftHead,
    DraftKnobs,
    make_knobs,
)
from knapspec.planner.objective import (
    expected_tokens,
    expected_verify_seconds,
    geometric_sum,
    stopped_round,
)

unit = st.floats(0.0, 1.0, allow_nan=False)
EDGES = np.round(np.arange(11) / 10, 10)  # tenths, 0 .. 1


def _table() -> ConfidenceTable:
    """Three reference drafts over tenths: the better the draft, the more confident and the
    more its confident steps are accepted (the shape measured on SmolLM2)."""
    fraction = np.array([
        [0.40, 0.25, 0.12, 0.08, 0.05, 0.04, 0.02, 0.02, 0.01, 0.01],
        [0.15, 0.15, 0.12, 0.10, 0.10, 0.08, 0.08, 0.07, 0.07, 0.08],
        [0.02, 0.03, 0.05, 0.05, 0.06, 0.07, 0.09, 0.12, 0.16, 0.35],
    ])
    accept = np.array([
        [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95],
        [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.97],
        [0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95, 0.99],
    ])
    alphas = (fraction * accept).sum(axis=1)
    return ConfidenceTable(EDGES, alphas, fraction, accept)


# ------------------------------------------------------------------ the table
@pytest.mark.parametrize("make", [_table, ConfidenceTable.default])
@settings(max_examples=40, deadline=None)
@given(alpha=unit)
def test_no_stop_is_every_step_at_the_drafts_own_acceptance(make, alpha):
    s, hi = make().stop_stats(alpha, 0.0)
    assert s == 1.0 and hi == pytest.approx(alpha)


@pytest.mark.parametrize("make", [_table, ConfidenceTable.default])
@settings(max_examples=60, deadline=None)
@given(alpha=unit)
def test_a_higher_threshold_keeps_fewer_steps_and_never_more_acceptance(make, alpha):
    taus = np.linspace(0.0, 0.99, 34)
    s, hi = make().stop_stats(alpha, taus)
    assert np.all(np.diff(s) <= 1e-12)  # fewer confident steps as tau rises
    assert np.all((s >= 0) & (s <= 1)) and np.all((hi >= 0) & (hi <= 1))
    assert np.all(s * hi <= alpha + 1e-12)  # the confident steps' acceptance is alpha's part
    unsure = s < 1 - 1e-9
    lo = (alpha - s[unsure] * hi[unsure]) / (1 - s[unsure])  # the unsure steps' acceptance
    assert np.all((lo >= -1e-9) & (lo <= 1 + 1e-9))


def test_confident_steps_are_accepted_more_than_the_average():
    tab = _table()
    for alpha in (0.2, 0.5, 0.8):
        s, hi = tab.stop_stats(alpha, 0.5)
        assert 0 < s < 1 and hi > alpha


def test_reference_rows_are_reproduced_and_others_interpolated():
    tab = _table()
    for r, alpha in enumerate(tab.alphas):
        for b, tau in enumerate(EDGES[:-1]):
            s, hi = tab.stop_stats(alpha, tau)
            keep = slice(b, None)
            assert s == pytest.approx(tab.fraction[r, keep].sum())
            assert hi == pytest.approx((tab.fraction[r, keep] * tab.accept[r, keep]).sum()
                                       / tab.fraction[r, keep].sum())
    # halfway between two references: halfway between their confident shares
    mid = tab.alphas[:2].mean()
    s, _ = tab.stop_stats(mid, 0.5)
    assert s == pytest.approx(tab.fraction[:2, 5:].sum(axis=1).mean())
    # outside the references: the nearest one's shares, acceptance rescaled to alpha
    for alpha, r in ((0.01, 0), (0.999, 2)):
        s, hi = tab.stop_stats(alpha, 0.5)
        assert s == pytest.approx(tab.fraction[r, 5:].sum())
        assert s * hi <= alpha + 1e-12


def test_beyond_the_best_reference_sure_drafts_are_still_sometimes_rejected():
    """A draft better than every reference keeps the best one's shares; its rejections,
    not its acceptances, are scaled, so no bin's rate passes 1."""
    tab = _table()
    assert tab.alphas[-1] < 0.9
    for alpha in (0.9, 0.95, 0.99):
        s, hi = tab.stop_stats(alpha, np.array([0.5, 0.8, 0.9]))
        assert np.all(hi < 1.0) and np.all(np.diff(hi) > 0)
        rejected = (1 - alpha) / (1 - tab.alphas[-1])  # of the best reference's rejections
        want = 1 - (tab.fraction[-1, 9:] * (1 - tab.accept[-1, 9:])).sum() * rejected / s[2]
        assert hi[2] == pytest.approx(want)
    assert tab.stop_stats(1.0, 0.8)[1] == 1.0


def test_a_threshold_between_edges_rounds_down_to_an_edge():
    tab = _table()
    alpha = np.full(4, 0.5)
    s, hi = tab.stop_stats(alpha, np.array([0.3, 0.35, 0.3999, 0.4]))
    assert s[0] == s[1] == s[2] > s[3]
    assert hi[0] == hi[1] == hi[2]


def test_edges_made_by_linspace_still_hold_their_thresholds():
    """``np.linspace(0, 1, 11)[3]`` is 0.30000000000000004: a threshold of 0.3 lies on that
    edge, not a bin below it."""
    ref = _table()
    lin = ConfidenceTable(np.linspace(0, 1, 11), ref.alphas, ref.fraction, ref.accept)
    for tau in DEFAULT_THRESHOLDS:
        np.testing.assert_allclose(np.array(lin.stop_stats(0.5, tau), dtype=float),
                                   np.array(ref.stop_stats(0.5, tau), dtype=float))


def test_round_trip_through_a_dict():
    tab = replace(_table(), meta={"method": "test"})
    back = ConfidenceTable.from_dict(tab.to_dict())
    for name in ("edges", "alphas", "fraction", "accept"):
        np.testing.assert_allclose(getattr(back, name), getattr(tab, name), rtol=1e-12)
    assert back.meta == {"method": "test"}


def _bad(**change) -> dict:
    good = _table().to_dict()
    good.update(change)
    return good


@pytest.mark.parametrize(
    "obj, match",
    [
        ([1, 2], "expected an object with edges, alphas, fraction and accept"),
        ({"edges": [0, 1]}, "expected an object with edges"),
        (_bad(edges=[0.1, *EDGES[1:]]), "edges must increase from 0 to 1"),
        (_bad(edges=[0.0, 0.5, 0.4, *EDGES[4:]]), "edges must increase"),
        (_bad(edges=[*EDGES[:-1], 0.95]), "edges must increase from 0 to 1"),
        (_bad(fraction=_table().fraction[:, :5].tolist()), r"expected alphas \[R\], fraction"),
        (_bad(alphas=[0.3, 0.5]), r"expected alphas \[R\]"),
        (_bad(accept=np.full((3, 10), np.nan).tolist()), "NaN or inf"),
        (_bad(fraction=(-_table().fraction).tolist()), "fractions >= 0"),
        (_bad(accept=(_table().accept * 2).tolist()), r"rates in \[0, 1\]"),
        (_bad(alphas=[0.5, 0.4, 0.6]), "alphas increasing"),
        (_bad(alphas=["a", "b", "c"]), "confidence table: could not convert"),
    ],
)
def test_bad_tables_name_the_problem(obj, match):
    with pytest.raises(KnapSpecError, match=match):
        ConfidenceTable.from_dict(obj)


# ------------------------------------------------------------------ the shipped table
def test_the_shipped_table_loads_and_reproduces_its_reference_drafts():
    tab = ConfidenceTable.default()
    assert tab is not None
    r = len(tab.alphas)
    assert r >= 4 and tab.alphas.min() < 0.35 and tab.alphas.max() > 0.75
    # every reference's bins add up to its measured acceptance
    np.testing.assert_allclose((tab.fraction * tab.accept).sum(axis=1), tab.alphas, atol=1e-9)
    np.testing.assert_allclose(tab.stop_stats(tab.alphas, 0.0)[1], tab.alphas)
    meta = tab.meta
    assert {"method", "texts", "tokens", "masks", "command"} <= set(meta)
    assert meta["command"].startswith("python scripts/measure_confidence.py")
    assert len(meta["masks"]) == r and meta["tokens"] >= 500  # several hundred per draft
    layout = BlockLayout(30)
    for row, alpha in zip(meta["masks"], tab.alphas, strict=True):
        layout.mask_from_blocks(row["skipped_blocks"])  # valid: no pinned block skipped
        assert row["alpha"] == pytest.approx(alpha, abs=1e-4)
    # confidence predicts acceptance: steps at >= 0.5 are accepted more than those below
    _, hi = tab.stop_stats(tab.alphas, 0.5)
    assert np.all(hi > tab.alphas)


# ------------------------------------------------------------------ knobs
def test_knobs_validate_what_they_carry():
    with pytest.raises(KnapSpecError, match="needs an acceptance-by-confidence table"):
        DraftKnobs(thresholds=(0.5,))
    with pytest.raises(KnapSpecError, match=r"stop_confidence must lie in \[0, 1\)"):
        DraftKnobs(thresholds=(0.0, 1.0), confidence=_table())
    with pytest.raises(KnapSpecError, match="one entry per vocabulary size"):
        DraftKnobs(heads=(FULL_HEAD, DraftHead(0)))
    with pytest.raises(KnapSpecError, match="coverage must lie in"):
        DraftHead(100, coverage=1.5)
    knobs = make_knobs([DraftHead(1000, coverage=0.9)], _table())
    assert knobs.thresholds == DEFAULT_THRESHOLDS and not knobs.trivial
    assert [h.vocab for h in knobs.heads] == [0, 1000]
    assert make_knobs().trivial and make_knobs(confidence=None, stop_confidence=0).trivial
    assert make_knobs(confidence=_table(), stop_confidence=0.4).thresholds == (0.4,)
    with pytest.raises(KnapSpecError, match="draft_vocab 500 is not a head"):
        knobs.only_head(500)
    with pytest.raises(KnapSpecError, match="needs an acceptance-by-confidence table"):
        make_knobs(stop_confidence=0.5)


# ------------------------------------------------------------------ the objective
def _enumerate_round(alpha_hi, alpha_lo, s, d, verify):
    """E[tokens], E[drafted], E[verify seconds] of the round model, by enumerating every
    (confident?, accepted?) outcome of the ``d`` steps."""
    outcomes = [((True, True), s * alpha_hi), ((True, False), s * (1 - alpha_hi)),
                ((False, True), (1 - s) * alpha_lo), ((False, False), (1 - s) * (1 - alpha_lo))]
    tokens = steps = seconds = 0.0
    for path in itertools.product(outcomes, repeat=d):
        p = float(np.prod([q for _, q in path]))
        drafted = next((j + 1 for j, ((sure, _), _) in enumerate(path) if not sure), d)
        kept = next((j for j in range(drafted) if not path[j][0][1]), drafted)
        tokens += p * (kept + 1)
        steps += p * drafted
        seconds += p * verify[drafted - 1]
    return tokens, steps, seconds


@settings(max_examples=80, deadline=None)
@given(hi=unit, lo=unit, s=unit, d=st.integers(1, 5), seed=st.integers(0, 1000))
def test_stopped_round_matches_an_enumeration_of_its_model(hi, lo, s, d, seed):
    alpha = s * hi + (1 - s) * lo
    verify = np.cumsum(np.random.default_rng(seed).uniform(0.1, 1.0, 6))  # [J] increasing
    tokens, steps = stopped_round(alpha, s, hi, d)
    seconds = expected_verify_seconds(s, verify, np.array([d]))[0]
    want = _enumerate_round(hi, lo, s, d, verify)
    assert (tokens, steps, seconds) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_stopped_round_monte_carlo():
    """The same model drawn step by step (a second, independent check)."""
    rng = np.random.default_rng(0)
    hi, lo, s, d = 0.9, 0.3, 0.7, 6
    verify = np.arange(1.0, 7.0) ** 1.5
    n = 200_000
    sure = rng.random((n, d)) < s
    ok = np.where(sure, rng.random((n, d)) < hi, rng.random((n, d)) < lo)
    drafted = np.where(sure.all(axis=1), d, np.argmax(~sure, axis=1) + 1)  # [n]
    first_bad = np.where(~ok.all(axis=1), np.argmax(~ok, axis=1), d)
    kept = np.minimum(first_bad, drafted)
    tokens, steps = stopped_round(s * hi + (1 - s) * lo, s, hi, d)
    seconds = expected_verify_seconds(s, verify, np.array([d]))[0]
    assert tokens == pytest.approx((kept + 1).mean(), rel=0.01)
    assert steps == pytest.approx(drafted.mean(), rel=0.01)
    assert seconds == pytest.approx(verify[drafted - 1].mean(), rel=0.01)


@given(a=unit, d=st.integers(1, 12))
def test_without_a_stop_the_round_is_the_fixed_length_round(a, d):
    tokens, steps = stopped_round(a, 1.0, a, d)
    assert tokens == pytest.approx(expected_tokens(a, d)) and steps == d
    verify = np.arange(1.0, 13.0)
    assert expected_verify_seconds(1.0, verify, np.array([d]))[0] == pytest.approx(verify[d - 1])
    assert geometric_sum(a, d) == pytest.approx(sum(a**j for j in range(d)))


# ------------------------------------------------------------------ select_plan with knobs
masks_strategy = st.lists(st.lists(st.booleans(), min_size=8, max_size=8), min_size=1,
                          max_size=5)


def _fixed_length_best(masks, alphas, cm, ctx, dmax):
    """The best TPT of the fixed-length objective, by a plain loop (0: nothing drafts)."""
    best = 0.0
    for m, a in zip(masks, alphas, strict=True):
        for d in range(1, dmax + 1):
            rate = expected_tokens(a, d) / (d * cm.step_seconds(m, ctx, 1)
                                            + cm.full_step_seconds(4, ctx, d + 1))
            best = max(best, rate)
    return best


def _stopped_tpt(plan, cm, tab, ctx):
    """A plan's TPT under the stopped-round model, by plain loops over its draft steps."""
    d, tau, alpha = plan.draft_length, plan.stop_confidence, plan.alpha
    s, hi = (1.0, alpha) if tab is None else (float(x) for x in tab.stop_stats(alpha, tau))
    tokens = 1 + sum(alpha * (s * hi) ** j for j in range(d))
    draft = cm.step_seconds(plan.mask, ctx, 1)
    seconds = cm.full_step_seconds(4, ctx, 2)
    for j in range(1, d + 1):
        seconds += s ** (j - 1) * draft  # draft j runs when the j - 1 before it were sure
        if j > 1:
            seconds += s ** (j - 1) * (cm.full_step_seconds(4, ctx, j + 1)
                                       - cm.full_step_seconds(4, ctx, j))
    return tokens / seconds


@settings(max_examples=50, deadline=None)
@given(masks_strategy, st.data(), st.integers(1, 8000), st.integers(1, 8))
def test_trivial_knobs_give_exactly_the_plan_without_knobs(masks, data, ctx, dmax):
    cm = linear_cost_model()
    arr = np.array(masks, dtype=bool)
    a = data.draw(st.lists(unit, min_size=len(arr), max_size=len(arr)))
    plain = select_plan(arr, a, cm, ctx, dmax)
    for knobs in (DraftKnobs(), DraftKnobs(confidence=_table())):  # tau = 0 only
        with_knobs = select_plan(arr, a, cm, ctx, dmax, knobs=knobs)
        assert with_knobs.to_dict() == plain.to_dict()
        assert with_knobs.cost == plain.cost
    best = _fixed_length_best(arr, a, cm, ctx, dmax)
    ar = 1.0 / cm.full_step_seconds(4, ctx, 1)
    assert plain.tokens_per_second == pytest.approx(max(best, ar))
    if plain.draft_length:
        assert plain.cost.expected_draft_steps == plain.draft_length


@settings(max_examples=50, deadline=None)
@given(masks_strategy, st.data(), st.integers(1, 8000), st.integers(1, 8))
def test_knobs_never_lower_the_predicted_rate_and_never_lose_to_plain_decoding(
    masks, data, ctx, dmax
):
    cm = linear_cost_model()
    arr = np.array(masks, dtype=bool)
    a = data.draw(st.lists(unit, min_size=len(arr), max_size=len(arr)))
    tab = _table()
    plain = select_plan(arr, a, cm, ctx, dmax)
    plan = select_plan(arr, a, cm, ctx, dmax, knobs=make_knobs(confidence=tab))
    assert plan.tokens_per_second >= plain.tokens_per_second * (1 - 1e-12)
    assert plan.speedup >= 1 - 1e-12  # the autoregressive fallback still holds
    if plan.draft_length:
        assert plan.tokens_per_second == pytest.approx(_stopped_tpt(plan, cm, tab, ctx))
        assert plan.cost.expected_draft_steps <= plan.draft_length + 1e-12
    else:
        assert plan.stop_confidence == 0.0 and plan.draft_vocab == 0


def test_a_stop_is_chosen_where_it_pays_and_reported():
    """A cheap draft of good acceptance: without a stop the best round is short (long rounds
    waste the steps after a miss); with one, rounds run long while the draft is sure."""
    cm = linear_cost_model(head_s=1e-4, overhead_s=1e-4, head_per_token_s=0.0)
    mask = BlockLayout(4).mask_from_blocks([2, 3, 4, 5])
    tab = _table()
    plain = select_plan([mask], [0.9], cm, 200, 8)
    plan = select_plan([mask], [0.9], cm, 200, 8, knobs=make_knobs(confidence=tab))
    assert 0 < plain.draft_length < plan.draft_length
    assert plan.stop_confidence > 0 and plan.tokens_per_second > plain.tokens_per_second
    assert plan.cost.expected_draft_steps < plan.draft_length
    out = plan.to_dict()
    assert out["stop_confidence"] == plan.stop_confidence and out["draft_vocab"] == 0
    assert out["expected_draft_steps"] == pytest.approx(plan.cost.expected_draft_steps)


def test_no_draft_pays_gives_the_autoregressive_plan_with_knobs_too():
    cm = linear_cost_model(mlp_s=1e-1)  # a draft step costs as much as it saves, and more
    mask = BlockLayout(4).mask_from_blocks([2])
    plan = select_plan([mask], [0.6], cm, 100, 8, knobs=make_knobs(confidence=_table()))
    assert plan.is_autoregressive and plan.stop_confidence == 0.0
    assert "no draft pays" in plan.reason


def test_force_honours_the_knobs():
    cm = linear_cost_model(mlp_s=1e-1)  # nothing pays: only force drafts
    mask = BlockLayout(4).mask_from_blocks([2])
    knobs = make_knobs([DraftHead(1000, seconds=1e-4, coverage=0.9)], _table(),
                       stop_confidence=0.6, draft_vocab=1000)
    plan = select_plan([mask], [0.6], cm, 100, [3], force=True, knobs=knobs)
    assert plan.forced and plan.draft_length == 3
    assert plan.stop_confidence == 0.6 and plan.draft_vocab == 1000
    assert plan.alpha == pytest.approx(0.6 * 0.9)  # acceptance scaled by the coverage
    assert plan.cost.draft_head_seconds == 1e-4
    # a planner forced to a draft length keeps its knobs' stop
    static = StaticPlanner(BlockLayout(4), cm, mask, 0.6, draft_length=3)
    static.knobs = make_knobs(confidence=_table(), stop_confidence=0.6)
    assert static.plan(PlanContext(context=100)).stop_confidence == 0.6


def test_calibration_is_kept_per_mask_and_draft_head():
    layout = BlockLayout(4)
    mask = layout.mask_from_blocks([2, 3, 4])
    cm = linear_cost_model()
    inner = StaticPlanner(layout, cm, mask, 0.8, draft_length=3)
    inner.knobs = make_knobs([DraftHead(1000, coverage=0.9)], _table(), stop_confidence=0.5)
    planner = CalibratedPlanner(inner, cm, 4)
    plan = planner.plan(PlanContext(context=64))
    assert plan.stop_confidence == 0.5
    reduced = replace(plan, draft_vocab=1000)
    assert draft_key(mask, 0) != draft_key(mask, 1000)
    for _ in range(20):
        planner.observe(plan, 3, 3)  # the full head: everything kept
        planner.observe(reduced, 3, 0)  # the reduced head: nothing kept
    full_alpha = planner.calibrated_alpha(mask, 0)
    reduced_alpha = planner.calibrated_alpha(mask, 1000)
    assert full_alpha > 0.8 > 0.5 > reduced_alpha
    assert planner.stats[draft_key(mask, 0)].rounds == 20
    assert planner.stats[draft_key(mask, 1000)].rounds == 20
    # a forced plan keeps drafting with its stop after calibration
    again = planner.plan(PlanContext(context=64, current_mask=mask))
    assert again.draft_length == 3 and again.stop_confidence == 0.5 and again.forced
