"""Tests of the eager torch backend against Hugging Face's own forward.

Tiny randomly initialised models (4 layers, hidden 64, 4 heads / 2 KV heads, head dim 16,
vocab 128) of each supported architecture; weights are re-drawn with a larger scale than
HF's init so that logits are O(10) and attention is far from uniform (a weak test would
otherwise pass on near-zero activations).  The ``slow`` test loads the real SmolLM2.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from knapspec.backends.torch.eager import TorchEagerBackend  # noqa: E402
from knapspec.errors import KnapSpecError  # noqa: E402

VOCAB = 128
N_LAYERS = 4
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter: matrices N(0, 0.3^2), norms 1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(0.3 * noise)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def tiny_model(arch: str = "qwen3", seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of architecture ``arch``."""
    t = transformers
    cls = {
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM),
        "llama": (t.LlamaConfig, t.LlamaForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
        "mistral": (t.MistralConfig, t.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    return _randomize(cls[1](cls[0](**TINY)), seed)


def reference_logits(model, ids: list[int], mask: np.ndarray | None = None) -> np.ndarray:
    """HF modules layer by layer over the whole sequence, skipped sub-blocks left out.

    Block 2i = input_layernorm + self_attn + residual, block 2i+1 =
    post_attention_layernorm + mlp + residual.  Returns float32 logits [T, V].
    """
    body = model.model
    with torch.no_grad():
        x = body.embed_tokens(torch.tensor([ids]))  # [1, T, D]
        t = len(ids)
        cos, sin = body.rotary_emb(x, torch.arange(t)[None])
        causal = torch.full((t, t), float("-inf")).triu(1)[None, None]  # [1, 1, T, T]
        for i, layer in enumerate(body.layers):
            if mask is None or not mask[2 * i]:
                h, _ = layer.self_attn(
                    hidden_states=layer.input_layernorm(x),
                    position_embeddings=(cos, sin),
                    attention_mask=causal,
                )
                x = x + h
            if mask is None or not mask[2 * i + 1]:
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(body.norm(x))[0].float().numpy()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def skip_mask(*blocks: int) -> np.ndarray:
    """A tiny model's ``[2 * N_LAYERS]`` skip mask with ``blocks`` skipped."""
    mask = np.zeros(2 * N_LAYERS, dtype=bool)
    mask[list(blocks)] = True
    return mask


def make_ids(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3")


@pytest.fixture
def backend(qwen3):
    return TorchEagerBackend.from_hf(qwen3)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2", "mistral"])
def test_full_forward_matches_hf(arch):
    model = tiny_model(arch)
    be = TorchEagerBackend.from_hf(model)
    ids = make_ids(48)
    ref = hf_logits(model, ids)
    assert np.abs(ref).max() > 1.0  # a meaningful comparison
    out = be.forward(ids)
    assert out.dtype == np.float32 and out.shape == (48, VOCAB)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # our layer-by-layer reference agrees with HF too
    np.testing.assert_allclose(reference_logits(model, ids), ref, atol=1e-4, rtol=0)

    # prefill, then one token at a time
    be.reset()
    last = be.prefill(ids[:16])
    np.testing.assert_allclose(last, ref[15], atol=1e-4, rtol=0)
    steps = np.concatenate([be.forward([t]) for t in ids[16:]])
    np.testing.assert_allclose(steps, ref[16:], atol=1e-4, rtol=0)
    assert be.length == 48


def test_chunked_forward_and_last_logits(backend, qwen3):
    ids = make_ids(40)
    ref = hf_logits(qwen3, ids)
    outs = [backend.forward(ids[:7]), backend.forward(ids[7:20]), backend.forward(ids[20:])]
    np.testing.assert_allclose(np.concatenate(outs), ref, atol=1e-4, rtol=0)
    backend.rollback(20)
    last = backend.forward(ids[20:], all_logits=False)
    assert last.shape == (1, VOCAB)
    np.testing.assert_allclose(last[0], ref[-1], atol=1e-4, rtol=0)
    hidden = backend.final_hidden()
    assert tuple(hidden.shape) == (20, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(qwen3.lm_head(hidden)[-1].numpy(), ref[-1], atol=1e-4)


def test_long_forward_is_chunked(qwen3, monkeypatch):
    import knapspec.backends.torch.eager as te

    monkeypatch.setattr(te, "PREFILL_CHUNK", 5)
    be = TorchEagerBackend.from_hf(qwen3, capture_tokens=8)
    ids = make_ids(43)
    ref = hf_logits(qwen3, ids)
    np.testing.assert_allclose(be.forward(ids, capture=True), ref, atol=1e-4, rtol=0)
    assert tuple(be.final_hidden().shape) == (43, 64)
    oracle = be.block_oracle()  # the window spans two chunks
    assert oracle.t0 == 35 and oracle.n_tokens == 8
    _check_oracle(oracle)
    be.reset()
    last = be.forward(ids, capture=True, all_logits=False)
    np.testing.assert_allclose(last[0], ref[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(be.block_oracle().boundary_states(), oracle.boundary_states())


MASKS = {
    "attn1_mlp2": [2, 5],
    "all_attn": [0, 2, 4, 6],
    "all_mlp": [1, 3, 5, 7],
    "mixed": [1, 2, 4, 7],
}


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("which", sorted(MASKS))
def test_masked_forward_matches_reference(arch, which):
    model = tiny_model(arch)
    be = TorchEagerBackend.from_hf(model)
    mask = np.zeros(2 * N_LAYERS, dtype=bool)
    mask[MASKS[which]] = True
    ids = make_ids(30)
    ref = reference_logits(model, ids, mask)
    np.testing.assert_allclose(be.forward(ids, mask), ref, atol=1e-4, rtol=0)
    # token by token under the same mask from an empty cache
    be.reset()
    steps = np.concatenate([be.forward([t], mask) for t in ids])
    np.testing.assert_allclose(steps, ref, atol=1e-4, rtol=0)
    # a 0/1 integer mask is accepted; an all-False mask is the full model
    be.reset()
    np.testing.assert_allclose(be.forward(ids, mask.astype(int)), ref, atol=1e-4, rtol=0)
    be.reset()
    np.testing.assert_allclose(
        be.forward(ids, np.zeros(2 * N_LAYERS, bool)), hf_logits(model, ids), atol=1e-4, rtol=0
    )


# ----------------------------------------------------------------------------- cache


def test_rollback_then_reforward_is_identical(backend):
    ids = make_ids(30)
    backend.forward(ids[:20])
    first = backend.forward(ids[20:25])
    backend.rollback(20)
    mask = np.zeros(2 * N_LAYERS, bool)
    mask[[2, 3, 5]] = True
    backend.forward(make_ids(7, seed=9), mask)  # drafts that pollute positions 20..26
    backend.rollback(20)
    again = backend.forward(ids[20:25])
    np.testing.assert_array_equal(again, first)
    assert backend.length == 25
    backend.rollback(0)
    assert backend.length == 0
    with pytest.raises(KnapSpecError):
        backend.rollback(1)
    with pytest.raises(KnapSpecError):
        backend.rollback(-1)


def test_skipped_attention_writes_nothing(backend):
    backend.forward(make_ids(10))
    k_before = backend.k_cache.clone()
    v_before = backend.v_cache.clone()
    mask = np.zeros(2 * N_LAYERS, bool)
    mask[2] = True  # layer 1 attention
    backend.forward(make_ids(3, seed=5), mask)
    assert torch.equal(backend.k_cache[1], k_before[1])
    assert torch.equal(backend.v_cache[1], v_before[1])
    for layer in (0, 2, 3):  # the others wrote positions 10..12 and nothing else
        assert not torch.equal(backend.k_cache[layer, :, 10:13], k_before[layer, :, 10:13])
        assert torch.equal(backend.k_cache[layer, :, :10], k_before[layer, :, :10])
        assert torch.equal(backend.k_cache[layer, :, 13:], k_before[layer, :, 13:])


def test_bad_inputs_raise(qwen3):
    be = TorchEagerBackend.from_hf(qwen3, max_context=32)
    assert be.max_context == 32
    with pytest.raises(KnapSpecError, match="shape"):
        be.forward([1, 2], np.zeros(2 * N_LAYERS - 1, bool))
    with pytest.raises(KnapSpecError, match="shape"):
        be.forward([1, 2], np.zeros((2, N_LAYERS), bool))
    with pytest.raises(KnapSpecError, match="boolean"):
        be.forward([1, 2], np.full(2 * N_LAYERS, 2))
    with pytest.raises(KnapSpecError, match="overflow"):
        be.forward(make_ids(33))
    be.forward(make_ids(30))
    with pytest.raises(KnapSpecError, match="overflow"):
        be.forward(make_ids(3))
    assert be.length == 30
    be.forward(make_ids(2))  # exactly full is fine
    with pytest.raises(KnapSpecError):
        be.forward([])
    with pytest.raises(KnapSpecError):
        be.forward([VOCAB])
    mask = np.zeros(2 * N_LAYERS, bool)
    mask[3] = True
    be.reset()
    with pytest.raises(KnapSpecError, match="capture"):
        be.forward([1], mask, capture=True)
    with pytest.raises(KnapSpecError, match="captured"):
        be.block_oracle()


def test_unsupported_architecture_is_refused():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(KnapSpecError, match="gpt2") as info:
        TorchEagerBackend.from_hf(model)
    assert "llama" in str(info.value) and "qwen3" in str(info.value)


def test_tokenizer_free_backend_and_metadata(backend):
    with pytest.raises(KnapSpecError, match="tokenizer"):
        backend.encode("hello")
    with pytest.raises(KnapSpecError, match="tokenizer"):
        backend.decode([1, 2])
    assert backend.name == "torch"
    assert backend.vocab_size == VOCAB
    assert backend.layout.n_layers == N_LAYERS
    assert backend.max_context == 256
    assert isinstance(backend.eos_token_ids, frozenset)
    d = backend.describe()
    assert d["backend"] == "torch" and d["dtype"] == "float32"
    assert d["threads"] == torch.get_num_threads() and d["torch"] == torch.__version__
    assert "model" in d
    t = backend.time_head(4, 3)
    assert 0.0 < t < 1.0
    model = backend.profile(contexts=[16, 64], token_counts=(1, 2), repeats=1, progress=False)
    assert model.meta["backend"] == "torch"
    assert model.full_step_seconds(backend.layout.n_layers, 64, 2) > 0


def test_dtype_mismatch_is_refused(qwen3):
    with pytest.raises(KnapSpecError, match="bfloat16"):
        TorchEagerBackend.from_hf(qwen3, dtype=torch.bfloat16)


def test_threads_argument_sets_torch_threads(qwen3):
    before = torch.get_num_threads()
    try:
        TorchEagerBackend.from_hf(qwen3, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- capture / oracle


def _check_oracle(oracle, n_cand: int = 3, atol: float = 1e-4) -> None:
    states = oracle.boundary_states()  # [2L+1, T, D]
    for b in range(oracle.layout.n_blocks):
        cand = states[b].unsqueeze(0).expand(n_cand, -1, -1).contiguous()  # [S, T, D]
        out = oracle.apply_block(b, cand)
        assert out.shape == cand.shape
        for s in range(n_cand):
            torch.testing.assert_close(out[s], states[b + 1], atol=atol, rtol=0)


def test_capture_and_oracle_reproduce_full_model(qwen3):
    be = TorchEagerBackend.from_hf(qwen3, capture_tokens=8)
    ids = make_ids(75)
    ref = hf_logits(qwen3, ids)
    be.prefill(ids[:60])  # many cached tokens before the captured window
    be.forward(ids[60:65], capture=True)
    be.forward(ids[65:71], capture=True)  # contiguous: the rolling window keeps the last 8
    oracle = be.block_oracle()
    assert oracle.t0 == 63 and oracle.n_tokens == 8
    states = oracle.boundary_states()
    assert tuple(states.shape) == (2 * N_LAYERS + 1, 8, 64)

    # the captured states are the full model's: compare with HF hidden states (layer ends)
    with torch.no_grad():
        hs = qwen3(torch.tensor([ids[:71]]), output_hidden_states=True).hidden_states
    for i in range(N_LAYERS):  # HF's last entry is after the final norm; skip it
        if i < N_LAYERS - 1:
            torch.testing.assert_close(states[2 * i + 2], hs[i + 1][0, 63:71], atol=1e-4, rtol=0)
    torch.testing.assert_close(states[0], hs[0][0, 63:71], atol=0, rtol=0)

    k_before, v_before = be.k_cache.clone(), be.v_cache.clone()
    _check_oracle(oracle)
    assert torch.equal(be.k_cache, k_before) and torch.equal(be.v_cache, v_before)
    logits = oracle.logits(states[-1].unsqueeze(0).expand(2, -1, -1))  # [S, T, V]
    assert tuple(logits.shape) == (2, 8, VOCAB)
    np.testing.assert_allclose(logits[1].numpy(), ref[63:71], atol=1e-4, rtol=0)

    # a drafting forward (masked, no capture) beyond the window keeps the oracle valid
    mask = np.zeros(2 * N_LAYERS, bool)
    mask[[2, 5]] = True
    be.forward(ids[71:74], mask)
    _check_oracle(be.block_oracle())

    # rollback drops captured positions >= the new length
    be.rollback(66)
    oracle = be.block_oracle()
    assert oracle.t0 == 63 and oracle.n_tokens == 3
    torch.testing.assert_close(oracle.boundary_states(), states[:, :3], atol=0, rtol=0)
    _check_oracle(oracle)
    be.rollback(63)
    with pytest.raises(KnapSpecError, match="captured"):
        be.block_oracle()
    # a non-contiguous capture starts a new window
    be.forward(ids[63:70])
    be.forward(ids[70:72], capture=True)
    oracle = be.block_oracle()
    assert oracle.t0 == 70 and oracle.n_tokens == 2
    _check_oracle(oracle)


def test_oracle_on_prompt_start_and_long_prefill(qwen3):
    be = TorchEagerBackend.from_hf(qwen3, capture_tokens=16)
    ids = make_ids(40)
    be.prefill(ids[:5], capture=True)  # t0 = 0: no cached prefix at all
    oracle = be.block_oracle()
    assert oracle.t0 == 0 and oracle.n_tokens == 5
    _check_oracle(oracle, n_cand=2)
    be.prefill(ids, capture=True)  # longer than capture_tokens: keeps the last 16
    oracle = be.block_oracle()
    assert oracle.t0 == 24 and oracle.n_tokens == 16
    _check_oracle(oracle, n_cand=4)
    with pytest.raises(KnapSpecError):
        oracle.apply_block(2 * N_LAYERS, oracle.boundary_states()[0:1])
    with pytest.raises(KnapSpecError, match="shape"):
        oracle.apply_block(0, oracle.boundary_states()[0])


def test_oracle_distinguishes_candidates(qwen3):
    """Different candidates in one batch give the same results as one at a time."""
    be = TorchEagerBackend.from_hf(qwen3, capture_tokens=6)
    be.prefill(make_ids(50), capture=True)
    oracle = be.block_oracle()
    states = oracle.boundary_states()
    gen = torch.Generator().manual_seed(3)
    cand = states[4].unsqueeze(0) + 0.5 * torch.randn((5, *states.shape[1:]), generator=gen)
    for b in (4, 5):
        batched = oracle.apply_block(b, cand)
        for s in range(5):
            single = oracle.apply_block(b, cand[s : s + 1])
            torch.testing.assert_close(batched[s : s + 1], single, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(batched[0], batched[1])


def test_oracle_states_stay_tensors_and_only_scores_are_numpy(qwen3, monkeypatch):
    """States in and out of the oracle are tensors; ``similarity`` / ``agreement`` return
    ``[S]`` numpy scores equal to ``knapspec.agreement`` on the full arrays, also when the
    logits are computed in several chunks of candidates."""
    import knapspec.backends.torch.oracle as orc
    from knapspec import agreement

    be = TorchEagerBackend.from_hf(qwen3, capture_tokens=6)
    be.prefill(make_ids(50), capture=True)
    oracle = be.block_oracle()
    full = oracle.boundary_states()  # [2L+1, T, D]
    gen = torch.Generator().manual_seed(5)
    noisy = full[-1].unsqueeze(0) + 0.3 * torch.randn((4, *full.shape[1:]), generator=gen)
    kept = oracle.apply_block(3, full[3:4].expand(2, -1, -1))
    assert isinstance(kept, torch.Tensor)
    states = oracle.concat([full[-1:], noisy, kept[np.array([1])]])  # numpy index, tensor out
    assert isinstance(states, torch.Tensor) and tuple(states.shape) == (6, 6, 64)
    states[0] = full[-1]  # results are ordinary tensors: planners may write into them

    sim = oracle.similarity(states, 2 * N_LAYERS)
    assert isinstance(sim, np.ndarray) and sim.shape == (6,)
    ref = agreement.cosine(states.numpy(), full[-1].numpy()).mean(axis=-1)
    np.testing.assert_allclose(sim, ref, atol=1e-6)
    assert sim[0] == pytest.approx(1.0, abs=1e-6) and sim[1:5].max() < 1.0

    logits = oracle.logits(states).numpy()  # [S, T, V]
    full_logits = oracle.logits(full[-1:]).numpy()[0]  # [T, V]
    top1 = oracle.agreement(states, "top1")
    tv = oracle.agreement(states, "tv")
    assert top1.shape == tv.shape == (6,) and top1[0] == 1.0 and tv[0] == pytest.approx(1.0)
    np.testing.assert_allclose(top1, agreement.top1_agreement(logits, full_logits))
    np.testing.assert_allclose(tv, agreement.tv_acceptance(logits, full_logits), atol=1e-6)
    monkeypatch.setattr(orc, "LOGIT_CHUNK", 4)  # 6 candidates in chunks of 4 and 2
    np.testing.assert_allclose(oracle.agreement(states, "top1"), top1)
    np.testing.assert_allclose(oracle.agreement(states, "tv"), tv, atol=1e-12)
    with pytest.raises(KnapSpecError, match="proxy"):
        oracle.agreement(states, "cosine")
    with pytest.raises(KnapSpecError, match="boundary"):
        oracle.similarity(states, 2 * N_LAYERS + 1)
    with pytest.raises(KnapSpecError, match="shape"):
        oracle.concat([full[0]])  # [T, D]: the candidate axis is missing


# ----------------------------------------------------------------------------- hot path


def test_a_skip_mask_is_validated_once_per_distinct_mask(backend, monkeypatch):
    """Drafting runs the same mask every round: it is checked once, not on every forward,
    and a different mask (or the same array changed in place) is checked again."""
    calls = []
    layout_cls = type(backend.layout)
    validate = layout_cls.validate_mask
    monkeypatch.setattr(layout_cls, "validate_mask",
                        lambda self, m, **kw: calls.append(1) or validate(self, m, **kw))
    backend.forward(make_ids(20))
    mask = np.zeros(2 * N_LAYERS, bool)
    mask[[2, 5]] = True
    first = backend.forward([3], mask)
    for _ in range(3):
        backend.rollback(20)
        again = backend.forward([3], mask)
    assert len(calls) == 1
    np.testing.assert_array_equal(again, first)
    mask[5] = False  # same object, other content: validated and run as the new mask
    backend.rollback(20)
    changed = backend.forward([3], mask)
    assert len(calls) == 2 and not np.array_equal(changed, first)
    backend.forward([4], np.zeros(2 * N_LAYERS, bool))  # all False: the full model
    assert backend.cached_tokens()[-1] == 4  # full-model KV, reusable by prompt caching
    with pytest.raises(KnapSpecError, match="shape"):
        backend.forward([1], mask[:-1])


def test_forward_without_capture_keeps_no_hidden_states(backend, monkeypatch):
    """``capture=False`` never takes the capturing path nor touches the captured window."""
    import knapspec.backends.torch.eager as te

    backend.prefill(make_ids(30), capture=True)
    window = backend.block_oracle().boundary_states()
    stores = []
    monkeypatch.setattr(te.CaptureWindow, "store", lambda *a: stores.append(a))
    monkeypatch.setattr(type(backend), "_forward_capture", lambda *a: pytest.fail("captured"))
    backend.forward(make_ids(3, seed=2))  # verification of a plain-decoding round
    backend.forward(make_ids(1, seed=3), all_logits=False)
    assert not stores
    assert backend.block_oracle().boundary_states() is window


def test_capture_tokens_can_widen_the_window(qwen3):
    """``capture_tokens`` is settable (the forced-plan sweep widens it) and is checked."""
    be = TorchEagerBackend.from_hf(qwen3, capture_tokens=4)
    be.capture_tokens = 10
    be.prefill(make_ids(30), capture=True)
    assert be.block_oracle().n_tokens == 10 and be.block_oracle().t0 == 20
    with pytest.raises(KnapSpecError, match="capture_tokens"):
        be.capture_tokens = 0
    with pytest.raises(KnapSpecError, match="capture_tokens"):
        TorchEagerBackend.from_hf(qwen3, capture_tokens=0)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_matches_hf_and_generate(smollm2):
    be = TorchEagerBackend(smollm2)
    model, tok = smollm2.model, smollm2.tokenizer
    assert be.layout.n_layers == 30 and be.vocab_size == 49152 and be.max_context == 8192
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in be.eos_token_ids
    prompt = be.encode("Write a short poem about the sea.")
    assert prompt == smollm2_chat_ids(tok, "Write a short poem about the sea.")
    ref = hf_logits(model, prompt)
    np.testing.assert_allclose(be.forward(prompt), ref, atol=1e-3, rtol=0)

    # greedy decoding through repeated forward == model.generate(do_sample=False)
    be.reset()
    logits = be.prefill(prompt)
    mine: list[int] = []
    for _ in range(32):
        nxt = int(np.argmax(logits))
        mine.append(nxt)
        if nxt in be.eos_token_ids:
            break
        logits = be.forward([nxt])[-1]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
            eos_token_id=sorted(be.eos_token_ids), pad_token_id=tok.pad_token_id or 0,
        )  # fmt: skip
    theirs = out[0, len(prompt) :].tolist()
    assert mine == theirs
    assert be.decode(mine) == tok.decode(theirs, skip_special_tokens=True)


def smollm2_chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]
