"""The draft/verify loop on a fake numpy model: lossless greedy, exact sampling, stopping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fake_backend import FakeBackend, fake_cost_model

from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.errors import KnapSpecError
from knapspec.planner import AutoregressivePlanner, StaticPlanner
from knapspec.sampling import SamplingParams, probabilities, rejection_verify


def _static(be: FakeBackend, skipped: list[int], d: int) -> StaticPlanner:
    mask = be.layout.mask_from_blocks(skipped)
    return StaticPlanner(be.layout, fake_cost_model(), mask, alpha=0.5, draft_length=d)


@pytest.mark.parametrize("d", [1, 3, 6])
@pytest.mark.parametrize("skipped", [[2], [2, 3, 4, 5]])
def test_greedy_speculative_equals_autoregressive(d, skipped):
    be = FakeBackend(vocab=24, n_layers=4)
    prompt = [1, 5, 7, 2]
    cfg = GenerationConfig(max_new_tokens=60)
    ar = SpeculativeDecoder(be, AutoregressivePlanner(be.layout, fake_cost_model()))
    ref = ar.generate(prompt, cfg)
    spec = SpeculativeDecoder(be, _static(be, skipped, d)).generate(prompt, cfg)
    assert spec.tokens == ref.tokens
    assert spec.new_tokens == 60
    assert spec.rounds > 0 and spec.drafted > 0
    assert 0 <= spec.acceptance_rate <= 1
    # the noisy draft is sometimes rejected, so the test exercises recovery too
    assert spec.accepted < spec.drafted
    steps = spec.rounds + spec.ar_steps  # the last step may be plain when 1 token is left
    assert spec.mean_accepted_length == pytest.approx((spec.accepted + steps) / steps)
    assert spec.accepted + steps == spec.new_tokens - 1  # the first token comes from prefill


def test_greedy_lossless_with_perfect_draft_accepts_everything():
    be = FakeBackend(vocab=24, n_layers=4, noise=0.0)
    res = SpeculativeDecoder(be, _static(be, [2, 3], 4)).generate([3, 4], GenerationConfig(40))
    assert res.acceptance_rate == 1.0
    assert res.mean_accepted_length == pytest.approx(5.0, rel=0.2)


def test_kv_cache_length_matches_accepted_tokens():
    be = FakeBackend(vocab=24, n_layers=4)
    prompt = [1, 2, 3]
    res = SpeculativeDecoder(be, _static(be, [2, 4], 3)).generate(prompt, GenerationConfig(30))
    # every token except the newest is in the cache after the loop
    assert be.length == len(prompt) + res.new_tokens - 1
    assert be.cache == prompt + res.tokens[:-1]


def test_eos_and_stop_strings():
    be = FakeBackend(vocab=24, n_layers=4)
    prompt = [1, 5, 7, 2]
    ref = SpeculativeDecoder(be, AutoregressivePlanner(be.layout, fake_cost_model())).generate(
        prompt, GenerationConfig(50)
    )
    eos = ref.tokens[10]
    first = ref.tokens.index(eos)
    be_eos = FakeBackend(vocab=24, n_layers=4, eos=eos)
    res = SpeculativeDecoder(be_eos, _static(be_eos, [2], 3)).generate(prompt, GenerationConfig(50))
    assert res.tokens == ref.tokens[: first + 1]
    assert res.stop_reason == "eos"
    stop = be.decode(ref.tokens[20:22])
    res = SpeculativeDecoder(be, _static(be, [2], 3)).generate(
        prompt, GenerationConfig(50, stop=(stop,))
    )
    assert res.stop_reason == "stop"
    assert stop not in res.text
    assert be.decode(ref.tokens).startswith(res.text)


def test_streaming_callback_sees_every_token_once():
    be = FakeBackend(vocab=24, n_layers=4)
    seen: list[int] = []
    res = SpeculativeDecoder(be, _static(be, [2, 5], 4)).generate(
        [1, 2], GenerationConfig(37), on_token=seen.extend
    )
    assert seen == res.tokens
    assert res.new_tokens == 37 and res.stop_reason == "length"


def test_context_limit_stops_cleanly():
    be = FakeBackend(vocab=24, n_layers=4, max_context=40)
    res = SpeculativeDecoder(be, _static(be, [2], 4)).generate([1] * 10, GenerationConfig(500))
    assert res.stop_reason == "context"
    assert be.length <= be.max_context


def test_injected_clock_drives_statistics():
    ticks = itertools.count()
    be = FakeBackend(vocab=24, n_layers=4)
    dec = SpeculativeDecoder(be, _static(be, [2], 2), clock=lambda: float(next(ticks)))
    res = dec.generate([1, 2], GenerationConfig(20))
    assert res.prefill_seconds == 1.0
    assert res.decode_seconds > 0
    assert res.tokens_per_second == pytest.approx(res.new_tokens / res.decode_seconds)
    assert res.draft_seconds + res.verify_seconds + res.plan_seconds <= res.decode_seconds
    assert res.plan_history and res.plan_history[0]["draft_length"] == 2


@pytest.mark.parametrize(
    "prompt, cfg, match",
    [
        ([], GenerationConfig(5), "empty"),
        ([1] * 600, GenerationConfig(5), "context"),
    ],
)
def test_bad_generation_input(prompt, cfg, match):
    be = FakeBackend(vocab=24, n_layers=4)
    with pytest.raises(KnapSpecError, match=match):
        SpeculativeDecoder(be, _static(be, [2], 2)).generate(prompt, cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"replan_interval": 0}, "replan_interval"),
    ],
)
def test_bad_generation_config(kwargs, match):
    with pytest.raises(KnapSpecError, match=match):
        GenerationConfig(**kwargs)


def test_invalid_mask_is_refused():
    be = FakeBackend(vocab=24, n_layers=4)
    with pytest.raises(KnapSpecError, match="pinned"):
        _static(be, [0], 2)
    with pytest.raises(KnapSpecError, match="shape"):
        StaticPlanner(be.layout, fake_cost_model(), np.zeros(3, bool), alpha=0.5)


# ------------------------------------------------------------------ sampling is exact
def _pair_distribution(be: FakeBackend, prompt: list[int], sp: SamplingParams) -> np.ndarray:
    """Exact target distribution of the next two tokens: ``[V, V]``."""
    be.reset()
    be.forward(prompt[:-1])
    p1 = probabilities(be.forward(prompt[-1:])[-1], sp)
    joint = np.zeros((be.vocab_size, be.vocab_size))
    for a in range(be.vocab_size):
        n = be.length
        p2 = probabilities(be.forward([a])[-1], sp)
        be.rollback(n)
        joint[a] = p1[a] * p2
    return joint


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_speculative_sampling_preserves_target_distribution(top_p):
    scipy_stats = pytest.importorskip("scipy.stats")
    be = FakeBackend(vocab=6, n_layers=3, noise=1.0, sharpness=1.0, seed=3)
    sp = SamplingParams(temperature=1.0, top_p=top_p)
    prompt = [1, 2]
    joint = _pair_distribution(be, prompt, sp)
    dec = SpeculativeDecoder(be, _static(be, [2, 3], 3))
    n = 4000
    counts = np.zeros_like(joint)
    rng = np.random.default_rng(0)
    for _ in range(n):
        cfg = GenerationConfig(2, temperature=1.0, top_p=top_p, seed=int(rng.integers(2**31)))
        a, b = dec.generate(prompt, cfg).tokens
        counts[a, b] += 1
    keep = joint.ravel() > 0
    assert counts.ravel()[~keep].sum() == 0  # nothing outside the target's support
    expected = joint.ravel()[keep] * n
    # pool rare cells so the chi-square approximation holds
    rare = expected < 5
    obs, exp = counts.ravel()[keep][~rare], expected[~rare]
    if rare.any():
        obs = np.append(obs, counts.ravel()[keep][rare].sum())
        exp = np.append(exp, expected[rare].sum())
    stat, pval = scipy_stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert pval > 1e-3, (stat, pval)


def test_rejection_sampler_marginal_matches_target():
    rng = np.random.default_rng(1)
    v = 5
    p = rng.dirichlet(np.ones(v), size=2)  # [2, V] target at positions 1, 2
    q = rng.dirichlet(np.ones(v), size=1)  # [1, V] draft at position 1
    n = 40000
    first = np.zeros(v)
    for _ in range(n):
        x = rng.choice(v, p=q[0])
        k, nxt = rejection_verify(np.array([x]), q, p, rng)
        first[x if k == 1 else nxt] += 1
    # the first emitted token is distributed as p[0]
    assert np.abs(first / n - p[0]).max() < 0.015
