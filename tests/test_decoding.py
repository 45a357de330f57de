"""The draft/verify loop on a fake numpy model: lossless greedy, exact sampling, stopping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fake_backend import FakeBackend, fake_cost_model
from law import assert_follows

from knapspec.backends import base
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.errors import KnapSpecError
from knapspec.planner import AutoregressivePlanner, Planner, StaticPlanner
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
        ({"stop": ("",)}, "non-empty strings"),
        ({"stop": "END"}, "list of non-empty strings"),
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
def _sequence_distribution(
    be: FakeBackend, prompt: list[int], sp: SamplingParams, length: int
) -> np.ndarray:
    """Exact target distribution of the next ``length`` tokens: ``[V] * length``."""
    be.reset()
    be.forward(prompt[:-1])

    def after(token: int, depth: int) -> np.ndarray:
        p = probabilities(be.forward([token])[-1], sp)  # [V]
        out = p if depth == 1 else np.stack([p[a] * after(a, depth - 1)
                                             for a in range(be.vocab_size)])
        be.rollback(be.length - 1)
        return out

    return after(prompt[-1], length)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_speculative_sampling_preserves_target_distribution(top_p, monkeypatch):
    """The first three tokens: one from prefill, then a round drafting d = 2 under a noisy
    mask, whose rejections resample from the residual (and a second round when the first
    draft is rejected)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    be = FakeBackend(vocab=5, n_layers=3, noise=1.0, sharpness=1.0, seed=3)
    sp = SamplingParams(temperature=1.0, top_p=top_p)
    prompt = [1, 2]
    joint = _sequence_distribution(be, prompt, sp, 3)  # [V, V, V]
    rounds: list[tuple[int, int]] = []  # (drafted, accepted) per verified round

    def spy(drafts, q, p, rng):
        n, nxt = rejection_verify(drafts, q, p, rng)
        rounds.append((len(drafts), n))
        return n, nxt

    monkeypatch.setattr(base, "rejection_verify", spy)  # the default Backend.verify's
    dec = SpeculativeDecoder(be, _static(be, [2, 3], 3))
    n = 5000
    counts = np.zeros_like(joint)
    rng = np.random.default_rng(0)
    drafted = 0
    for _ in range(n):
        # 4 tokens: the prefill's, then a budget of 3 leaves room for d = 2 drafts
        cfg = GenerationConfig(4, temperature=1.0, top_p=top_p, seed=int(rng.integers(2**31)))
        res = dec.generate(prompt, cfg)
        counts[tuple(res.tokens[:3])] += 1
        drafted += res.drafted
    assert drafted > 0
    assert sum(d for d, _ in rounds) == drafted
    assert sum(1 for d, _ in rounds if d == 2) == n  # every generation drafts 2 at first
    rejected = [k for d, k in rounds if k < d]  # each one resampled from the residual
    assert len(rejected) > n // 10, len(rejected)
    assert sum(1 for d, k in rounds if k == d == 2) > n // 10  # and the bonus token is used
    assert_follows(scipy_stats, counts, joint)


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


# ------------------------------------------------------------------ loop edge cases
def _ar(be: FakeBackend) -> AutoregressivePlanner:
    return AutoregressivePlanner(be.layout, fake_cost_model())


def test_drafting_goes_past_eos_when_eos_does_not_stop():
    """With perfect drafts every round yields d + 1 tokens, unless drafting stops early."""
    be = FakeBackend(vocab=24, n_layers=4, noise=0.0)
    prompt = [1, 5, 7, 2]
    d, rounds = 4, 8
    n = 1 + rounds * (d + 1)  # the prefill's token, then full rounds
    ref = SpeculativeDecoder(be, _ar(be)).generate(prompt, GenerationConfig(n))
    eos = ref.tokens[1]  # the first drafted token
    be_eos = FakeBackend(vocab=24, n_layers=4, noise=0.0, eos=eos)
    res = SpeculativeDecoder(be_eos, _static(be_eos, [2, 3], d)).generate(
        prompt, GenerationConfig(n, stop_at_eos=False)
    )
    assert res.tokens == ref.tokens
    assert res.rounds == rounds and res.drafted == rounds * d
    # with stop_at_eos the generation still ends at the first end-of-sequence token
    res = SpeculativeDecoder(be_eos, _static(be_eos, [2, 3], d)).generate(
        prompt, GenerationConfig(n)
    )
    assert res.tokens == ref.tokens[: ref.tokens.index(eos) + 1] and res.stop_reason == "eos"


class CountingBackend(FakeBackend):
    """Counts the tokens passed to ``decode``."""

    decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return super().decode(ids)


def test_stop_strings_decode_only_new_tokens():
    be = CountingBackend(vocab=24, n_layers=4)
    n = 400
    res = SpeculativeDecoder(be, _ar(be)).generate([1, 2], GenerationConfig(n, stop=("zz",)))
    assert res.stop_reason == "length" and res.new_tokens == n  # fake text has no "z"
    # decoding the whole text every step would pass n^2 / 2 = 80,000 tokens to decode
    assert be.decoded <= 20 * n, be.decoded


@pytest.mark.parametrize("d", [1, 3])
def test_stop_string_drops_the_tokens_after_it(d):
    be = FakeBackend(vocab=24, n_layers=4)
    prompt = [1, 5, 7, 2]
    ref = SpeculativeDecoder(be, _ar(be)).generate(prompt, GenerationConfig(50))
    full = be.decode(ref.tokens)
    stop = full[20:23]
    k = full.find(stop)
    seen: list[int] = []
    res = SpeculativeDecoder(be, _static(be, [2], d)).generate(
        prompt, GenerationConfig(50, stop=(stop,)), on_token=seen.extend
    )
    assert res.stop_reason == "stop" and res.text == full[:k]
    # one character per fake token: the tokens covering the text before the stop, no more
    assert res.tokens == ref.tokens[:k]
    assert seen == res.tokens  # nothing past the stop was streamed


def test_streaming_callback_time_is_not_generation_time():
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    def slow_callback(tokens: list[int]) -> None:
        now[0] += 1000.0

    be = FakeBackend(vocab=24, n_layers=4)
    res = SpeculativeDecoder(be, _static(be, [2], 2), clock=clock).generate(
        [1, 2], GenerationConfig(20), on_token=slow_callback
    )
    assert res.new_tokens == 20
    assert 0 < res.decode_seconds < 1000
    assert res.draft_seconds + res.verify_seconds + res.plan_seconds <= res.decode_seconds


def test_plain_sampling_steps_compute_no_target_distributions(monkeypatch):
    shapes: list[tuple[int, ...]] = []
    real = base.probabilities

    def spy(logits, sp):
        shapes.append(np.shape(logits))
        return real(logits, sp)

    monkeypatch.setattr(base, "probabilities", spy)  # the default draft and verify's
    be = FakeBackend(vocab=24, n_layers=4)
    cfg = GenerationConfig(12, temperature=1.0, seed=0)
    res = SpeculativeDecoder(be, _ar(be)).generate([1, 2], cfg)
    assert res.ar_steps == 11 and shapes == []
    res = SpeculativeDecoder(be, _static(be, [2], 3)).generate([1, 2], cfg)
    assert res.drafted > 0
    assert (4, 24) in shapes  # drafting still verifies against the target distributions


# ------------------------------------------------------------------ why decoding was plain
@pytest.mark.parametrize(
    "planner, cfg, reason",
    [
        ("ar", GenerationConfig(10), "plain decoding: the strategy is ar"),
        ("unpaid", GenerationConfig(8),
         "plain decoding: no draft pays at context 4 on the linear cost model"),
        ("forced", GenerationConfig(2), "plain decoding: the token budget left no room to draft"),
        ("forced", GenerationConfig(1), "plain decoding: the token budget left no room to draft"),
        ("forced", GenerationConfig(10), None),
    ],
)
def test_plain_decoding_says_why(planner, cfg, reason):
    be = FakeBackend(vocab=24, n_layers=4)
    make = {
        "ar": lambda: _ar(be),
        "forced": lambda: _static(be, [2], 3),
        # acceptance 0: no draft can pay, so the planner decodes plainly
        "unpaid": lambda: StaticPlanner(be.layout, fake_cost_model(),
                                        be.layout.mask_from_blocks([2]), alpha=0.0),
    }
    res = SpeculativeDecoder(be, make[planner]()).generate([1, 5, 7, 2], cfg)
    assert res.plain_reason == reason
    assert res.to_dict()["plain_reason"] == reason
    assert (res.drafted == 0) == (reason is not None)


# ------------------------------------------------------------------ oracle capture
class OracleBackend(FakeBackend):
    """A fake backend with a block oracle over a capture window that behaves as the torch
    backend's: a capturing forward keeps its last ``capture_tokens`` positions, appended to
    the window when contiguous with it (else replacing it); rollback drops positions."""

    capture_tokens = 4

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.captures: list[tuple[int, int, bool]] = []  # (position, tokens, capture) per full
        self.window: list[int] = []  # captured positions

    def reset(self) -> None:
        super().reset()
        self.window = []

    def rollback(self, length: int) -> None:
        super().rollback(length)
        self.window = [p for p in self.window if p < length]

    def forward(self, tokens, mask=None, *, capture=False, all_logits=True):
        first = self.length
        if mask is None or not np.asarray(mask).any():
            self.captures.append((first, len(tokens), capture))
        out = super().forward(tokens, mask, capture=capture, all_logits=all_logits)
        if capture:
            end = first + len(tokens)
            new = list(range(max(first, end - self.capture_tokens), end))
            if self.window and self.window[-1] + 1 == new[0]:
                new = self.window + new
            self.window = new[-self.capture_tokens :]
        return out

    def block_oracle(self):
        if not self.window:
            raise KnapSpecError("nothing captured")
        return tuple(self.window)  # the positions the planner's oracle reads


def _last(context: int, n: int = 4) -> tuple[int, ...]:
    """The window an oracle should read at ``context``: the last ``n`` cached positions."""
    return tuple(range(context - n, context))


class GatedPlanner(Planner):
    """Plans as ``inner`` (plain decoding by default), with a model-in-the-loop gate: wants
    the oracle where ``wants`` says; records the oracle of every plan."""

    needs_oracle = True

    def __init__(self, be: FakeBackend, wants, inner: Planner | None = None) -> None:
        self.inner = inner or _ar(be)
        self.name = self.inner.name
        self.wants = wants
        self.oracles: list[object] = []
        self.contexts: list[int] = []

    def wants_oracle(self, context: int) -> bool:
        return self.wants(context)

    def plan(self, ctx):
        self.oracles.append(ctx.oracle)
        self.contexts.append(ctx.context)
        return self.inner.plan(ctx)


def test_no_capture_when_the_planner_never_wants_the_oracle():
    be = OracleBackend(vocab=24, n_layers=4)
    planner = GatedPlanner(be, lambda context: False)
    res = SpeculativeDecoder(be, planner).generate([1, 2, 3], GenerationConfig(40))
    assert res.new_tokens == 40 and res.plain_reason is not None
    assert len(be.captures) == 40 and not any(c for _, _, c in be.captures)
    assert planner.oracles == [None] * 5


def test_capture_only_in_the_rounds_the_oracle_reads():
    be = OracleBackend(vocab=24, n_layers=4)
    planner = GatedPlanner(be, lambda context: True)
    prompt = [1, 2, 3]
    cfg = GenerationConfig(40, replan_interval=10)
    res = SpeculativeDecoder(be, planner).generate(prompt, cfg)
    ref = SpeculativeDecoder(be, _ar(be)).generate(prompt, GenerationConfig(40))
    assert res.tokens == ref.tokens
    # the prefill, then the last capture_tokens = 4 of every 10 plain steps before a plan
    flags = [c for _, _, c in be.captures[:40]]
    assert flags[0] and len(be.captures) == 40 + 40  # no recomputation (40 for the reference)
    steps = flags[1:]
    assert steps == ([False] * 6 + [True] * 4) * 3 + [False] * 6 + [True] * 3
    # each plan got the oracle over the newest cached tokens
    assert planner.oracles == [_last(3, 3), _last(13), _last(23), _last(33)]


def test_a_planner_that_changes_its_mind_gets_the_same_window():
    be = OracleBackend(vocab=24, n_layers=4)
    planner = GatedPlanner(be, lambda context: context >= 20)  # turns at context 20
    prompt = [1, 2, 3]
    res = SpeculativeDecoder(be, planner).generate(prompt, GenerationConfig(40, replan_interval=10))
    ref = SpeculativeDecoder(be, _ar(be)).generate(prompt, GenerationConfig(40))
    assert res.tokens == ref.tokens
    # the window before the plan at context 23 opened at context 19 (no oracle wanted):
    # its 4 tokens are run again with capture, once, just before that plan
    again = [(pos, n) for pos, n, c in be.captures if n > 1 and pos > 0]
    assert again == [(19, 4)]
    assert planner.oracles == [None, None, _last(23), _last(33)]


@pytest.mark.parametrize("d", [2, 6])
def test_every_plan_gets_a_window_ending_at_the_newest_token(d):
    """Drafting rounds verify d + 1 tokens and keep fewer.  The window keeps its last
    capture_tokens positions before the rollback, so rejections shorten it (as they always
    did), and with d + 1 > capture_tokens an early rejection empties it: then the plan gets
    the window recomputed, not an error."""
    be = OracleBackend(vocab=24, n_layers=4)
    planner = GatedPlanner(be, lambda context: True, _static(be, [2, 3], d))
    prompt = [1, 2, 3]
    res = SpeculativeDecoder(be, planner).generate(prompt, GenerationConfig(150, replan_interval=5))
    assert res.drafted > 0 and res.accepted < res.drafted
    for context, window in zip(planner.contexts, planner.oracles, strict=True):
        assert window is not None and window[-1] == context - 1
        assert window == tuple(range(window[0], context)) and len(window) <= 4
    again = [(pos, n) for pos, n, c in be.captures if c and n == 4]  # recomputed windows
    assert (len(again) > 0) == (d + 1 > be.capture_tokens)
    ref = SpeculativeDecoder(be, _ar(be)).generate(prompt, GenerationConfig(150))
    assert res.tokens == ref.tokens
