"""Simulated acceptance: its law, its parser, and the loop and bench running under it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_backend import FakeBackend, fake_cost_model
from law import assert_follows

from knapspec.benchmarking import Prompt, benchmark, markdown_table, summarize, sweep
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.errors import KnapSpecError
from knapspec.planner import AutoregressivePlanner, StaticPlanner
from knapspec.planner.objective import expected_tokens
from knapspec.sampling import SamplingParams
from knapspec.simulate import (
    GOLDEN,
    AcceptanceSimulator,
    accepted_count,
    parse_simulate_acceptance,
)


def _static(be: FakeBackend, d: int, alpha: float = 0.5) -> StaticPlanner:
    mask = be.layout.mask_from_blocks([2, 3, 5])  # a noisy draft: often wrong
    return StaticPlanner(be.layout, fake_cost_model(), mask, alpha=alpha, draft_length=d)


class SpyBackend(FakeBackend):
    """Records the ``accept`` and the number of drafts of every ``verify`` call with drafts."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.accepts: list[int | None] = []
        self.drafted: list[int] = []

    def verify(self, last, drafts, q, sampling, rng, *, capture=False, accept=None):
        if drafts:
            self.accepts.append(accept)
            self.drafted.append(len(drafts))
        return super().verify(last, drafts, q, sampling, rng, capture=capture, accept=accept)


# ------------------------------------------------------------------ the law
def _law(alpha: float, d: int) -> np.ndarray:
    """P(n = k), k = 0..d: the truncated geometric law of one round's accepted drafts."""
    return np.array([alpha**k * (1 - alpha) for k in range(d)] + [alpha**d])


@pytest.mark.parametrize("draws", ["iid", "qmc"])
@pytest.mark.parametrize("alpha, d", [(0.6, 4), (0.3, 2), (0.9, 6)])
def test_accepted_counts_follow_the_truncated_geometric_law(alpha, d, draws):
    """The rounds of one generation: their counts have the law (qmc: far closer than a
    chi-square needs; the per-round law over seeds is checked below)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    sim = AcceptanceSimulator(str(alpha), alpha, draws=draws)
    state = sim.start()
    n = 20000
    counts = np.bincount([sim.draw(0.0, d, state) for _ in range(n)], minlength=d + 1)
    assert state.rounds == n
    assert len(counts) == d + 1  # never more than drafted
    exact = _law(alpha, d)
    assert exact.sum() == pytest.approx(1.0)
    stat, pval = scipy_stats.chisquare(counts, exact * n)
    assert pval > 1e-3, (counts, exact * n, stat, pval)
    # the mean is the cost model's expected tokens per round minus one
    mean = counts @ np.arange(d + 1) / n
    assert mean == pytest.approx(expected_tokens(alpha, d) - 1, rel=0.03)


@pytest.mark.parametrize("draws", ["iid", "qmc"])
@pytest.mark.parametrize("alpha, want", [(1.0, 5), (0.0, 0)])
def test_certain_acceptance_and_rejection(alpha, want, draws):
    sim = AcceptanceSimulator(str(alpha), alpha, draws=draws)
    state = sim.start()
    assert {sim.draw(0.5, 5, state) for _ in range(200)} == {want}
    assert state.rounds == 200
    assert sim.draw(0.5, 0, state) == 0 and sim.draw(0.5, -1, state) == 0
    assert state.rounds == 200  # a round with nothing drafted draws nothing
    # the edges of the inverse CDF itself, over the whole of [0, 1)
    for u in (0.0, 1e-300, 0.5, np.nextafter(1.0, 0.0)):
        assert accepted_count(u, alpha, 5) == want
        assert accepted_count(u, alpha, 0) == 0


@pytest.mark.parametrize("alpha, d", [(0.7, 4), (0.25, 3), (0.95, 8), (0.5, 1)])
def test_the_inverse_cdf_gives_the_law_exactly(alpha, d):
    """Over an even grid of u in [0, 1) the fraction with ``n >= k`` is ``alpha^k`` to within
    one grid step: the mapping from one uniform to a count has exactly the law."""
    m = 100_000
    counts = np.array([accepted_count(i / m, alpha, d) for i in range(m)])
    assert counts.min() >= 0 and counts.max() <= d
    assert np.all(np.diff(counts) <= 0)  # non-increasing in u
    for k in range(d + 1):
        assert np.mean(counts >= k) == pytest.approx(alpha**k, abs=1.5 / m)


@pytest.mark.parametrize("round_index", [0, 7, 33])
def test_each_qmc_round_has_the_law_over_seeds(round_index):
    """u_0 is drawn per generation from the seed, so over seeds the count at any fixed round
    is exactly truncated geometric (pooled chi-square); the rounds are correlated, not the
    law of any one of them."""
    scipy_stats = pytest.importorskip("scipy.stats")
    alpha, d, seeds = 0.7, 4, 4000
    counts = np.zeros(d + 1)
    for seed in range(seeds):
        sim = AcceptanceSimulator("0.7", alpha, seed=seed)
        state = sim.start()
        for _ in range(round_index):
            sim.draw(0.0, d, state)
        counts[sim.draw(0.0, d, state)] += 1
    assert_follows(scipy_stats, counts, _law(alpha, d))
    with pytest.raises(AssertionError):  # the check can fail: a shifted law is refused
        assert_follows(scipy_stats, counts, _law(0.62, d))


def test_qmc_means_are_close_for_every_seed_and_iid_ones_are_not():
    """N = 40 rounds at alpha 0.7, d 4 (the size of one sweep point): the mean accepted
    count is within 0.16 of its expectation 1.7731 for each of 200 seeds with the qmc draws
    (the worst u_0 gives 0.148), while independent draws (SD of the mean ~0.25) miss that
    bound for a good part of the seeds."""
    alpha, d, rounds, bound = 0.7, 4, 40, 0.16
    want = expected_tokens(alpha, d) - 1
    assert want == pytest.approx(1.7731)
    errors = {}
    for draws in ("qmc", "iid"):
        errs = []
        for seed in range(200):
            sim = AcceptanceSimulator("0.7", alpha, seed=seed, draws=draws)
            state = sim.start()
            errs.append(abs(np.mean([sim.draw(0.0, d, state) for _ in range(rounds)]) - want))
        errors[draws] = np.array(errs)
    assert errors["qmc"].max() < bound
    assert np.mean(errors["qmc"]) < 0.06
    assert np.mean(errors["iid"] >= bound) > 0.3, np.mean(errors["iid"] >= bound)
    assert np.mean(errors["iid"]) > 3 * np.mean(errors["qmc"])


def test_qmc_rounds_are_the_rotated_golden_ratio_sequence():
    sim = AcceptanceSimulator("0.6", 0.6, seed=5)
    state = sim.start()
    u0 = np.random.default_rng(5).random()
    assert state.start == u0 and state.rounds == 0
    got = [sim.draw(0.0, 3, state) for _ in range(50)]
    assert got == [accepted_count((u0 + r * GOLDEN) % 1.0, 0.6, 3) for r in range(50)]
    assert GOLDEN == pytest.approx(0.6180339887498949)
    assert sim.start().start == u0  # every generation starts over from the seed
    assert AcceptanceSimulator("0.6", 0.6, seed=6).start().start != u0


def test_iid_draws_are_the_earlier_per_draft_ones():
    """``iid``: each draft accepted by its own uniform from the seeded generator, in order."""
    sim = AcceptanceSimulator("0.6", 0.6, seed=9, draws="iid")
    state = sim.start()
    rng = np.random.default_rng(9)
    for _ in range(300):
        want = 0
        while want < 4 and rng.random() < 0.6:
            want += 1
        assert sim.draw(0.0, 4, state) == want


def test_alpha_from_the_prediction_is_scaled_and_clipped():
    assert AcceptanceSimulator("predicted").alpha_for(0.42) == 0.42
    assert AcceptanceSimulator("0.5xpredicted", scale=0.5).alpha_for(0.8) == pytest.approx(0.4)
    assert AcceptanceSimulator("2xpredicted", scale=2.0).alpha_for(0.8) == 1.0
    assert AcceptanceSimulator("0.3", alpha=0.3).alpha_for(0.9) == 0.3


# ------------------------------------------------------------------ the parser
@pytest.mark.parametrize(
    "text, alpha, scale",
    [("predicted", None, 1.0), (" Predicted ", None, 1.0), ("0.7", 0.7, 1.0), ("1", 1.0, 1.0),
     ("0", 0.0, 1.0), ("0.9xpredicted", None, 0.9), ("1.2xpredicted", None, 1.2),
     ("0xpredicted", None, 0.0)],
)
def test_parse_simulate_acceptance(text, alpha, scale):
    sim = parse_simulate_acceptance(text, seed=3)
    assert (sim.alpha, sim.scale, sim.seed, sim.draws) == (alpha, scale, 3, "qmc")
    assert sim.spec == text.strip().lower() + ",qmc"  # the draw kind is always recorded
    for kind in ("qmc", "iid"):
        sim = parse_simulate_acceptance(f"{text}, {kind.upper()}", seed=3)
        assert (sim.alpha, sim.scale, sim.seed, sim.draws) == (alpha, scale, 3, kind)
        assert sim.spec == f"{text.strip().lower()},{kind}"


@pytest.mark.parametrize(
    "text, match",
    [("", "expected 'predicted'"), ("often", "expected 'predicted'"),
     ("xpredicted", "expected 'predicted'"), ("0.9xpredictedx", "expected 'predicted'"),
     ("0.9*predicted", "expected 'predicted'"), ("1.5", r"must lie in \[0, 1\]"),
     ("-0.1", r"must lie in \[0, 1\]"), ("nan", r"must lie in \[0, 1\]"),
     ("inf", r"must lie in \[0, 1\]"), ("-1xpredicted", "finite and >= 0"),
     ("infxpredicted", "finite and >= 0"), ("nanxpredicted", "finite and >= 0"),
     ("0.7,sobol", "'qmc' or 'iid'"), ("predicted,", "'qmc' or 'iid'"),
     ("predicted,iid,qmc", "'qmc' or 'iid'"), (",iid", "expected 'predicted'"),
     ("1.5,iid", r"must lie in \[0, 1\]")],
)
def test_parse_simulate_acceptance_errors(text, match):
    with pytest.raises(KnapSpecError, match=match) as e:
        parse_simulate_acceptance(text)
    assert "\n" not in str(e.value)


def test_simulator_refuses_bad_values():
    with pytest.raises(KnapSpecError, match=r"\[0, 1\]"):
        AcceptanceSimulator("x", alpha=1.5)
    with pytest.raises(KnapSpecError, match="scale"):
        AcceptanceSimulator("x", scale=-1.0)
    with pytest.raises(KnapSpecError, match="'qmc' or 'iid'"):
        AcceptanceSimulator("x", draws="sobol")


# ------------------------------------------------------------------ the loop under it
def test_the_default_verify_accepts_as_told():
    be = FakeBackend(vocab=24, n_layers=4)
    be.forward([1, 2, 3])
    drafts = [4, 5, 6]
    ref = be.forward([7, *drafts])  # [4, V] the target rows
    rng = np.random.default_rng(0)
    for accept, n in ((0, 0), (2, 2), (3, 3), (9, 3)):
        be.rollback(3)
        got = be.verify(7, drafts, None, SamplingParams(), rng, accept=accept)
        assert got == (n, int(np.argmax(ref[n])))
        assert be.length == 3 + len(drafts) + 1  # the caller rolls back
    be.rollback(3)
    # sampling: the next token is a sample from the target's row at that position
    sp = SamplingParams(temperature=5.0)  # flat rows: several tokens come up
    seen = set()
    for _ in range(200):
        be.rollback(3)
        n, nxt = be.verify(7, drafts, None, sp, rng, accept=1)
        assert n == 1
        seen.add(nxt)
    assert len(seen) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_alpha_one_accepts_everything_drafted_and_zero_nothing(temperature):
    be = FakeBackend(vocab=24, n_layers=4)
    prompt = [1, 5, 7, 2]
    cfg = GenerationConfig(41, temperature=temperature, seed=5)
    real = SpeculativeDecoder(be, _static(be, 4)).generate(prompt, cfg)
    assert 0 < real.accepted < real.drafted  # the draft is noisy: real verification rejects
    assert not real.timing_only and real.timing_only_reason is None
    assert real.simulated_acceptance is None

    sim = parse_simulate_acceptance("1.0")
    res = SpeculativeDecoder(be, _static(be, 4), simulator=sim).generate(prompt, cfg)
    assert res.drafted > 0 and res.accepted == res.drafted
    assert res.rounds == 8 and res.mean_accepted_length == 5.0  # 1 + 8 rounds of 4 + 1
    assert be.cache == prompt + res.tokens[:-1]  # the kept drafts are cached, in order
    assert res.timing_only and "simulated acceptance (1.0,qmc)" in res.timing_only_reason
    d = res.to_dict()
    assert d["timing_only"] is True and d["simulated_acceptance"] == "1.0,qmc"

    sim = parse_simulate_acceptance("0")
    res = SpeculativeDecoder(be, _static(be, 4), simulator=sim).generate(prompt, cfg)
    # one token a round; the last step has no room to draft
    assert res.drafted > 0 and res.accepted == 0 and (res.rounds, res.ar_steps) == (39, 1)
    if temperature == 0.0:  # every round rejects at once: the target's own greedy tokens
        ar = SpeculativeDecoder(be, AutoregressivePlanner(be.layout, fake_cost_model()))
        assert res.tokens == ar.generate(prompt, cfg).tokens


@pytest.mark.parametrize("spec, plan_alpha, all_or_none", [
    ("predicted", 1.0, "all"), ("predicted", 0.0, "none"), ("0xpredicted", 1.0, "none"),
    ("3xpredicted", 0.4, "all"),  # 1.2 clipped to 1
])
def test_the_plans_prediction_drives_the_draws(spec, plan_alpha, all_or_none):
    be = SpyBackend(vocab=24, n_layers=4)
    sim = parse_simulate_acceptance(spec)
    res = SpeculativeDecoder(be, _static(be, 3, plan_alpha), simulator=sim).generate(
        [1, 2, 3], GenerationConfig(30))
    assert res.drafted > 0 and res.timing_only
    assert res.accepted == (res.drafted if all_or_none == "all" else 0)
    assert all(a is not None for a in be.accepts)


def test_without_a_simulator_verify_decides():
    be = SpyBackend(vocab=24, n_layers=4)
    res = SpeculativeDecoder(be, _static(be, 3)).generate([1, 2, 3], GenerationConfig(30))
    assert res.rounds > 0 and be.accepts == [None] * res.rounds


@pytest.mark.parametrize("draws", ["qmc", "iid"])
def test_a_seeded_simulated_run_is_reproducible(draws):
    be = SpyBackend(vocab=24, n_layers=4)
    cfg = GenerationConfig(60, temperature=0.8, seed=11)

    def run(seed: int) -> tuple[list[int], list[int | None], int]:
        be.accepts = []
        sim = parse_simulate_acceptance(f"0.6,{draws}", seed=seed)
        res = SpeculativeDecoder(be, _static(be, 4), simulator=sim).generate([1, 2, 3], cfg)
        return res.tokens, be.accepts, res.accepted

    first = run(7)
    assert run(7) == first
    assert 0 < first[2] and len(set(first[1])) > 2  # the draws vary from round to round
    assert run(8)[1] != first[1]  # and follow the simulator's seed


def test_the_loop_draws_one_qmc_uniform_per_round_in_order():
    """One generation's rounds take u_0, u_1, ... in order (the state lives for the whole
    generation, not a round), and the next generation starts over."""
    be = SpyBackend(vocab=24, n_layers=4)
    sim = parse_simulate_acceptance("predicted", seed=4)
    dec = SpeculativeDecoder(be, _static(be, 4, alpha=0.7), simulator=sim)
    res = dec.generate([1, 2, 3], GenerationConfig(120))
    assert res.rounds == len(be.accepts) > 20
    u0 = np.random.default_rng(4).random()
    assert be.accepts == [accepted_count((u0 + r * GOLDEN) % 1.0, 0.7, n)
                          for r, n in enumerate(be.drafted)]
    assert res.accepted == sum(be.accepts)
    first = list(be.accepts)
    be.accepts, be.drafted = [], []
    dec.generate([1, 2, 3], GenerationConfig(120))
    assert be.accepts == first


def test_a_backend_that_says_its_outputs_are_timing_only_flags_results():
    class Random(FakeBackend):
        timing_only_reason = "random weights"

    be = Random(vocab=24, n_layers=4)
    res = SpeculativeDecoder(be, _static(be, 2)).generate([1, 2], GenerationConfig(8))
    assert res.timing_only and res.timing_only_reason == "random weights"
    assert res.simulated_acceptance is None
    sim = parse_simulate_acceptance("predicted")
    res = SpeculativeDecoder(be, _static(be, 2), simulator=sim).generate([1, 2],
                                                                         GenerationConfig(8))
    assert res.timing_only_reason.startswith(
        "random weights; simulated acceptance (predicted,qmc)")


# ------------------------------------------------------------------ bench and sweep
def test_benchmark_rows_under_simulated_acceptance():
    be = FakeBackend(vocab=24, n_layers=4)
    sim = parse_simulate_acceptance("1.0")

    def planners(strategy: str):
        return (AutoregressivePlanner(be.layout, fake_cost_model()) if strategy == "ar"
                else _static(be, 3))

    rows = benchmark(be, fake_cost_model(), [Prompt("p0", 16, [1, 2, 3, 4])], ["ar", "fixed"],
                     [], 21, 2, planner_factory=planners, simulator=sim)
    assert [r["strategy"] for r in rows] == ["ar", "fixed"]
    for r in rows:
        assert r["timing_only"] is True and r["simulated_acceptance"] == "1.0,qmc"
        assert "simulated acceptance (1.0,qmc)" in r["timing_only_reason"]
        assert r["identical_to_ar"] is None  # simulated tokens claim nothing
    fixed = rows[1]
    assert fixed["acceptance_rate"] == 1.0 and fixed["mean_accepted_length"] == 4.0
    summary = summarize(rows)
    assert all(s["timing_only"] for s in summary)
    assert "timing-only" in markdown_table(summary)


def test_sweep_under_simulated_acceptance_predicts_at_the_simulated_alpha():
    be = FakeBackend(vocab=24, n_layers=4)
    ids = list(range(1, 20))
    prompt = Prompt("p", 19, ids)
    real = sweep(be, fake_cost_model(), prompt, 12, skip_counts=(1, 3), draft_lengths=(1, 3))
    points = sweep(be, fake_cost_model(), prompt, 12, skip_counts=(1, 3), draft_lengths=(1, 3),
                   simulator=parse_simulate_acceptance("1.0"))
    assert len(points) == len(real) == 5
    for p, q in zip(points, real, strict=True):
        assert p["timing_only"] and p["simulated_acceptance"] == "1.0,qmc"
        assert p["predicted_alpha"] == q["predicted_alpha"]  # what the model predicted
        if p["draft_length"]:
            assert p["simulated_alpha"] == 1.0 and p["measured_alpha"] == 1.0
            if q["predicted_alpha"] < 1.0:  # predicted at the simulated acceptance
                assert p["predicted_tps"] > q["predicted_tps"]
    assert not any(q["timing_only"] for q in real)


def test_bench_cli_with_simulated_acceptance(monkeypatch, tmp_path, capsys):
    import knapspec.benchmarking as bench_mod
    import knapspec.runtime as runtime
    from knapspec.cli import main

    monkeypatch.setattr(runtime, "build_backend", lambda config: FakeBackend(vocab=24,
                                                                             n_layers=4))
    monkeypatch.setattr(runtime, "config_cost_model", lambda c, b, **kw:
                        fake_cost_model())
    monkeypatch.setattr(bench_mod, "make_prompts", lambda be, ctx, n, data=None:
                        [Prompt("p", c, list(range(1, 20))) for c in ctx])
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    args = ["bench", "--strategies", "ar,knapspec", "--context-tokens", "16", "--repeats", "1",
            "--max-new-tokens", "10", "--simulate-acceptance", "0.9xpredicted"]
    assert main([*args, "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["simulated_acceptance"] == "0.9xpredicted,qmc"
    assert result["timing_only"] is True
    assert all(r["timing_only"] and r["simulated_acceptance"] == "0.9xpredicted,qmc"
               for r in result["rows"])
    assert "timing-only" in capsys.readouterr().out and "timing-only" in md.read_text()
    # the forced-plan sweep takes it too
    assert main(["bench", "--sweep", "--context-tokens", "19", "--max-new-tokens", "6",
                 "--simulate-acceptance", "0.5,iid", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(p["timing_only"] for p in result["points"])
    assert {p["simulated_acceptance"] for p in result["points"]} == {"0.5,iid"}
    assert {p["simulated_alpha"] for p in result["points"] if p["draft_length"]} == {0.5}
    assert "timing-only" in capsys.readouterr().out


def test_bench_cli_refuses_a_bad_simulated_acceptance_before_loading(monkeypatch, capsys):
    import knapspec.runtime as runtime
    from knapspec.cli import main

    monkeypatch.setattr(runtime, "build_backend", lambda c: pytest.fail("built a backend"))
    assert main(["bench", "--simulate-acceptance", "1.5", "--strategies", "ar"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knapspec: error: --simulate-acceptance '1.5'")
    assert err.count("\n") == 1
