"""The confidence stop in every backend's ``draft``: a round ends after the first draft whose
top-1 probability is below ``stop_confidence``, and decoding stays exact.

On each backend: the ids drafted with a stop are a prefix of those drafted without one; every
returned draft but the last is sure (its recomputed confidence >= the threshold), and when
fewer than ``n`` come back the last one is unsure; ``stop_confidence=0`` changes nothing.
Greedy speculative decoding with a forced plan and a stop equals plain decoding token for
token, with early stops seen; sampling with a stop keeps the target distribution
(chi-square against the exact law, as ``test_decoding`` does).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
from eval_text import specbench_prompts
from fake_backend import FakeBackend, fake_cost_model
from law import assert_follows
from test_decoding import _sequence_distribution

from knapspec.costmodels import LinearCostModel
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.planner import AutoregressivePlanner, PlanContext, Planner, StaticPlanner
from knapspec.planner.knobs import ConfidenceTable, make_knobs
from knapspec.planner.plan import DraftPlan
from knapspec.sampling import SamplingParams, probabilities, top1_probability

GREEDY = SamplingParams()
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
# drafting pays under this model, so forced plans really draft
DRAFT_FRIENDLY = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4,
                                 head_s=2e-3, overhead_s=1e-3)


class StopPlanner(Planner):
    """``inner``'s plans with the confidence stop ``tau`` (autoregressive plans unchanged)."""

    name = "stop"

    def __init__(self, inner: Planner, tau: float) -> None:
        self.inner = inner
        self.tau = tau

    def plan(self, ctx: PlanContext) -> DraftPlan:
        plan = self.inner.plan(ctx)
        return plan if plan.is_autoregressive else replace(plan, stop_confidence=self.tau)


def _spy_drafts(monkeypatch, be) -> list[tuple[int, int, float]]:
    """Record ``(n asked, ids returned, stop_confidence)`` of every ``be.draft`` call."""
    calls: list[tuple[int, int, float]] = []
    real = be.draft

    def draft(last, mask, n, sampling, rng, stop_ids, **knobs):
        ids, q = real(last, mask, n, sampling, rng, stop_ids, **knobs)
        calls.append((n, len(ids), knobs.get("stop_confidence", 0.0)))
        return ids, q

    monkeypatch.setattr(be, "draft", draft)
    return calls


def _recomputed_confidence(be, p0, last, ids, mask, sp) -> list[float]:
    """Top-1 probability of each draft step, one masked ``forward`` per step from ``p0``
    (greedy: softmax at temperature 1; sampling: of the processed distribution), checking
    the drafted ids against the greedy argmax when greedy."""
    be.rollback(p0)
    conf, tok = [], last
    for t in ids:
        logits = np.asarray(be.forward([tok], mask, all_logits=False)[-1], dtype=np.float64)
        if sp.greedy:
            assert int(np.argmax(logits)) == t
            conf.append(top1_probability(logits))
        else:
            conf.append(float(probabilities(logits, sp).max()))
        tok = t
    be.rollback(p0)
    return conf


def _check_stops(be, p0, last, mask, n, tau, sp, seed=0) -> int:
    """Draft ``n`` from ``last`` at cache length ``p0`` with and without the stop ``tau``
    and check the stop (module doc); returns the ids drafted with the stop."""
    be.rollback(p0)
    full, _ = be.draft(last, mask, n, sp, np.random.default_rng(seed), frozenset())
    be.rollback(p0)
    zero, _ = be.draft(last, mask, n, sp, np.random.default_rng(seed), frozenset(),
                       stop_confidence=0.0)
    be.rollback(p0)
    ids, q = be.draft(last, mask, n, sp, np.random.default_rng(seed), frozenset(),
                      stop_confidence=tau)
    assert zero == full and len(full) == n  # no stop: all n, the same ids
    assert 1 <= len(ids) <= n and ids == full[: len(ids)]
    if q is not None:
        assert len(q) == len(ids)
    conf = _recomputed_confidence(be, p0, last, ids, mask, sp)
    assert all(c >= tau - 1e-5 for c in conf[:-1]), (conf, tau)
    if len(ids) < n:
        assert conf[-1] < tau + 1e-5, (conf, tau)  # stopped after the unsure draft
    return len(ids)


# ------------------------------------------------------------------ base Backend (numpy)
@pytest.mark.parametrize("sp", [GREEDY, SamplingParams(1.0, 0.9)])
def test_base_draft_stops_after_the_first_unsure_draft(sp):
    be = FakeBackend(vocab=24, n_layers=4)
    mask = be.layout.mask_from_blocks([2, 3])
    prompt = np.random.default_rng(0).integers(0, 24, 40).tolist()
    lengths = []
    for p in range(8, 40, 2):
        be.reset()
        be.forward(prompt[:p])
        lengths.append(_check_stops(be, p, prompt[p], mask, 6, 0.55, sp, seed=p))
    assert min(lengths) < max(lengths) and 1 < np.median(lengths) < 6, lengths
    assert any(1 < k < 6 for k in lengths), lengths  # stops after sure drafts


def test_greedy_with_a_stop_equals_autoregressive_on_the_base_backend(monkeypatch):
    be = FakeBackend(vocab=24, n_layers=4)
    prompt = [1, 5, 7, 2]
    cfg = GenerationConfig(80, stop_at_eos=False)
    ref = SpeculativeDecoder(be, AutoregressivePlanner(be.layout, fake_cost_model())).generate(
        prompt, cfg)
    calls = _spy_drafts(monkeypatch, be)
    static = StaticPlanner(be.layout, fake_cost_model(), be.layout.mask_from_blocks([2, 3]),
                           0.5, draft_length=5)
    res = SpeculativeDecoder(be, StopPlanner(static, 0.55)).generate(prompt, cfg)
    assert res.tokens == ref.tokens
    assert res.drafted > 0 and res.accepted < res.drafted
    assert all(tau == 0.55 for _, _, tau in calls)
    assert sum(k < n for n, k, _ in calls) >= 3  # early stops happened
    assert res.drafted == sum(k for _, k, _ in calls)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_with_a_stop_keeps_the_target_distribution(top_p, monkeypatch):
    """The first three tokens (the prefill's, then a round of up to d = 2 drafts that stops
    after an unsure first draft) follow the target's exact joint law."""
    scipy_stats = pytest.importorskip("scipy.stats")
    be = FakeBackend(vocab=5, n_layers=3, noise=1.0, sharpness=1.0, seed=3)
    sp = SamplingParams(temperature=1.0, top_p=top_p)
    prompt = [1, 2]
    joint = _sequence_distribution(be, prompt, sp, 3)  # [V, V, V]
    calls = _spy_drafts(monkeypatch, be)
    static = StaticPlanner(be.layout, fake_cost_model(), be.layout.mask_from_blocks([2, 3]),
                           0.5, draft_length=2)
    dec = SpeculativeDecoder(be, StopPlanner(static, 0.45))
    counts = _sample_counts(dec, prompt, top_p, 5000, joint.shape)
    _assert_law(scipy_stats, counts, joint, calls)


def _sample_counts(dec, prompt, top_p, n, shape, seed=0) -> np.ndarray:
    counts = np.zeros(shape)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        cfg = GenerationConfig(4, temperature=1.0, top_p=top_p, seed=int(rng.integers(2**31)),
                               stop_at_eos=False)
        res = dec.generate(prompt, cfg)
        counts[tuple(res.tokens[:3])] += 1
    return counts


def _assert_law(scipy_stats, counts, joint, calls) -> None:
    """Chi-square of the counts of ``[V, V, V]`` sequences against the exact ``joint``, and
    the stop both cut first rounds (1 of 2 drafted) and let others run to 2."""
    n = counts.sum()
    first = [k for asked, k, _ in calls if asked == 2]  # the first round of each generation
    assert sum(k == 1 for k in first) > n // 10 and sum(k == 2 for k in first) > n // 10
    assert_follows(scipy_stats, counts, joint)


# ------------------------------------------------------------------ torch eager
@pytest.fixture(scope="module")
def tiny_torch():
    """The eager torch backend over a tiny random Qwen3 of 5 token ids (logits O(1), so
    drafts are unsure about half the time), one thread, no tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_torch_backend import TINY, _randomize

    from knapspec.backends.torch.eager import TorchEagerBackend

    torch.manual_seed(0)
    model = _randomize(transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**{**TINY, "vocab_size": 5})), 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.4)
    be = TorchEagerBackend.from_hf(model, threads=1)
    be.decode = lambda ids: ""  # the decoder decodes for stop strings; there are none
    return be


@pytest.mark.parametrize("sp", [GREEDY, SamplingParams(1.0, 0.9)])
def test_torch_draft_stops_after_the_first_unsure_draft(tiny_torch, sp):
    be = tiny_torch
    mask = be.layout.mask_from_blocks([2, 3, 4])
    prompt = np.random.default_rng(1).integers(0, 5, 40).tolist()
    lengths = []
    for p in range(8, 40, 2):
        be.reset()
        be.forward(prompt[:p])
        k = _check_stops(be, p, prompt[p], mask, 6, 0.45, sp, seed=p)
        lengths.append(k)
    assert any(1 < k < 6 for k in lengths) and any(k == 1 for k in lengths), lengths


@pytest.mark.slow
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_torch_sampling_with_a_stop_keeps_the_target_distribution(tiny_torch, top_p,
                                                                  monkeypatch):
    """As the base-backend test, through the torch backend's own draft (a stop after an
    unsure draft, distributions on the device) and verify."""
    scipy_stats = pytest.importorskip("scipy.stats")
    be = tiny_torch
    sp = SamplingParams(temperature=1.0, top_p=top_p)
    prompt = [1, 2]
    joint = _sequence_distribution(be, prompt, sp, 3)  # [V, V, V]
    calls = _spy_drafts(monkeypatch, be)
    static = StaticPlanner(be.layout, fake_cost_model(), be.layout.mask_from_blocks([2, 3, 4]),
                           0.5, draft_length=2)
    dec = SpeculativeDecoder(be, StopPlanner(static, 0.45))
    counts = _sample_counts(dec, prompt, top_p, 3000, joint.shape)
    _assert_law(scipy_stats, counts, joint, calls)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    """SmolLM2 on the eager torch backend, a Spec-Bench prompt and its 64 greedy tokens."""
    from knapspec.backends.torch.eager import TorchEagerBackend

    be = TorchEagerBackend(smollm2)
    prompt = be.encode(specbench_prompts(1)[0])
    cfg = GenerationConfig(64, stop_at_eos=False)
    ar = SpeculativeDecoder(be, AutoregressivePlanner(be.layout, DRAFT_FRIENDLY))
    return be, prompt, ar.generate(prompt, cfg).tokens


# the 6 least harmful skippable blocks of the shipped fidelity profile
SMOLLM2_MASK_BLOCKS = [12, 14, 34, 44, 50, 52]


@pytest.mark.slow
def test_smollm2_draft_stops_after_the_first_unsure_draft(smollm2_reference):
    be, prompt, tokens = smollm2_reference
    ids = prompt + tokens
    mask = be.layout.mask_from_blocks(SMOLLM2_MASK_BLOCKS)
    be.reset()
    lengths = []
    for p in range(len(prompt), len(ids) - 8, 6):
        be.forward(ids[be.length : p], None)  # the full model's cache up to p
        lengths.append(_check_stops(be, p, ids[p], mask, 8, 0.99, GREEDY))
        # after a stop the cache holds just the steps run
        be.rollback(p)
        out, _ = be.draft(ids[p], mask, 8, GREEDY, np.random.default_rng(0), frozenset(),
                          stop_confidence=0.99)
        assert be.length == p + len(out)
        be.rollback(p)
    assert any(k < 8 for k in lengths) and any(k > 1 for k in lengths), lengths


@pytest.mark.slow
@pytest.mark.parametrize("how", ["replace", "knobs"])
def test_smollm2_greedy_with_a_stop_equals_autoregressive(smollm2_reference, how,
                                                          monkeypatch):
    """A forced plan (6 drafts a round) with a stop at 0.5, set on the plan directly or
    chosen through the planner's knobs: the same tokens as plain greedy decoding."""
    be, prompt, ref = smollm2_reference
    mask = be.layout.mask_from_blocks(SMOLLM2_MASK_BLOCKS)
    static = StaticPlanner(be.layout, DRAFT_FRIENDLY, mask, 0.8, draft_length=6)
    if how == "replace":
        planner: Planner = StopPlanner(static, 0.5)
    else:
        static.knobs = make_knobs(confidence=ConfidenceTable.default(), stop_confidence=0.5)
        planner = static
    calls = _spy_drafts(monkeypatch, be)
    res = SpeculativeDecoder(be, planner).generate(prompt, GenerationConfig(64,
                                                                            stop_at_eos=False))
    assert res.tokens == ref
    assert res.drafted > 0 and res.accepted > 0
    assert all(tau == 0.5 for _, _, tau in calls)
    assert any(k < n for n, k, _ in calls)  # at least one round stopped early


# ------------------------------------------------------------------ llama.cpp
@pytest.fixture(scope="module")
def llama_backend(llama_smollm2):
    return llama_smollm2


def _llama_mask(n_layers: int = 30) -> np.ndarray:
    m = np.zeros(2 * n_layers, dtype=bool)
    m[[2 * i for i in (6, 10, 14, 18, 22)]] = True
    return m


@pytest.mark.slow
def test_llamacpp_draft_stops_after_the_first_unsure_draft(llama_backend, monkeypatch):
    """llama.cpp drafts on its own KV after the first step, which a ``forward`` cannot
    replay: the confidences are read where the draft computes them."""
    import knapspec.sampling as sampling_module

    be = llama_backend
    seen: list[float] = []

    def spy(logits):
        seen.append(top1_probability(logits))
        return seen[-1]

    monkeypatch.setattr(sampling_module, "top1_probability", spy)  # draft_token reads it
    prompt = be.encode(specbench_prompts(1)[0])
    mask = _llama_mask()
    tau = 0.5
    lengths = []
    last = int(np.argmax(be.prefill(prompt)))
    p0 = be.length
    for _ in range(12):  # walk along the full model's greedy text
        full, _ = be.draft(last, mask, 6, GREEDY, np.random.default_rng(0), frozenset())
        be.rollback(p0)
        seen.clear()
        ids, _ = be.draft(last, mask, 6, GREEDY, np.random.default_rng(0), frozenset(),
                          stop_confidence=tau)
        be.rollback(p0)
        assert len(full) == 6 and 1 <= len(ids) <= 6 and ids == full[: len(ids)]
        assert len(seen) == len(ids)  # one confidence per drafted token
        assert all(c >= tau for c in seen[:-1])
        if len(ids) < 6:
            assert seen[-1] < tau
        lengths.append(len(ids))
        nxt = int(np.argmax(be.forward([last], None, all_logits=False)[-1]))
        p0, last = be.length, nxt
    assert any(k < 6 for k in lengths) and any(k > 1 for k in lengths), lengths


@pytest.mark.slow
def test_llamacpp_greedy_with_a_stop_equals_autoregressive(llama_backend, monkeypatch):
    """Token-identical to 1-token greedy decoding except at llama.cpp's batched near-ties
    (``test_llamacpp.test_greedy_speculative_decoding_is_lossless``)."""
    from test_llamacpp import _teacher_forced_agreement

    be = llama_backend
    prompt = be.encode(specbench_prompts(2)[1])
    cfg = GenerationConfig(96, stop_at_eos=False)
    ar = SpeculativeDecoder(be, AutoregressivePlanner(be.layout, DRAFT_FRIENDLY)).generate(
        prompt, cfg)
    calls = _spy_drafts(monkeypatch, be)
    static = StaticPlanner(be.layout, DRAFT_FRIENDLY, _llama_mask(), 0.8, draft_length=6)
    res = SpeculativeDecoder(be, StopPlanner(static, 0.5)).generate(prompt, cfg)
    assert res.drafted > 0 and any(k < n for n, k, _ in calls)
    if res.tokens != ar.tokens:
        agreement, gaps = _teacher_forced_agreement(be, prompt, res.tokens)
        assert agreement >= 0.95, (agreement, gaps)
        assert max(gaps) < 0.5, gaps
