"""Tests for knapspec.costmodels: linear, table and roofline models, specs and JSON I/O."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knapspec.costmodels import (
    COST_MODEL_KINDS,
    HARDWARE_SPECS,
    MODEL_SPECS,
    CostModel,
    DecoderSpec,
    HardwareSpec,
    LinearCostModel,
    RooflineCostModel,
    TableCostModel,
    cost_model_from_json,
    cost_model_to_json,
    get_hardware_spec,
    get_model_spec,
    load_cost_model,
    save_cost_model,
)
from knapspec.errors import KnapSpecError

K = 1024


# ----------------------------------------------------------------------------- fixtures
def make_linear() -> LinearCostModel:
    return LinearCostModel(
        mlp_s=1.5e-4, attn_per_token_s=2e-9, attn_base_s=3e-5, head_s=4e-4, overhead_s=1e-3,
        head_per_token_s=1e-5, mlp_per_token_s=2e-6, attn_per_new_token_s=3e-6,
        overhead_per_token_s=4e-7, meta={"model": "toy", "threads": 2},
    )


def make_table() -> TableCostModel:
    return TableCostModel(
        contexts=[0, 1024, 4096],
        n_tokens=[1, 4, 8],
        attention=[[1e-4, 1.2e-4, 1.5e-4], [2e-4, 2.5e-4, 3e-4], [5e-4, 6e-4, 8e-4]],
        mlp=[3e-4, 3.5e-4, 4e-4],
        head=[5e-4, 6e-4, 7e-4],
        overhead=[1e-3, 1e-3, 1.1e-3],
        meta={"backend": "toy"},
    )


def make_roofline() -> RooflineCostModel:
    return RooflineCostModel(
        get_model_spec("llama-3.1-8b"), get_hardware_spec("h100"), meta={"note": "x"}
    )


def make_custom_roofline() -> RooflineCostModel:
    model = DecoderSpec(
        name="my-model", n_layers=4, hidden_size=256, n_heads=4, n_kv_heads=2, head_dim=64,
        ffn_size=1024, vocab_size=1000, dtype_bytes=0.5625, max_context=4096,
        tied_embeddings=True, source="made up",
    )
    hw = HardwareSpec(
        name="my-gpu", peak_flops=1e14, mem_bandwidth=1e12, flops_efficiency=0.5,
        bandwidth_efficiency=0.6, step_overhead_s=1e-4, block_overhead_s=5e-6,
        source="made up",
    )
    return RooflineCostModel(model, hw, kv_dtype_bytes=1)


MAKERS = {
    "linear": make_linear,
    "table": make_table,
    "roofline": make_roofline,
    "roofline-custom": make_custom_roofline,
}

PROBE_CONTEXTS = [0, 1, 100, 1000, 1024, 3000, 4096, 5000, 50_000]
PROBE_TOKENS = [1, 2, 4, 5, 8, 9, 16]


def probe(model: CostModel) -> list[float]:
    """Many cost values of ``model``, for comparing two models."""
    out = [model.attention(c, n) for c in PROBE_CONTEXTS for n in PROBE_TOKENS]
    for n in PROBE_TOKENS:
        out += [model.mlp(n), model.head(n), model.overhead(n)]
    return out


def write_json(tmp_path, obj, name="model.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- registry
def test_all_kinds_registered_on_import():
    assert {"linear", "table", "roofline"} <= set(COST_MODEL_KINDS)
    assert COST_MODEL_KINDS["linear"] is LinearCostModel
    assert COST_MODEL_KINDS["table"] is TableCostModel
    assert COST_MODEL_KINDS["roofline"] is RooflineCostModel


# ----------------------------------------------------------------------------- JSON round trip
@pytest.mark.parametrize("which", sorted(MAKERS))
def test_save_load_round_trip_preserves_values(tmp_path, which):
    model = MAKERS[which]()
    path = save_cost_model(model, tmp_path / "cm.json")
    loaded = load_cost_model(path)
    assert type(loaded) is type(model)
    assert loaded.to_dict() == model.to_dict()
    assert loaded.meta == model.meta
    assert probe(loaded) == probe(model)


@pytest.mark.parametrize("which", sorted(MAKERS))
def test_json_object_round_trip_through_text(which):
    model = MAKERS[which]()
    obj = cost_model_to_json(model)
    assert obj["schema"] == "knapspec.costmodel"
    assert obj["version"] == 1
    assert obj["kind"] == model.kind
    again = cost_model_from_json(json.loads(json.dumps(obj)))
    assert probe(again) == probe(model)
    assert cost_model_to_json(again) == json.loads(json.dumps(obj))


def test_roofline_file_stores_specs_as_dicts(tmp_path):
    model = make_custom_roofline()
    path = save_cost_model(model, tmp_path / "r.json")
    params = json.loads(path.read_text())["params"]
    assert params["model"]["name"] == "my-model"
    assert params["hardware"]["name"] == "my-gpu"
    assert params["kv_dtype_bytes"] == 1
    loaded = load_cost_model(path)
    assert loaded.model == model.model
    assert loaded.hardware == model.hardware


def test_roofline_params_accept_builtin_names():
    model = cost_model_from_json(
        {"schema": "knapspec.costmodel", "version": 1, "kind": "roofline",
         "params": {"model": "Llama-3.1-8B", "hardware": "H100"}}
    )
    assert probe(model) == probe(make_roofline())


def test_table_round_trip_keeps_monotone_record(tmp_path):
    model = TableCostModel([0, 10], [1], [[2.0], [1.0]], [1.0], [1.0], [1.0])
    assert "monotone_enforced" in model.meta
    loaded = load_cost_model(save_cost_model(model, tmp_path / "t.json"))
    assert loaded.meta["monotone_enforced"] == model.meta["monotone_enforced"]
    assert loaded.to_dict() == model.to_dict()


# ----------------------------------------------------------------------------- linear model
def test_linear_formulas():
    m = make_linear()
    assert m.attention(1000, 1) == pytest.approx(3e-5 + 2e-9 * 1000)
    assert m.attention(1000, 5) == pytest.approx(3e-5 + 2e-9 * 1000 + 3e-6 * 4)
    assert m.mlp(1) == pytest.approx(1.5e-4)
    assert m.mlp(3) == pytest.approx(1.5e-4 + 2 * 2e-6)
    assert m.head(9) == pytest.approx(4e-4 + 8 * 1e-5)
    assert m.overhead(2) == pytest.approx(1e-3 + 4e-7)
    mask = np.zeros(8, dtype=bool)
    mask[[2, 5]] = True
    expected = 1e-3 + 4e-4 + 3 * m.attention(10) + 3 * m.mlp()
    assert m.step_seconds(mask, 10) == pytest.approx(expected)


def test_linear_defaults_make_verification_cost_like_drafting():
    m = LinearCostModel(1e-4, 1e-9, 2e-5, 3e-4, 1e-3)
    assert m.full_step_seconds(4, 500, 8) == m.full_step_seconds(4, 500, 1)


@given(
    slope=st.floats(0, 1e-6),
    base=st.floats(0, 1e-3),
    contexts=st.lists(st.integers(0, 200_000), min_size=2, max_size=30, unique=True),
)
def test_linear_fit_recovers_noiseless_coefficients(slope, base, contexts):
    c = np.array(contexts, dtype=float)
    y = slope * c + base
    m = LinearCostModel.fit(c, y, [2e-4, 1e-4, 3e-4], 5e-4, [1e-3, 2e-3, 9e-3])
    assert m.attn_per_token_s == pytest.approx(slope, rel=1e-6, abs=1e-15)
    assert m.attn_base_s == pytest.approx(base, rel=1e-6, abs=1e-12)
    assert m.mlp_s == pytest.approx(2e-4)  # median of trials
    assert m.overhead_s == pytest.approx(2e-3)
    assert m.head_s == pytest.approx(5e-4)
    assert m.meta["fit"]["n_points"] == len(contexts)
    assert m.meta["fit"]["rms_residual_s"] < 1e-12


def test_linear_fit_clamps_negative_slope_and_intercept():
    c = np.array([0.0, 1000.0, 2000.0])
    falling = LinearCostModel.fit(c, [3e-4, 2e-4, 1e-4], 1e-4, 1e-4, 0.0)
    assert falling.attn_per_token_s == 0.0
    assert falling.attn_base_s == pytest.approx(2e-4)
    assert falling.meta["fit"]["clamped"] is True
    # A steep line with a negative intercept: refit through the origin.
    steep = LinearCostModel.fit([1000.0, 2000.0], [1e-4, 3e-4], 1e-4, 1e-4, 0.0)
    assert steep.attn_base_s == 0.0
    assert steep.attn_per_token_s == pytest.approx((1e-1 + 6e-1) / (1e6 + 4e6))


def test_linear_fit_passes_token_slopes_and_meta():
    m = LinearCostModel.fit([0, 10], [1.0, 2.0], 1.0, 1.0, 1.0, mlp_per_token_s=0.5,
                            meta={"who": "me"})
    assert m.mlp(3) == pytest.approx(2.0)
    assert m.meta["who"] == "me"
    assert "fit" in m.meta


@pytest.mark.parametrize(
    "args",
    [
        ([100.0, 100.0], [1.0, 2.0]),  # one distinct context
        ([1.0, 2.0, 3.0], [1.0, 2.0]),  # length mismatch
        ([1.0, 2.0], [1.0, float("nan")]),
        ([1.0, 2.0], [1.0, -2.0]),
        ([], []),
    ],
)
def test_linear_fit_rejects_bad_data(args):
    with pytest.raises(KnapSpecError):
        LinearCostModel.fit(*args, 1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "field", ["mlp_s", "attn_per_token_s", "attn_base_s", "head_s", "overhead_s",
              "head_per_token_s", "mlp_per_token_s", "attn_per_new_token_s",
              "overhead_per_token_s"],
)
@pytest.mark.parametrize("bad", [-1e-6, float("nan"), float("inf"), "fast", None])
def test_linear_rejects_bad_param(field, bad):
    params = make_linear().to_dict()
    params[field] = bad
    with pytest.raises(KnapSpecError, match=field):
        LinearCostModel.from_dict(params)


@pytest.mark.parametrize("bad", [(-1, 1), (float("nan"), 1), (10, 0), (10, float("inf"))])
def test_cost_methods_reject_bad_context_or_tokens(bad):
    c, n = bad
    for model in (make_linear(), make_table(), make_roofline()):
        with pytest.raises(KnapSpecError):
            model.attention(c, n)


# ----------------------------------------------------------------------------- table model
@st.composite
def grids(draw, monotone: bool = True):
    """A valid table: strictly increasing contexts and token counts, random seconds."""
    n_ctx = draw(st.integers(1, 6))
    n_tok = draw(st.integers(1, 5))
    contexts = sorted(draw(st.sets(st.integers(0, 200_000), min_size=n_ctx, max_size=n_ctx)))
    steps = draw(st.lists(st.integers(1, 16), min_size=n_tok - 1, max_size=n_tok - 1))
    n_tokens = [1, *(1 + s for s in itertools.accumulate(steps))]
    seconds = st.floats(0, 1.0, allow_nan=False, allow_infinity=False)
    attn = np.array(draw(st.lists(seconds, min_size=n_ctx * n_tok, max_size=n_ctx * n_tok)))
    attn = attn.reshape(n_ctx, n_tok)
    if monotone:
        attn = np.maximum.accumulate(attn, axis=0)
    vec = st.lists(seconds, min_size=n_tok, max_size=n_tok)
    return {
        "contexts": contexts,
        "n_tokens": n_tokens,
        "attention": attn.tolist(),
        "mlp": draw(vec),
        "head": draw(vec),
        "overhead": draw(vec),
    }


@given(grids())
def test_table_exact_at_measured_points(params):
    m = TableCostModel(**params)
    assert "monotone_enforced" not in m.meta
    for i, c in enumerate(params["contexts"]):
        for j, n in enumerate(params["n_tokens"]):
            assert m.attention(c, n) == params["attention"][i][j]
    for j, n in enumerate(params["n_tokens"]):
        assert m.mlp(n) == params["mlp"][j]
        assert m.head(n) == params["head"][j]
        assert m.overhead(n) == params["overhead"][j]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(grids(monotone=False), st.lists(st.floats(0, 400_000), min_size=2, max_size=20),
       st.floats(1, 40))
def test_table_monotone_in_context_after_enforcement(params, probes, n):
    m = TableCostModel(**params)
    raw = np.array(params["attention"])
    fixed = np.maximum.accumulate(raw, axis=0)
    assert ("monotone_enforced" in m.meta) == bool(np.any(fixed != raw))
    # Exact at measured points, with the running-maximum values.
    for i, c in enumerate(params["contexts"]):
        for j, nt in enumerate(params["n_tokens"]):
            assert m.attention(c, nt) == fixed[i, j]
    # Non-decreasing in context everywhere (interpolating and extrapolating in both axes).
    probes = sorted([*probes, *params["contexts"]])
    values = [m.attention(c, n) for c in probes]
    assert all(b >= a - 1e-12 * max(1.0, a) for a, b in itertools.pairwise(values))  # lerp ulps
    assert all(v >= 0 for v in values)


def test_table_enforcement_logs_and_records(caplog):
    with caplog.at_level(logging.INFO, logger="knapspec.costmodels.table"):
        m = TableCostModel([0, 100, 200], [1], [[3.0], [2.0], [4.0]], [1.0], [1.0], [1.0])
    assert "monotone" in caplog.text
    assert m.meta["monotone_enforced"] == {"cells_changed": 1, "max_raise_s": 1.0}
    assert m.attention(100) == 3.0
    assert m.attention(50) == 3.0
    assert m.attention(150) == pytest.approx(3.5)


def test_table_interpolation_and_extrapolation_rules():
    m = make_table()
    # Between measured contexts, and between measured token counts.
    assert m.attention(512, 1) == pytest.approx(1.5e-4)
    assert m.attention(1024, 2) == pytest.approx(2e-4 + (2.5e-4 - 2e-4) / 3)
    # Beyond the last context: last segment's slope, per n column.
    slope = (5e-4 - 2e-4) / (4096 - 1024)
    assert m.attention(8192, 1) == pytest.approx(5e-4 + slope * 4096)
    # Beyond the largest n: last per-token slope.
    assert m.mlp(12) == pytest.approx(4e-4 + (4e-4 - 3.5e-4) / 4 * 4)
    assert m.attention(4096, 16) == pytest.approx(8e-4 + (8e-4 - 6e-4) / 4 * 8)


def test_table_flat_below_first_context_and_single_point_grids():
    m = TableCostModel([100, 200], [1], [[1.0], [2.0]], [1.0], [1.0], [1.0])
    assert m.attention(0) == 1.0
    assert m.attention(50) == 1.0
    single = TableCostModel([512], [1], [[1.0]], [2.0], [3.0], [4.0])
    assert single.attention(0, 1) == single.attention(10**6, 64) == 1.0
    assert single.mlp(100) == 2.0


def test_table_extrapolation_never_decreases():
    # Falling in n and in context would extrapolate below zero without the clamps.
    m = TableCostModel([0, 100], [1, 2], [[5.0, 1.0], [5.0, 1.0]], [5.0, 1.0], [1.0, 1.0],
                       [1.0, 1.0])
    assert m.attention(100, 10) == 1.0
    assert m.mlp(10) == 1.0
    assert m.attention(10**6, 1) == 5.0


def _valid_table_params():
    return make_table().to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("contexts", [0, 4096, 1024]),  # not increasing
        ("contexts", [0, 1024, 1024]),  # not strictly increasing
        ("contexts", [0, 1024]),  # wrong length for attention
        ("contexts", [-1, 1024, 4096]),
        ("n_tokens", [2, 4, 8]),  # does not start at 1
        ("n_tokens", [1, 8, 4]),
        ("n_tokens", [1, 2.5, 8]),
        ("attention", [[1e-4, 1e-4, 1e-4]] * 2),  # wrong shape
        ("attention", [1e-4, 1e-4, 1e-4]),  # 1-D
        ("attention", [[1e-4, float("nan"), 1e-4]] * 3),
        ("attention", [[1e-4, -1e-4, 1e-4]] * 3),
        ("mlp", [1e-4, 1e-4]),
        ("head", [1e-4, float("inf"), 1e-4]),
        ("overhead", [1e-4, -1.0, 1e-4]),
        ("mlp", "fast"),
        ("head", []),
    ],
)
def test_table_rejects_bad_field(field, value):
    params = _valid_table_params()
    params[field] = value
    expected = "contexts|attention" if field == "contexts" else field
    with pytest.raises(KnapSpecError, match=expected):
        TableCostModel.from_dict(params)


# ----------------------------------------------------------------------------- specs
def test_builtin_specs_match_published_configs():
    llama = get_model_spec("llama-3.1-8b")
    assert (llama.n_layers, llama.hidden_size, llama.n_heads, llama.n_kv_heads,
            llama.head_dim, llama.ffn_size, llama.vocab_size, llama.max_context) == (
        32, 4096, 32, 8, 128, 14336, 128256, 131072)
    assert get_model_spec("qwen3-32b").n_heads * 128 != get_model_spec("qwen3-32b").hidden_size
    assert get_model_spec("smollm2-135m").tied_embeddings
    # Llama-3.1-8B has ~8.0e9 parameters: 32 layers + embeddings + untied head.
    total = (llama.n_layers * (llama.attention_params + llama.mlp_params)
             + 2 * llama.head_params)
    assert 7.9e9 < total < 8.1e9
    for spec in (*MODEL_SPECS.values(), *HARDWARE_SPECS.values()):
        assert spec.source, spec.name
        assert spec.name == spec.name.lower()


def test_qwen25_15b_and_h200_specs():
    """The shapes of the Qwen2.5(-Coder)-1.5B model run here on llama.cpp, and the H200."""
    qwen = get_model_spec("qwen2.5-1.5b")
    assert (qwen.n_layers, qwen.hidden_size, qwen.n_heads, qwen.n_kv_heads, qwen.head_dim,
            qwen.ffn_size, qwen.vocab_size, qwen.max_context, qwen.tied_embeddings) == (
        28, 1536, 12, 2, 128, 8960, 151936, 32768, True)
    # ~1.54e9 parameters (the model card's 1.54B): 28 layers + tied embeddings (+ biases)
    total = qwen.n_layers * (qwen.attention_params + qwen.mlp_params) + qwen.head_params
    assert 1.50e9 < total < 1.56e9
    assert "Qwen2.5" in qwen.source
    h200, h100 = get_hardware_spec("h200"), get_hardware_spec("h100")
    assert (h200.peak_flops, h200.mem_bandwidth, h200.memory_bytes) == (989e12, 4.8e12, 141e9)
    assert h200.peak_flops == h100.peak_flops and h200.mem_bandwidth > h100.mem_bandwidth
    assert "H200" in h200.source and "141 GB" in h200.source
    assert get_hardware_spec("cpu-small").memory_bytes is None
    assert HardwareSpec.from_dict(h200.to_dict()) == h200
    # the same model is memory-bound on both: a step is faster on the H200 by the bandwidth
    spec = get_model_spec("llama-3.1-8b")
    t100 = RooflineCostModel(spec, h100).full_step_seconds(spec.n_layers, 1024, 1)
    t200 = RooflineCostModel(spec, h200).full_step_seconds(spec.n_layers, 1024, 1)
    assert t200 < t100
    data = h200.to_dict()
    data["memory_bytes"] = 0
    with pytest.raises(KnapSpecError, match="memory_bytes"):
        HardwareSpec.from_dict(data)


def test_spec_lookup_is_case_insensitive_and_lists_names_on_error():
    assert get_hardware_spec("H100") is HARDWARE_SPECS["h100"]
    with pytest.raises(KnapSpecError, match=re.escape("llama-3.1-8b")):
        get_model_spec("gpt-5")
    with pytest.raises(KnapSpecError, match="cpu-small"):
        get_hardware_spec("tpu")


def test_decoder_spec_from_hf_config():
    config = {
        "_name_or_path": "HuggingFaceTB/SmolLM2-135M", "num_hidden_layers": 30,
        "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }
    spec = DecoderSpec.from_hf_config(config, name="smollm2-135m")
    builtin = get_model_spec("smollm2-135m")
    assert dataclasses.replace(spec, source=builtin.source) == builtin
    with pytest.raises(KnapSpecError, match="intermediate_size"):
        DecoderSpec.from_hf_config({k: v for k, v in config.items() if k != "intermediate_size"})
    assert DecoderSpec.from_hf_config({**config, "torch_dtype": "float32"}).dtype_bytes == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_layers", 0), ("hidden_size", 1.5), ("n_kv_heads", 5), ("dtype_bytes", 0),
     ("dtype_bytes", float("nan")), ("vocab_size", True), ("name", "")],
)
def test_decoder_spec_rejects_bad_field(field, value):
    data = get_model_spec("llama-3.1-8b").to_dict()
    data[field] = value
    with pytest.raises(KnapSpecError, match=field):
        DecoderSpec.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [("peak_flops", 0), ("mem_bandwidth", -1.0), ("flops_efficiency", 1.5),
     ("bandwidth_efficiency", 0.0), ("step_overhead_s", -1e-6), ("block_overhead_s", "x")],
)
def test_hardware_spec_rejects_bad_field(field, value):
    data = get_hardware_spec("h100").to_dict()
    data[field] = value
    with pytest.raises(KnapSpecError, match=field):
        HardwareSpec.from_dict(data)


# ----------------------------------------------------------------------------- roofline
def test_roofline_attention_grows_with_context_mlp_does_not():
    r = make_roofline()
    ctxs = [0, K, 8 * K, 32 * K, 128 * K]
    attn = [r.attention(c) for c in ctxs]
    assert all(b > a for a, b in itertools.pairwise(attn))
    assert r.block_costs(32, 0)[1] == r.block_costs(32, 128 * K)[1]


def test_roofline_attention_vs_mlp_crossover_llama8b_h100():
    r = make_roofline()
    assert r.attention(128 * K) > r.mlp()
    assert r.attention(1 * K) < r.mlp()


def test_roofline_verify_cost_gpu_memory_bound_cpu_compute_bound():
    gpu = make_roofline()
    L = gpu.model.n_layers
    assert gpu.full_step_seconds(L, 4 * K, 8) < 1.5 * gpu.full_step_seconds(L, 4 * K, 1)
    cpu = RooflineCostModel(get_model_spec("smollm2-135m"), get_hardware_spec("cpu-small"))
    L = cpu.model.n_layers
    assert cpu.full_step_seconds(L, 1 * K, 8) > 1.5 * cpu.full_step_seconds(L, 1 * K, 1)


def test_roofline_block_formula_by_hand():
    r = make_custom_roofline()
    m, h = r.model, r.hardware
    c, n = 100, 3
    p = 256 * 4 * 64 + 2 * 256 * 2 * 64 + 4 * 64 * 256
    nbytes = p * 0.5625 + 2 * 2 * 64 * 1 * (c + n) + 2 * 2 * 64 * 1 * n
    flops = 2 * n * p + 4 * n * 4 * 64 * (c + n)
    expected = max(flops / (1e14 * 0.5), nbytes / (1e12 * 0.6)) + 5e-6
    assert r.attention(c, n) == pytest.approx(expected)
    assert r.mlp(n) == pytest.approx(max(2 * n * 3 * 256 * 1024 / 5e13,
                                         3 * 256 * 1024 * 0.5625 / 6e11) + 5e-6)
    assert r.head(1) == pytest.approx(256 * 1000 * 0.5625 / 6e11 + 5e-6)
    assert r.overhead(8) == h.step_overhead_s
    assert m.kv_bytes_per_token(1) == 2 * 2 * 64


def test_roofline_rejects_bad_kv_bytes_and_types():
    with pytest.raises(KnapSpecError, match="kv_dtype_bytes"):
        RooflineCostModel(get_model_spec("qwen3-8b"), get_hardware_spec("a100"), -1)
    with pytest.raises(KnapSpecError, match="model"):
        RooflineCostModel("qwen3-8b", get_hardware_spec("a100"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- malformed files
def _valid_obj(kind="linear"):
    return cost_model_to_json({"linear": make_linear, "table": make_table,
                               "roofline": make_roofline}[kind]())


def test_load_rejects_non_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"schema": "knapspec.costmodel", ')
    with pytest.raises(KnapSpecError, match="not valid JSON") as info:
        load_cost_model(path)
    assert str(path) in str(info.value)


def test_load_rejects_binary_and_missing_files(tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(KnapSpecError, match=re.escape("bin.json")):
        load_cost_model(path)
    with pytest.raises(KnapSpecError, match=re.escape("nope.json")):
        load_cost_model(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(schema="something.else"), "schema"),
        (lambda o: o.pop("schema"), "schema"),
        (lambda o: o.update(version=2), "version"),
        (lambda o: o.update(version="1"), "version"),
        (lambda o: o.update(version=True), "version"),
        (lambda o: o.update(kind="quadratic"), "linear, roofline, table"),
        (lambda o: o.pop("kind"), "kind"),
        (lambda o: o.pop("params"), "params"),
        (lambda o: o.update(params=[1, 2]), "params"),
        (lambda o: o.update(meta="x"), "meta"),
        (lambda o: o["params"].pop("mlp_s"), "mlp_s"),
        (lambda o: o["params"].update(mlp_sec=1.0), "mlp_sec"),
        (lambda o: o["params"].update(head_s=-1.0), "head_s"),
        (lambda o: o["params"].update(attn_base_s=float("nan")), "attn_base_s"),
    ],
)
def test_load_rejects_malformed_linear_file(tmp_path, mutate, message):
    obj = _valid_obj("linear")
    mutate(obj)
    path = write_json(tmp_path, obj)
    with pytest.raises(KnapSpecError, match=message) as info:
        load_cost_model(path)
    assert str(path) in str(info.value)


def test_load_rejects_top_level_array(tmp_path):
    with pytest.raises(KnapSpecError, match="object"):
        load_cost_model(write_json(tmp_path, [1, 2, 3]))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.update(attention=[[1.0, 2.0]]), "attention"),
        (lambda p: p.update(mlp=[1.0]), "mlp"),
        (lambda p: p.update(contexts=[0, 1, "x"]), "contexts"),
        (lambda p: p.update(n_tokens=[0, 4, 8]), "n_tokens"),
        (lambda p: p.pop("overhead"), "overhead"),
    ],
)
def test_load_rejects_malformed_table_params(tmp_path, mutate, message):
    obj = _valid_obj("table")
    mutate(obj["params"])
    with pytest.raises(KnapSpecError, match=message):
        load_cost_model(write_json(tmp_path, obj))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["model"].pop("ffn_size"), "ffn_size"),
        (lambda p: p["model"].update(n_heads=-32), "n_heads"),
        (lambda p: p["hardware"].update(peak_flops=float("nan")), "peak_flops"),
        (lambda p: p["hardware"].update(turbo=True), "turbo"),
        (lambda p: p.update(hardware="abacus"), "abacus"),
        (lambda p: p.update(kv_dtype_bytes=0), "kv_dtype_bytes"),
        (lambda p: p.update(model=5), "DecoderSpec"),
    ],
)
def test_load_rejects_malformed_roofline_params(tmp_path, mutate, message):
    obj = _valid_obj("roofline")
    mutate(obj["params"])
    with pytest.raises(KnapSpecError, match=message):
        load_cost_model(write_json(tmp_path, obj))


# ----------------------------------------------------------------------------- atomic save
def test_save_leaves_no_temp_files_and_overwrites(tmp_path):
    save_cost_model(make_linear(), tmp_path / "a.json")
    save_cost_model(make_table(), tmp_path / "a.json")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
    assert isinstance(load_cost_model(tmp_path / "a.json"), TableCostModel)


def test_failed_save_keeps_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "a.json"
    save_cost_model(make_linear(), path)
    before = path.read_bytes()
    bad = make_linear()
    bad.meta["obj"] = object()  # not JSON-serialisable
    with pytest.raises(KnapSpecError, match="JSON"):
        save_cost_model(bad, path)
    bad.meta["obj"] = math.nan  # not strict JSON
    with pytest.raises(KnapSpecError):
        save_cost_model(bad, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_save_failing_mid_write_removes_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    save_cost_model(make_linear(), path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KnapSpecError, match=re.escape("a.json")):
        save_cost_model(make_table(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_save_converts_numpy_meta_and_respects_umask(tmp_path):
    model = make_linear()
    model.meta.update(threads=np.int64(2), times=np.array([1.0, 2.0]), ok=np.bool_(True))
    path = save_cost_model(model, tmp_path / "np.json")
    assert load_cost_model(path).meta == {**make_linear().meta, "threads": 2,
                                          "times": [1.0, 2.0], "ok": True}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_into_missing_directory_raises(tmp_path):
    with pytest.raises(KnapSpecError, match="cannot write"):
        save_cost_model(make_linear(), tmp_path / "no" / "such" / "dir.json")
    assert os.listdir(tmp_path) == []


def test_save_rejects_unregistered_model(tmp_path):
    class Unregistered(LinearCostModel):
        kind = "unregistered-test-kind"

    with pytest.raises(KnapSpecError, match="not registered"):
        save_cost_model(Unregistered(1, 1, 1, 1, 1), tmp_path / "u.json")
    assert os.listdir(tmp_path) == []
