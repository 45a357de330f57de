"""The llama.cpp backend: draft GGUFs, KV transplants, the loop on the default GGUF.

Tests that run llama.cpp skip when ``llama-cpp-python`` is not installed (``pip install
'knapspec[llamacpp]'``); the draft-encoding tests need only numpy.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from eval_text import book_text, specbench_prompts

from knapspec.backends.llamacpp.gguf_draft import DraftLayer, draft_layers, kv_layer_map
from knapspec.costmodels import LinearCostModel
from knapspec.decoding import GenerationConfig, SpeculativeDecoder
from knapspec.errors import KnapSpecError, MissingDependencyError
from knapspec.planner import StaticPlanner
from knapspec.planner.factory import make_planner

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA, reason="needs llama-cpp-python: pip install 'knapspec[llamacpp]'"
)
# drafting pays under this model, so forced plans really draft
DRAFT_FRIENDLY = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4,
                                 head_s=2e-3, overhead_s=1e-3)


def _mask(n_layers: int, attn=(), mlp=()) -> np.ndarray:
    m = np.zeros(2 * n_layers, dtype=bool)
    m[[2 * i for i in attn]] = True
    m[[2 * i + 1 for i in mlp]] = True
    return m


# ----------------------------------------------------------------------------- encoding


def test_draft_layers_encode_every_block_combination():
    layers = draft_layers(4, _mask(4, attn=[1, 2], mlp=[2, 3]))
    assert layers == [
        DraftLayer(0, "copy", "copy"),
        DraftLayer(1, "none", "copy"),  # attention skipped: attention-free layer
        # layer 2: both skipped -> dropped
        DraftLayer(3, "copy", "zero"),  # MLP skipped: zero FFN (n_ff 0 would drop attention)
    ]
    assert kv_layer_map(layers) == [0, None, 3]


def test_draft_without_first_attention_gets_identity_linear_attention():
    layers = draft_layers(3, _mask(3, attn=[0]))
    assert layers[0] == DraftLayer(0, "linear0", "copy")
    assert kv_layer_map(layers) == [None, 1, 2]


def test_draft_without_any_attention_keeps_one_dummy_kv_layer():
    layers = draft_layers(3, _mask(3, attn=[0, 1, 2]))
    assert [la.attn for la in layers] == ["dummy", "none", "none"]
    assert kv_layer_map(layers) == ["zeros", None, None]
    everything = draft_layers(3, np.ones(6, dtype=bool))
    assert everything == [DraftLayer(None, "dummy", "zero")]


def test_neox_rows_are_interleaved_per_head():
    from knapspec.backends.llamacpp.gguf_draft import _neox_to_norm_rows

    rows = np.arange(8)[:, None] * np.ones((1, 3), dtype=np.uint8)  # 2 heads of 4 lanes
    out = _neox_to_norm_rows(rows, 4)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]  # lane 2i <- i, 2i+1 <- i + 2
    with pytest.raises(KnapSpecError, match="whole heads"):
        _neox_to_norm_rows(rows[:6], 4)


def test_missing_llama_cpp_names_the_extra(monkeypatch):
    from knapspec.backends import backend_class

    for name in list(sys.modules):
        if name.startswith("knapspec.backends.llamacpp"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingDependencyError, match=r"knapspec\[llamacpp\]"):
        backend_class("llamacpp")


def test_unknown_backend_option_is_refused():
    from knapspec.backends import create_backend

    with pytest.raises(KnapSpecError, match="'dtype' is not supported by backend 'llamacpp'"):
        create_backend("llamacpp", dtype="float32")


# ----------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def backend(llama_smollm2):
    return llama_smollm2


def _prompts(n: int) -> list[str]:
    return specbench_prompts(n)


def _book(backend, tokens: int) -> list[int]:
    body = backend.encode(book_text(8 * tokens), chat=False)[:tokens]
    assert len(body) == tokens, f"the shipped book excerpt gives {len(body)} < {tokens} tokens"
    return backend.encode("Continue this story.\n\n" + backend.decode(body))


@needs_llama
def test_unsupported_inputs_are_refused(tmp_path):
    from gguf import GGUFWriter

    from knapspec.backends.llamacpp import LlamaCppBackend

    path = tmp_path / "tiny-qwen3.gguf"
    w = GGUFWriter(path, "qwen3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(KnapSpecError, match="unsupported architecture 'qwen3'"):
        LlamaCppBackend(path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(KnapSpecError, match="needs a GGUF file"):
        LlamaCppBackend(tmp_path / "hf")
    with pytest.raises(KnapSpecError, match="threads must be a positive integer"):
        LlamaCppBackend(threads=0)


@needs_llama
def test_tokenizer_and_chat_template(backend):
    ids = backend.encode("What is 2+2?")
    text = backend.decode(ids)
    assert "What is 2+2?" in text
    assert ids[-1] != backend.encode("What is 2+2?", chat=False)[-1]  # assistant header
    assert backend.decode(backend.encode("plain text", chat=False)) == "plain text"
    assert backend.eos_token_ids  # <|im_end|> and friends


@needs_llama
def test_empty_mask_draft_is_bit_identical_to_target(backend, tmp_path):
    from knapspec.backends.llamacpp.gguf_draft import write_draft
    from knapspec.backends.llamacpp.runner import LlamaRunner

    path = tmp_path / "noskip.gguf"
    write_draft(backend.source, np.zeros(backend.layout.n_blocks, dtype=bool), path)
    ids = backend.encode("Name three rivers in Europe.")
    draft = LlamaRunner(path, 512, 2, flash_attn=False)
    target = LlamaRunner(backend.model_path, 512, 2, flash_attn=False)
    try:
        np.testing.assert_array_equal(draft.eval(ids, len(ids)), target.eval(ids, len(ids)))
    finally:
        draft.close()
        target.close()


@needs_llama
@pytest.mark.parametrize("skip", [
    {"attn": [29], "mlp": [29]},  # last layer dropped
    {"attn": [29], "mlp": [28]},  # an attention-free layer after a zero-FFN layer
    {"attn": list(range(30))},  # no attention at all: the dummy KV layer
])
def test_kv_transplant_equals_the_drafts_own_prefill(backend, skip):
    """Where the draft's kept attention layers see the target's exact inputs, its own KV
    equals the target's, so a draft seeded by transplant must match one that prefilled."""
    from knapspec.backends.llamacpp.runner import LlamaRunner

    mask = _mask(30, **skip)
    ids = backend.encode("Describe a lighthouse at night in two sentences.")
    backend.reset()
    backend.prefill(ids)
    nxt = ids[-1]
    transplanted = backend.forward([nxt], mask)  # seeds the draft from the target's KV
    fresh = LlamaRunner(backend._files.path(mask), 512, 2, flash_attn=backend.flash_attn)
    try:
        fresh.eval(ids, 0)  # same batch shapes as the target's prefill, then one token
        own = fresh.eval([nxt], 1)
    finally:
        fresh.close()
    np.testing.assert_array_equal(transplanted, own)


@needs_llama
def test_rollback_then_forward_is_identical(backend):
    ids = backend.encode("Count from one to five.")
    backend.reset()
    backend.prefill(ids)
    p = backend.length
    first = backend.forward([100, 200, 300], None)
    mask = _mask(30, attn=[5, 9], mlp=[12])
    backend.forward([7], mask)
    backend.rollback(p)
    np.testing.assert_array_equal(backend.forward([100, 200, 300], None), first)
    assert backend.cached_tokens()[-3:] == [100, 200, 300]


@needs_llama
def test_ar_strategy_matches_llama_cpp_python_greedy(backend):
    """Our autoregressive path is llama.cpp's own greedy decoding of the same file."""
    from llama_cpp import Llama

    ids = backend.encode(_prompts(1)[0])
    ours = SpeculativeDecoder(backend, make_planner("ar", backend.layout, DRAFT_FRIENDLY))
    res = ours.generate(ids, GenerationConfig(48, stop_at_eos=False))
    llm = Llama(str(backend.model_path), n_ctx=1024, n_threads=2, flash_attn=backend.flash_attn,
                verbose=False)
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(int(tok))
        if len(theirs) == 48:
            break
    del llm
    assert res.tokens == theirs


def _teacher_forced_agreement(backend, prompt, tokens):
    """Fraction of ``tokens`` that 1-token greedy decoding picks given the same prefix,
    and the top-2 logit gaps where it does not."""
    backend.reset()
    logits = backend.prefill(prompt)
    agree, gaps = 0, []
    for tok in tokens:
        top = np.argsort(logits)[-2:]
        if int(top[-1]) == tok:
            agree += 1
        else:
            gaps.append(float(logits[top[-1]] - logits[tok]))
        logits = backend.forward([tok], None, all_logits=False)[-1]
    return agree / len(tokens), gaps


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("case", ["short-0", "short-1", "short-2", "long"])
def test_greedy_speculative_decoding_is_lossless(backend, case):
    """Token-identical to 1-token greedy decoding, except where llama.cpp's batched
    verification rounds differently on a near-tie.

    llama.cpp's attention is not batch-invariant (``test_attention_is_the_only_batch_
    dependent_op``), so a verified token can differ from what 1-token decoding would pick
    when its top-2 logits are nearly tied.  Then every disagreement must be such a tie
    (gap < 0.5) and teacher-forced agreement stays >= 95% per prompt (the aggregate over
    prompts is reported in docs/benchmarks.md)."""
    if case == "long":
        prompt = _book(backend, 1500)
    else:
        prompt = backend.encode(_prompts(3)[int(case[-1])])
    mask = _mask(30, attn=[6, 10, 14, 18, 22], mlp=[24])
    cfg = GenerationConfig(128, stop_at_eos=False)
    ar = SpeculativeDecoder(backend, make_planner("ar", backend.layout, DRAFT_FRIENDLY))
    spec = SpeculativeDecoder(
        backend, StaticPlanner(backend.layout, DRAFT_FRIENDLY, mask, 0.8, draft_length=4))
    a = ar.generate(prompt, cfg)
    s = spec.generate(prompt, cfg)
    assert s.drafted > 64 and s.accepted > 0
    if s.tokens != a.tokens:
        agreement, gaps = _teacher_forced_agreement(backend, prompt, s.tokens)
        assert agreement >= 0.95, (agreement, gaps)
        assert max(gaps) < 0.5, gaps


@needs_llama
def test_attention_is_the_only_batch_dependent_op(backend):
    """The cause of llama.cpp's batched-vs-single-token differences: matmuls, norms and
    the head are batch-invariant (a draft without attention gives bit-identical logits),
    attention is not (a draft that keeps every attention block differs)."""
    from knapspec.backends.llamacpp.runner import LlamaRunner

    rng = np.random.default_rng(0)
    ctx, new = rng.integers(0, 49152, 300).tolist(), rng.integers(0, 49152, 5).tolist()
    diffs = {}
    for name, mask in (("no_attention", np.arange(60) % 2 == 0),
                       ("no_mlp", np.arange(60) % 2 == 1)):
        r = LlamaRunner(backend._files.get(mask), 512, 2, flash_attn=backend.flash_attn)
        try:
            r.eval(ctx, 0)
            batched = r.eval(new, len(new))
            r.rollback(len(ctx))
            single = np.concatenate([r.eval([t], 1) for t in new])
        finally:
            r.close()
        diffs[name] = float(np.abs(batched - single).max())
    assert diffs["no_attention"] == 0.0
    assert diffs["no_mlp"] > 0.0


@needs_llama
def test_sampling_is_reproducible_with_a_seed(backend):
    ids = backend.encode("Tell me a fact about owls.")
    mask = _mask(30, attn=[6, 10, 14])
    dec = SpeculativeDecoder(
        backend, StaticPlanner(backend.layout, DRAFT_FRIENDLY, mask, 0.8, draft_length=3))
    cfg = GenerationConfig(24, temperature=0.8, top_p=0.95, seed=7)
    assert dec.generate(ids, cfg).tokens == dec.generate(ids, cfg).tokens


@needs_llama
def test_switch_cost_prices_a_new_draft_above_a_pooled_one(backend):
    ids = backend.encode("Say hello.")
    backend.reset()
    backend.prefill(ids)
    pooled = _mask(30, attn=[6, 10, 14])
    backend.forward([ids[-1]], pooled)
    backend.rollback(len(ids))
    assert backend.switch_seconds(pooled) == 0.0  # it already holds the whole history
    backend.forward([ids[-1]], None)  # one verified token the draft lacks
    fresh = _mask(30, attn=[3, 7, 11, 15, 19, 23])
    assert backend.switch_seconds(np.zeros(60, dtype=bool)) == 0.0
    assert 0.0 < backend.switch_seconds(pooled) < backend.switch_seconds(fresh)


@needs_llama
def test_draft_files_are_content_addressed_and_bounded(backend, tmp_path):
    from knapspec.backends.llamacpp.gguf_draft import DraftFiles

    files = DraftFiles(backend.source, tmp_path, max_bytes=150 << 20)  # room for ~1.5 drafts
    a, b = _mask(30, attn=[4]), _mask(30, attn=[8])
    pa = files.get(a)
    assert files.get(a) == pa and len(files.write_seconds) == 1  # reused, not rewritten
    pb = files.get(b)
    assert pb.is_file() and not pa.exists()  # the older one was evicted
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


@needs_llama
def test_profile_measures_blocks_and_the_kv_copy(backend):
    from knapspec.backends.llamacpp.profile import profile_llamacpp

    model = profile_llamacpp(backend, contexts=[64, 512], token_counts=(1, 2, 4), repeats=2,
                             progress=False)
    assert model.meta["backend"] == "llamacpp"
    assert len(model.meta["draft_kv_copy_s"]) == 3
    assert all(s > 0 for s in model.meta["draft_kv_copy_s"])
    # a full step costs more than a draft without attention, and grows with tokens
    assert model.full_step_seconds(30, 512, 1) > 0
    assert model.full_step_seconds(30, 512, 4) > model.full_step_seconds(30, 512, 1)


@needs_llama
def test_cli_generate_on_llamacpp(tmp_path):
    from knapspec.costmodels.io import save_cost_model

    cm = tmp_path / "cm.json"
    save_cost_model(DRAFT_FRIENDLY, cm)
    out = subprocess.run(
        [sys.executable, "-m", "knapspec", "generate", "--backend", "llamacpp",
         "--cost-model", str(cm), "--strategy", "additive", "--max-new-tokens", "16",
         "--json", "What is the capital of Italy?"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["new_tokens"] == len(res["tokens"]) > 0
    assert res["decode_seconds"] > 0
