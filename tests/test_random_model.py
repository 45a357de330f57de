"""``--model random:<spec>``: built-in architectures with seeded random weights, for timing.

Resolution and the byte tokenizer need no torch.  Builds use shrunken copies of the built-in
specs (their names pick the architecture: llama, qwen2, qwen3), except one build of the
real ``random:smollm2-135m`` shapes (135M parameters); an 8B spec is never built here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from knapspec.backends.sources import RANDOM_PREFIX, ModelSource, random_source, resolve_model
from knapspec.costmodels.specs import (
    ARCHITECTURES,
    MODEL_SPECS,
    DecoderSpec,
    get_model_spec,
    hf_config_dict,
)
from knapspec.errors import KnapSpecError


def tiny(name: str, **changes) -> DecoderSpec:
    """Built-in spec ``name`` shrunk to 2 layers (same name: same architecture details)."""
    shape = dict(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                 ffn_size=96, vocab_size=320, max_context=256)
    return dataclasses.replace(get_model_spec(name), **{**shape, **changes})


# ----------------------------------------------------------------------------- no torch


def test_every_builtin_spec_has_its_architecture_and_round_trips_through_a_config():
    assert set(ARCHITECTURES) == set(MODEL_SPECS)
    for name, spec in MODEL_SPECS.items():
        cfg = hf_config_dict(spec)
        assert cfg["model_type"] == ARCHITECTURES[name].model_type
        back = DecoderSpec.from_hf_config(cfg, name=name)
        assert dataclasses.replace(back, source=spec.source) == spec, name
    assert ARCHITECTURES["qwen2.5-1.5b"].model_type == "qwen2"
    assert ARCHITECTURES["llama-3.1-8b"].rope_theta == 500000.0
    assert hf_config_dict(tiny("qwen3-8b"))["eos_token_id"] is None  # never stops on its own


def test_random_specs_resolve_without_building_anything():
    src = resolve_model("random:smollm2-135m")
    assert src.kind == "random" and src.spec is get_model_spec("smollm2-135m")
    assert src.path.name == "random:smollm2-135m" and src.seed == 0
    assert "random weights" in src.timing_only_reason
    assert resolve_model(" RANDOM:Qwen2.5-1.5B ").spec.name == "qwen2.5-1.5b"
    assert ModelSource("hf", Path("/m")).timing_only_reason is None
    custom = random_source(tiny("llama-3.1-8b"), seed=3)
    assert custom.seed == 3 and custom.spec.n_layers == 2


@pytest.mark.parametrize("text", ["random:gpt-5", "random:", "random:  "])
def test_an_unknown_random_spec_is_one_line_listing_the_specs(text):
    with pytest.raises(KnapSpecError) as err:
        resolve_model(text)
    msg = str(err.value)
    assert "\n" not in msg and "llama-3.1-8b" in msg and "qwen2.5-1.5b" in msg
    assert RANDOM_PREFIX in msg


def test_bad_random_seeds_and_objects_are_refused():
    with pytest.raises(KnapSpecError, match="seed"):
        random_source("smollm2-135m", seed=-1)
    with pytest.raises(KnapSpecError, match="DecoderSpec"):
        random_source(42)  # type: ignore[arg-type]


def test_the_llamacpp_backend_refuses_random_weights_by_name():
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    from knapspec.backends.llamacpp import LlamaCppBackend

    with pytest.raises(KnapSpecError, match="torch"):
        LlamaCppBackend("random:smollm2-135m")


# ----------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trips_text_and_shows_other_ids():
    pytest.importorskip("torch")
    from knapspec.backends.torch.random_model import ByteTokenizer

    tok = ByteTokenizer(320)
    ids = tok.encode("héllo ☃")
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == "héllo ☃"
    assert tok.decode([104, 300, 105]) == "h<300>i"
    assert tok.eos_token_id is None and tok.chat_template is None and tok.get_vocab() == {}
    with pytest.raises(KnapSpecError, match="256"):
        ByteTokenizer(100)


# ----------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def torch():
    pytest.importorskip("transformers", reason="needs transformers")
    return pytest.importorskip("torch", reason="needs torch")


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-1.5b", "qwen3-8b"])
def test_shrunken_specs_build_their_architecture_with_the_specs_shapes(torch, name):
    from knapspec.backends.torch.random_model import build_random_model

    spec = tiny(name)
    model = build_random_model(spec, torch.bfloat16, "cpu", seed=0)
    cfg, arch = model.config, ARCHITECTURES[name]
    assert cfg.model_type == arch.model_type
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (
        2, 64, 4, 2, 16, 96, 320)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu"
               for p in model.parameters())
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 16, 64) and attn.k_proj.weight.shape == (2 * 16, 64)
    assert (attn.q_proj.bias is not None) == (arch.model_type == "qwen2")
    assert hasattr(attn, "q_norm") == (arch.model_type == "qwen3")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == spec.tied_embeddings
    inv_freq = model.model.rotary_emb.inv_freq.float()
    assert math.isclose(float(inv_freq[1]), arch.rope_theta ** (-2 / 16), rel_tol=1e-4)
    # the weights are the seeded draw: N(0, 0.02^2) matrices, unit norms
    w = model.model.layers[1].mlp.down_proj.weight.float()
    assert 0.015 < float(w.detach().std()) < 0.025
    assert bool((model.model.norm.weight == 1).all())


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(torch):
    from knapspec.backends.torch.random_model import build_random_model

    spec = tiny("llama-3.1-8b")
    a, b, c = (build_random_model(spec, torch.float32, "cpu", seed=s) for s in (7, 7, 8))
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"],
                           pc["model.layers.0.self_attn.q_proj.weight"])


def test_a_random_backend_generates_flagged_timing_only(torch):
    from knapspec.backends.torch.eager import TorchEagerBackend
    from knapspec.backends.torch.loading import load_torch_model
    from knapspec.costmodels import RooflineCostModel, get_hardware_spec
    from knapspec.decoding import GenerationConfig, SpeculativeDecoder
    from knapspec.planner.factory import make_planner

    spec = tiny("qwen2.5-1.5b")
    loaded = load_torch_model(random_source(spec, seed=1), dtype="float32", device="cpu")
    assert loaded.tokenizer.vocab_size == 320 and not loaded.from_cache
    be = TorchEagerBackend(loaded, max_context=128)
    assert be.timing_only_reason == random_source(spec, seed=1).timing_only_reason
    assert be.eos_token_ids == frozenset()
    cm = RooflineCostModel(spec, get_hardware_spec("cpu-small"))
    dec = SpeculativeDecoder(be, make_planner("ar", be.layout, cm))
    res = dec.generate(be.encode("hi there"), GenerationConfig(max_new_tokens=6))
    assert res.new_tokens == 6 and res.stop_reason == "length"  # no EOS in random weights
    assert res.timing_only and "random weights" in res.timing_only_reason
    assert json.loads(json.dumps(res.to_dict()))["timing_only"] is True


def test_random_smollm2_builds_with_the_builtin_shapes(torch):
    """The one full-size build of the file (135M parameters, float32 on the CPU)."""
    from knapspec.backends.torch.eager import TorchEagerBackend

    spec = get_model_spec("smollm2-135m")
    be = TorchEagerBackend("random:smollm2-135m", dtype="float32", device="cpu",
                           max_context=64)
    assert be.layout.n_layers == spec.n_layers and be.vocab_size == spec.vocab_size
    assert be.dim == spec.hidden_size and be.model.config.intermediate_size == spec.ffn_size
    n_params = sum(p.numel() for p in be.model.parameters())
    expected = (spec.n_layers * (spec.attention_params + spec.mlp_params) + spec.head_params
                + spec.n_layers * 2 * spec.hidden_size + spec.hidden_size)  # + norms
    assert n_params == expected
    assert be.describe()["model"] == "random:smollm2-135m"
    logits = be.forward(be.encode("abc"), None)
    assert logits.shape == (3, spec.vocab_size) and np.isfinite(logits).all()


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_profile_plan_and_generate_of_random_smollm2_say_timing_only(
        torch, tmp_path, monkeypatch, capsys):
    """``knapspec profile --model random:smollm2-135m`` on a small grid, ``plan`` on that
    profile and ``generate`` with it: every output says timing-only; an unknown spec is one
    line listing the specs.  (The model is built once and reused by the three commands, and
    the profile is not re-measured when other work disturbs it: this test is about what
    the commands say, not about trust.)"""
    pytest.importorskip("numba", reason="the CLI builds planners, which need numba")
    from knapspec.backends import profiling
    from knapspec.backends.profile_trust import TrustPolicy
    from knapspec.backends.torch import random_model
    from knapspec.cli import main

    built: dict = {}
    build = random_model.build_random_model

    def build_once(spec, dtype, device="cpu", seed=0):
        key = (spec, dtype, str(device), seed)
        if key not in built:
            built[key] = build(spec, dtype, device, seed)
        return built[key]

    monkeypatch.setattr(random_model, "build_random_model", build_once)
    monkeypatch.setattr(profiling, "TrustPolicy", lambda: TrustPolicy(max_retries=0))
    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "random-smollm2.json"
    common = ["--model", "random:smollm2-135m", "--set", "backend.max_context=160",
              "--set", "backend.dtype=float32", "--set", "backend.device=cpu"]
    assert main(["profile", *common, "--contexts", "32,96", "--repeats", "1", "--force",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TIMING ONLY: random weights (random:smollm2-135m, seed 0)" in text
    meta = json.loads(out.read_text())["meta"]
    assert meta["model"] == "random:smollm2-135m" and "random weights" in meta[
        "timing_only_reason"]
    assert meta["timer"] == "perf_counter"

    plan = ["plan", "--cost-model", str(out), "--model-spec", "smollm2-135m", "--context", "96"]
    assert main(plan) == 0
    assert "TIMING ONLY: cost model profiled on random weights" in capsys.readouterr().out
    assert main([*plan, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["timing_only"] is True

    assert main(["generate", "hello", *common, "--cost-model", str(out), "--strategy", "ar",
                 "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("timing only: random weights") == 1  # said before the text streams
    assert "[TIMING ONLY: random weights (random:smollm2-135m, seed 0)" in err
    assert main(["generate", "hello", *common, "--cost-model", str(out), "--strategy", "ar",
                 "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["timing_only"] is True and result["new_tokens"] == 3

    assert main(["profile", "--model", "random:gpt-5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model spec 'gpt-5'" in err and "llama-3.1-8b" in err


def test_a_config_file_keeps_random_specs_as_they_are(tmp_path):
    """``model.path`` relative to the file, except ``random:<spec>``, which is no path."""
    from knapspec.config import KnapSpecConfig

    f = tmp_path / "knapspec.toml"
    f.write_text('[model]\npath = "random:llama-3.1-8b"\n')
    assert KnapSpecConfig.from_toml(f).model.path == "random:llama-3.1-8b"
    f.write_text('[model]\npath = "m.gguf"\n')
    assert KnapSpecConfig.from_toml(f).model.path == str(tmp_path / "m.gguf")
