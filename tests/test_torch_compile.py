"""Tests of the ``torch-compile`` backend: parity with the eager backend, no recompilation
across skip masks and context lengths, lossless speculative decoding, reported warm-up.

The tiny random models come from ``test_torch_backend``; the ``slow`` tests use SmolLM2.
Recompilations are read from torch's own counters (``torch._dynamo.utils.counters``
through ``compile_counters``).  Compiled graphs are shared per process, so only the first
backend of a session pays the compilation (SmolLM2: about 1.5 minutes with a cold inductor
cache on 2 cores, about 30 s with a warm one).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_torch_backend import N_LAYERS, make_ids, tiny_model  # noqa: E402

from knapspec.backends import backend_class, create_backend  # noqa: E402
from knapspec.backends.torch.compile import (  # noqa: E402
    TorchCompileBackend,
    compile_counters,
)
from knapspec.backends.torch.eager import TorchEagerBackend  # noqa: E402
from knapspec.costmodels import LinearCostModel  # noqa: E402
from knapspec.decoding import GenerationConfig, SpeculativeDecoder  # noqa: E402
from knapspec.errors import KnapSpecError  # noqa: E402
from knapspec.planner import StaticPlanner, default_block_scores  # noqa: E402
from knapspec.planner.planners import AutoregressivePlanner, PlanContext, Planner  # noqa: E402

# drafting pays under this model, so forced plans are what they say
DRAFT_FRIENDLY = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4,
                                 head_s=2e-3, overhead_s=1e-3)


class CyclingPlanner(Planner):
    """Returns the plans of ``planners`` in turn, one per ``plan`` call: the skip mask and
    the draft length change every ``replan_interval`` rounds."""

    name = "cycling"

    def __init__(self, planners: list[Planner]) -> None:
        self.planners = planners
        self.calls = 0

    def plan(self, ctx: PlanContext):
        plan = self.planners[self.calls % len(self.planners)].plan(ctx)
        self.calls += 1
        return plan

    def reset(self) -> None:
        self.calls = 0


def cycling_planner(layout, masks: list[np.ndarray], draft_length: int = 3) -> CyclingPlanner:
    """Forced drafts under each mask in turn, with a plain autoregressive plan between."""
    inner: list[Planner] = [AutoregressivePlanner(layout, DRAFT_FRIENDLY)]
    for m in masks:
        inner.append(StaticPlanner(layout, DRAFT_FRIENDLY, m, alpha=0.5,
                                   draft_length=draft_length))
    return CyclingPlanner(inner)


def _ar(backend, prompt, n):
    planner = AutoregressivePlanner(backend.layout, DRAFT_FRIENDLY)
    return SpeculativeDecoder(backend, planner).generate(prompt, GenerationConfig(n))


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3")


class DigitTokenizer:
    """Just enough of a tokenizer for the decoding loop's stop checks: ids as text."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def compiled(qwen3):
    return TorchCompileBackend.from_hf(qwen3, DigitTokenizer())


def test_registry_and_metadata(compiled):
    assert backend_class("torch-compile") is TorchCompileBackend
    d = compiled.describe()
    assert d["backend"] == "torch-compile" and compiled.name == "torch-compile"
    assert d["compile_mode"] == "default"
    assert d["warmup_seconds"] == compiled.warmup_seconds > 0.0
    assert d["fx_graph_cache"] in (True, False) and "inductor_cache_dir" in d
    assert d["dtype"] == "float32" and d["model"]
    # cost-model profiles are cached per backend name: this one must not share eager's
    assert TorchEagerBackend.from_hf(tiny_model("qwen3")).describe()["backend"] == "torch"


def test_unknown_compile_mode_is_refused(qwen3):
    with pytest.raises(KnapSpecError, match="compile_mode"):
        TorchCompileBackend.from_hf(qwen3, compile_mode="fastest")
    with pytest.raises(KnapSpecError, match="not supported"):
        create_backend("torch-compile", model=None, draft_pool=2)


@pytest.mark.parametrize("skip", [[], [2, 5], [0, 2, 4, 6], [1, 3, 5, 7], [1, 2, 4, 7]])
def test_logits_match_eager(compiled, qwen3, skip):
    eager = TorchEagerBackend.from_hf(qwen3)
    mask = np.zeros(2 * N_LAYERS, dtype=bool)
    mask[skip] = True
    mask = mask if skip else None
    ids = make_ids(40, seed=len(skip))
    for be in (compiled, eager):
        be.reset()
    a, b = compiled.forward(ids[:25], mask), eager.forward(ids[:25], mask)
    assert np.abs(b).max() > 1.0  # a meaningful comparison
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for t in ids[25:]:  # token by token, last logits only
        a = compiled.forward([t], mask, all_logits=False)
        b = eager.forward([t], mask, all_logits=False)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.final_hidden(), eager.final_hidden(), atol=1e-5, rtol=0)
    n = compiled.length
    kept = [i for i in range(N_LAYERS) if mask is None or not mask[2 * i]]  # K/V written
    torch.testing.assert_close(compiled.k_cache[kept, :, :n], eager.k_cache[kept, :, :n],
                               atol=1e-5, rtol=0)


def test_counters_see_a_compilation():
    """Control for the no-recompilation tests: the counters they read do move."""
    before = compile_counters()["unique_graphs"]
    fn = torch.compile(lambda x: x * 2 + 1)
    fn(torch.ones(3))
    assert compile_counters()["unique_graphs"] == before + 1


def test_masks_and_context_growth_never_recompile(compiled):
    """A generation whose mask, draft length and context change, plus a chunked prefill,
    prompt reuse and a one-token prompt: no graph is compiled after the warm-up."""
    be = compiled
    before = compile_counters()
    masks = []
    for skip in ([2, 5], [3], [2, 4], [2, 3, 4, 5]):  # blocks 0, 1, 6, 7 are pinned
        m = np.zeros(2 * N_LAYERS, dtype=bool)
        m[skip] = True
        masks.append(m)
    cfg = GenerationConfig(64, replan_interval=2, stop_at_eos=False)
    planner = cycling_planner(be.layout, masks)
    for prompt in (make_ids(90, seed=4), make_ids(1, seed=5)):
        res = SpeculativeDecoder(be, planner).generate(prompt, cfg)
        assert res.new_tokens == 64 and res.drafted > 0 and res.ar_steps > 0
        assert len(res.plan_history) >= 4  # the mask really changed
    # prompt caching: the same prompt again reuses the cache and recomputes one token
    prompt = make_ids(90, seed=4)
    be.prefill(prompt)
    assert be.length == 90
    be.reset()
    be.forward(make_ids(200, seed=6), all_logits=False)  # a long prefill from scratch
    be.forward(make_ids(50, seed=7), np.arange(2 * N_LAYERS) % 3 == 0)  # masked chunk
    assert be.recompilations() == 0
    assert compile_counters() == before


def test_draft_and_verify_on_the_device_never_recompile(compiled):
    """The hot path's overrides (tokens chosen on the device, fed back as tensors) run the
    compiled blocks at shapes the warm-up covered: greedy output equals the compiled
    backend's own autoregressive output, sampling runs, and nothing is compiled."""
    from test_torch_device import autoregressive, speculative_greedy

    from knapspec.sampling import SamplingParams

    be = compiled
    before = compile_counters()
    prompt = make_ids(30, seed=11)
    ref = autoregressive(be, prompt, 40)
    masks = []
    for skip in ([2, 5], [3], [2, 4]):
        m = np.zeros(2 * N_LAYERS, dtype=bool)
        m[skip] = True
        masks.append(m)
    out, accepted = speculative_greedy(be, prompt, masks, 3, 40)
    assert out == ref and sum(accepted) > 0
    sp, rng = SamplingParams(1.0, 0.9), np.random.default_rng(0)
    p0 = be.length
    drafts, q = be.draft(ref[-1], masks[0], 4, sp, rng, frozenset())
    be.rollback(p0)
    n, _ = be.verify(ref[-1], drafts, q, sp, rng, capture=True)
    assert 0 <= n <= 4 and be.block_oracle().n_tokens >= 5
    assert be.recompilations() == 0
    assert compile_counters() == before


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_compiled(smollm2):
    return TorchCompileBackend(smollm2)


@pytest.mark.slow
def test_smollm2_logits_match_eager(smol_compiled, smollm2):
    """Stated tolerance: |compiled - eager| <= 2e-3 on logits of magnitude ~20 (measured
    max 6e-4 on this CPU; inductor fuses the norms and RoPE, so sums are reassociated)."""
    be, eager = smol_compiled, TorchEagerBackend(smollm2)
    prompt = be.encode("Write a short poem about the sea.")
    assert prompt == eager.encode("Write a short poem about the sea.")
    be.reset()
    a, b = be.forward(prompt), eager.forward(prompt)
    assert np.abs(b).max() > 10.0
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95
    scores = np.where(be.layout.skippable, default_block_scores(30), np.inf)
    mask = be.layout.mask_from_blocks(np.argsort(scores)[:18])
    for t in b[-4:].argmax(-1).tolist():  # drafting steps under a mask
        np.testing.assert_allclose(be.forward([t], mask), eager.forward([t], mask),
                                   atol=2e-3, rtol=0)
    assert be.recompilations() == 0


@pytest.mark.slow
@pytest.mark.parametrize("question", [
    "Explain why the sky is blue to a ten-year-old.",
    "List three uses of a knapsack algorithm in computer systems and explain each briefly.",
])
def test_smollm2_speculative_equals_autoregressive(smol_compiled, question):
    be = smol_compiled
    before = compile_counters()
    prompt = be.encode(question)
    ref = _ar(be, prompt, 64)
    scores = np.where(be.layout.skippable, default_block_scores(30), np.inf)
    order = np.argsort(scores)
    masks = [be.layout.mask_from_blocks(order[:k]) for k in (18, 8)]
    planner = cycling_planner(be.layout, masks, draft_length=4)
    res = SpeculativeDecoder(be, planner).generate(prompt, GenerationConfig(64, replan_interval=3))
    assert res.tokens == ref.tokens
    assert res.new_tokens >= 64 or res.stop_reason == "eos"
    assert res.drafted > 0 and 0 < res.accepted < res.drafted
    assert compile_counters() == before
