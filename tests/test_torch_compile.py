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

from test_torch_backend import N_LAYERS, make_ids, skip_mask, tiny_model  # noqa: E402

from knapspec.backends import backend_class, create_backend  # noqa: E402
from knapspec.backends.torch import prepack  # noqa: E402
from knapspec.backends.torch.compile import (  # noqa: E402
    TorchCompileBackend,
    cached_graphs,
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


@pytest.fixture(scope="module")
def static(qwen3):
    """Static-shape steps on the CPU: the code the CUDA graphs capture, run without capture."""
    return TorchCompileBackend.from_hf(qwen3, DigitTokenizer(), static_steps="on")


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


@pytest.mark.parametrize("which", ["compiled", "static"])
def test_masks_and_context_growth_never_recompile(which, request):
    """Generations whose mask, draft length (1, 3, 5) and context change, plus a chunked
    prefill, prompt reuse and a one-token prompt: no graph is compiled after the warm-up,
    on the dynamic path and on the static steps (where every draft and verification step
    takes the static path: counted)."""
    be = request.getfixturevalue(which)
    before, graphs = compile_counters(), cached_graphs()
    # blocks 0, 1, 6, 7 are pinned
    masks = [skip_mask(2, 5), skip_mask(3), skip_mask(2, 4), skip_mask(2, 3, 4, 5)]
    cfg = GenerationConfig(64, replan_interval=2, stop_at_eos=False)
    for d in (1, 3, 5):
        planner = cycling_planner(be.layout, masks, draft_length=d)
        for prompt in (make_ids(90, seed=4), make_ids(1, seed=5)):
            res = SpeculativeDecoder(be, planner).generate(prompt, cfg)
            assert res.new_tokens == 64 and res.drafted > 0 and res.ar_steps > 0
            assert len(res.plan_history) >= 4  # the mask really changed
    if which == "static":
        assert {2, 4, 6} <= set(be._static.full) and 1 in be._static.full
        assert len(be._static.masked) == len(masks)
    # prompt caching: the same prompt again reuses the cache and recomputes one token
    prompt = make_ids(90, seed=4)
    be.prefill(prompt)
    assert be.length == 90
    be.reset()
    be.forward(make_ids(200, seed=6), all_logits=False)  # a long prefill from scratch
    be.forward(make_ids(50, seed=7), np.arange(2 * N_LAYERS) % 3 == 0)  # masked chunk
    assert cached_graphs() == graphs
    assert compile_counters() == before


@pytest.mark.parametrize("which", ["compiled", "static"])
def test_draft_and_verify_on_the_device_never_recompile(which, request):
    """The hot path's overrides (tokens chosen on the device, fed back as tensors) run the
    compiled blocks at shapes the warm-up covered: greedy output equals the compiled
    backend's own autoregressive output, sampling runs (and a verification with capture,
    which the static steps leave to the dynamic path), and nothing is compiled."""
    from test_torch_device import autoregressive, speculative_greedy

    from knapspec.sampling import SamplingParams

    be = request.getfixturevalue(which)
    before, graphs = compile_counters(), cached_graphs()
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
    assert cached_graphs() == graphs  # recompilations(), unaffected by other fixtures' warm-up
    assert compile_counters() == before


# ----------------------------------------------------------------------------- static steps


def test_static_steps_match_the_dynamic_path(static, compiled):
    """The static steps (positions as a tensor, attention over the whole cache under a
    position mask) give the dynamic path's logits and K/V at every context, token count
    and mask; draft masks beyond the LRU bound are evicted and rebuilt."""
    ids = make_ids(60, seed=31)
    for be in (static, compiled):
        be.reset()
        be.forward(ids[:20])  # prefill (static: T > 16 takes the dynamic path)
    assert static.describe()["static_steps"] and not compiled.describe()["static_steps"]
    assert static.describe()["cuda_graphs"] is False  # CPU: no capture
    at = 20
    for n, mask in ((1, None), (5, None), (1, skip_mask(2, 5)), (3, None), (1, skip_mask(3)),
                    (9, None), (1, None), (16, None)):
        a = static.forward(ids[at : at + n], mask)
        b = compiled.forward(ids[at : at + n], mask)
        assert np.abs(b).max() > 1.0
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        assert (a.argmax(-1) == b.argmax(-1)).all()
        at += n
    assert static.length == compiled.length == at
    torch.testing.assert_close(static.final_hidden(), compiled.final_hidden(), atol=1e-5, rtol=0)
    torch.testing.assert_close(static.k_cache[:, :, :at], compiled.k_cache[:, :, :at],
                               atol=1e-5, rtol=0)
    assert {1, 3, 5, 9, 16} <= set(static._static.full)
    steps = static._static
    bound, steps.max_masks = steps.max_masks, 1
    try:
        a = static.forward(ids[at : at + 1], skip_mask(3, 4))  # a mask no test used before
        assert steps.evictions >= 1 and list(steps.masked) == [static._skip_flags(skip_mask(3, 4))]
        np.testing.assert_allclose(a, compiled.forward(ids[at : at + 1], skip_mask(3, 4)),
                                   atol=1e-4, rtol=0)
    finally:
        steps.max_masks = bound


def test_static_speculative_equals_own_autoregressive(static):
    from test_torch_device import autoregressive, speculative_greedy

    before, graphs = compile_counters(), cached_graphs()
    prompt = make_ids(30, seed=17)
    ref = autoregressive(static, prompt, 40)
    masks = [skip_mask(2, 5), skip_mask(3), skip_mask(2, 4)]
    for d in (1, 2, 5):
        out, accepted = speculative_greedy(static, prompt, masks, d, 40)
        assert out == ref and sum(accepted) > 0
    assert cached_graphs() == graphs and compile_counters() == before
    with pytest.raises(KnapSpecError, match="static_steps"):
        TorchCompileBackend.from_hf(tiny_model("qwen3"), static_steps="graphs")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graph capture and replay need a CUDA device (the static steps "
                    "they capture are tested on the CPU above; benchmarks/device_check.py runs "
                    "them on a GPU)")
def test_cuda_graphs_replay_the_static_steps():
    """On CUDA (static steps on by default): greedy speculative decoding equals the backend's
    own AR, graphs are captured once per key and bounded, their memory is reported, and
    nothing is compiled after the warm-up."""
    from test_torch_device import autoregressive, speculative_greedy

    be = TorchCompileBackend.from_hf(tiny_model("qwen3").to("cuda"), DigitTokenizer(),
                                     compile_mode="reduce-overhead")
    d = be.describe()
    assert d["static_steps"] and d["cuda_graphs"] and d["inductor_mode"] == "default"
    before = compile_counters()
    prompt = make_ids(30, seed=19)
    ref = autoregressive(be, prompt, 40)
    masks = [skip_mask(2, 5), skip_mask(3), skip_mask(2, 4)]
    for n_draft in (1, 3, 5):
        out, _ = speculative_greedy(be, prompt, masks, n_draft, 40)
        assert out == ref
    d = be.describe()
    assert 0 < d["cuda_graphs_held"] <= d["cuda_graph_limit"]
    assert d["cuda_graphs_captured"] == d["cuda_graphs_held"]  # each key captured once
    assert d["cuda_graph_mib"] >= 0.0
    assert be.recompilations() == 0 and compile_counters() == before


# ----------------------------------------------------------------------------- prepacked


needs_onednn = pytest.mark.skipif(not prepack.available(), reason="no oneDNN in this torch")


@pytest.fixture(scope="module")
def packed():
    """The compiled backend with every linear weight prepacked for oneDNN (``on``: no
    measurement, so the packed kernels are what runs whatever this CPU's timings), over
    its own copy of the tiny model (backends over the same weights share their packing)."""
    return TorchCompileBackend.from_hf(tiny_model("qwen3"), DigitTokenizer(), prepack="on")


@needs_onednn
def test_prepacked_weights_are_what_runs(packed, monkeypatch):
    d = packed.describe()
    n_weights = 7 * N_LAYERS + 1  # q k v o gate up down per layer, then the head
    assert d["prepack"] == "on" and d["prepacked_weights"] == n_weights
    assert d["prepacked_mib"] > 0
    for w in packed._linear_weights():
        # registered: the op takes oneDNN's kernel
        assert prepack._PACKED[w.data_ptr()].step == "onednn"
    # the compiled graphs call the op, and the op the packed kernel, for every weight
    calls = []
    kernel = prepack._packed_linear
    monkeypatch.setattr(prepack, "_packed_linear", lambda *a: calls.append(1) or kernel(*a))
    eager = TorchEagerBackend.from_hf(packed.model)
    ids = make_ids(30, seed=21)
    for be in (packed, eager):
        be.reset()
    np.testing.assert_allclose(packed.forward(ids), eager.forward(ids), atol=1e-4, rtol=0)
    assert len(calls) == n_weights
    calls.clear()
    a = packed.forward(ids[:1], all_logits=False)
    assert len(calls) == n_weights
    np.testing.assert_allclose(a, eager.forward(ids[:1], all_logits=False), atol=1e-4, rtol=0)
    with pytest.raises(KnapSpecError, match="prepack"):
        TorchCompileBackend.from_hf(packed.model, prepack="always")


@needs_onednn
def test_packed_rows_agree_across_token_counts():
    """Verification runs a weight at M = k + 1 rows, a step at M = 1.  Neither MKL nor oneDNN
    is bit-identical across M in float32 (shown here for the record, not required); what
    losslessness needs is that the rows agree to rounding and pick the same argmax."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4096, 64, generator=gen)  # a head-like [V, D]
    x = torch.randn(9, 64, generator=gen)
    entry = prepack.PackedLinears()
    entry.prepack([w], "on")
    try:
        with torch.inference_mode():
            for k in (2, 5, 9):
                batch = prepack.linear(x[:k], w, None)  # [k, V]
                rows = torch.cat([prepack.linear(x[i : i + 1], w, None) for i in range(k)])
                torch.testing.assert_close(batch, rows, atol=1e-4, rtol=0)
                assert torch.equal(batch.argmax(-1), rows.argmax(-1))
    finally:
        entry.release()
    assert w.data_ptr() not in prepack._PACKED


@needs_onednn
def test_prepack_measures_and_releases():
    """``auto`` measures every distinct shape once and records both ranges; a second backend
    over the same weights shares them; the registry drops them when the last one goes."""
    import gc

    model = tiny_model("qwen3")  # weights no other backend registered
    be = TorchCompileBackend.from_hf(model, prepack="auto")
    d = be.describe()
    shapes = {f"{w.shape[0]}x{w.shape[1]} float32" for w in be._linear_weights()}
    assert set(d["prepack_decisions"]) == shapes
    for c in d["prepack_decisions"].values():
        # every kernel that applies is timed, and the range gets the fastest
        assert set(c["step_ms"]) == set(prepack.KERNELS) and min(c["step_ms"].values()) > 0
        assert c["step"] == min(c["step_ms"], key=c["step_ms"].get)
        assert set(c["prefill_ms"]) == {"dense", "onednn"}
        assert c["prefill"] == min(c["prefill_ms"], key=c["prefill_ms"].get)
    other = TorchCompileBackend.from_hf(model, prepack="on")
    keys = set(other._packed.keys) | set(be._packed.keys)
    assert len(other._packed.keys) == 7 * N_LAYERS + 1
    del be
    gc.collect()
    assert all(k in prepack._PACKED for k in other._packed.keys)
    del other
    gc.collect()
    assert not keys & set(prepack._PACKED)


@needs_onednn
def test_auto_keeps_the_kernel_policy_fastest_on_whole_steps(monkeypatch):
    """``auto`` times whole steps under each kernel policy (two thread pools cost more
    together than apart), keeps the fastest, then holds only what that policy runs."""
    timed = []
    real = TorchCompileBackend._choose_kernels

    def spy(self, repeats=2):
        timed.append(self._packed.policies())
        return real(self, repeats)

    monkeypatch.setattr(TorchCompileBackend, "_choose_kernels", spy)
    be = TorchCompileBackend.from_hf(tiny_model("qwen3", seed=8), prepack="auto")
    d = be.describe()
    options = timed[0]
    assert set(options) == {"per-shape", "torch", "numba"}
    assert set(options["numba"].values()) == {"numba"}  # float32: every weight takes it
    assert set(options["torch"].values()) <= {"dense", "onednn"}
    policy, ms = d["kernel_policy"], d["kernel_policy_ms"]
    assert policy == min(ms, key=ms.get) and set(ms) == set(options)
    held = 0
    for key, kernel in options[policy].items():
        entry = prepack._PACKED[key]
        assert entry.step == kernel
        assert (entry.dense is not None) == (kernel == "numba")  # nothing else kept
        assert (entry.packed is not None) == ("onednn" in (kernel, entry.prefill))
        held += 0 if entry.packed is None else entry.weight.numel() * 4
    assert d["prepacked_mib"] == round(held / 2**20, 1)
    # the model's own steps run the chosen kernels, and decode as eager does
    eager = TorchEagerBackend.from_hf(be.model)
    ids = make_ids(9, seed=24)
    for b in (be, eager):
        b.reset()
    np.testing.assert_allclose(be.forward(ids), eager.forward(ids), atol=1e-4, rtol=0)


@needs_onednn
def test_prepacked_speculative_equals_own_autoregressive(packed):
    from test_torch_device import autoregressive, speculative_greedy

    before, graphs = compile_counters(), cached_graphs()
    prompt = make_ids(30, seed=13)
    ref = autoregressive(packed, prompt, 40)
    masks = []
    for skip in ([2, 5], [3], [2, 4]):
        m = np.zeros(2 * N_LAYERS, dtype=bool)
        m[skip] = True
        masks.append(m)
    for d in (1, 4):
        out, accepted = speculative_greedy(packed, prompt, masks, d, 40)
        assert out == ref and sum(accepted) > 0
    assert cached_graphs() == graphs and compile_counters() == before


@pytest.fixture(scope="module")
def numba_linear():
    """The compiled backend with every float32 linear weight's decoding-sized calls (M <= 16)
    through the numba small-M kernel (``numba``: no measurement), over its own copy of the
    tiny model."""
    return TorchCompileBackend.from_hf(tiny_model("qwen3", seed=5), DigitTokenizer(),
                                       prepack="numba")


@needs_onednn
def test_numba_kernel_is_what_runs_and_matches_eager(numba_linear, monkeypatch):
    be = numba_linear
    d = be.describe()
    assert d["prepack"] == "numba" and d["prepacked_weights"] == 7 * N_LAYERS + 1
    assert all(c["step"] == "numba" for c in d["prepack_decisions"].values())
    for w in be._linear_weights():
        entry = prepack._PACKED[w.data_ptr()]
        assert entry.step == "numba" and entry.dense is not None
    calls = []
    kernel = prepack._numba_linear
    monkeypatch.setattr(prepack, "_numba_linear", lambda *a: calls.append(a[1]) or kernel(*a))
    eager = TorchEagerBackend.from_hf(be.model)
    ids = make_ids(12, seed=22)  # a prompt of 12 tokens: M = 12 <= 16, the step range
    for b in (be, eager):
        b.reset()
    np.testing.assert_allclose(be.forward(ids), eager.forward(ids), atol=1e-4, rtol=0)
    assert len(calls) == 7 * N_LAYERS + 1  # every weight went through the numba kernel
    calls.clear()
    mask = skip_mask(2, 5)
    np.testing.assert_allclose(be.forward(ids[:1], mask), eager.forward(ids[:1], mask),
                               atol=1e-4, rtol=0)
    assert len(calls) == 7 * (N_LAYERS - 1) + 1  # a skipped block runs no weight


@needs_onednn
def test_numba_verification_rows_are_the_one_step_rows(numba_linear):
    """With the numba kernel every linear is batch-invariant, so the logits of k verified
    tokens equal, bit for bit, those of the same tokens fed one at a time (the attention
    and norms are per row too)."""
    be = numba_linear
    ids = make_ids(20, seed=23)
    be.reset()
    be.prefill(ids[:10])
    batched = be.forward(ids[10:15])  # [5, V]
    be.rollback(10)
    single = np.concatenate([be.forward([t]) for t in ids[10:15]])
    np.testing.assert_allclose(batched, single, atol=2e-5, rtol=0)
    assert np.array_equal(batched.argmax(-1), single.argmax(-1))


@needs_onednn
def test_numba_speculative_equals_own_autoregressive(numba_linear):
    from test_torch_device import autoregressive, speculative_greedy

    be = numba_linear
    before, graphs = compile_counters(), cached_graphs()
    prompt = make_ids(30, seed=14)
    ref = autoregressive(be, prompt, 40)
    masks = [skip_mask(2, 5), skip_mask(3), skip_mask(2, 4)]
    for d in (1, 4):
        out, accepted = speculative_greedy(be, prompt, masks, d, 40)
        assert out == ref and sum(accepted) > 0
    assert cached_graphs() == graphs and compile_counters() == before


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module", params=["on", "numba"])
def smol_compiled(smollm2, request):
    """Every weight through oneDNN's prepacked kernel (``on``), then every decoding-sized
    call through the numba kernel (``numba``), so the slow tests check both kernels
    whatever this CPU's timings decide under ``auto``."""
    be = TorchCompileBackend(smollm2, prepack=request.param)
    yield be
    be._packed.release()  # the next kernel registers the same weights afresh


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


@pytest.mark.slow
def test_smollm2_verification_rows_pick_the_one_step_argmax(smol_compiled):
    """Teacher-forced: verifying k = 5 tokens at once (every weight at M = 5 through the
    prepacked kernels) picks at every position the token that one-token steps pick."""
    be = smol_compiled
    prompt = be.encode("Describe how a bicycle works.")
    steps = [int(np.argmax(be.prefill(prompt)))]
    while len(steps) < 41:
        steps.append(int(np.argmax(be.forward([steps[-1]], all_logits=False)[-1])))
    be.prefill(prompt)
    batched = []
    for a in range(0, 40, 5):
        batched += be.forward(steps[a : a + 5]).argmax(-1).tolist()  # rows pick steps[a+1..]
    assert batched == steps[1:41]
    assert be.recompilations() == 0
