"""A ``transformers`` causal LM seen as the block functions' inputs.

``read_weights`` takes views (nothing is copied) of the model's parameters as the
``AttnWeights`` / ``MLPWeights`` tuples of ``blocks``; ``context_size`` decides the KV cache
capacity from the position limit and sliding window; ``rope_tables`` tabulates cos/sin for
every position once with the model's own rotary module (so rope scaling variants come for
free); ``eos_ids`` collects every end-of-sequence id.  The HF config is never modified.
``resolve_device`` and ``resolve_dtype`` turn the ``device`` / ``dtype`` options (``auto``
included) into what the backend runs on, with one-line errors for what this machine lacks.

Shapes: ``D`` hidden size, ``hd`` head dim, ``C`` positions, ``V`` vocab, ``L`` layers.
"""

from __future__ import annotations

import logging
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import KnapSpecError
from ..sources import SUPPORTED_ARCHITECTURES
from .blocks import ACTIVATIONS, AttnConfig, AttnWeights, MLPWeights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<|endoftext|>")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype or its name (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise KnapSpecError(
            f"unknown dtype {dtype!r} (expected auto or one of {', '.join(DTYPES)})"
        ) from None


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """``dtype`` as a ``torch.dtype``; ``"auto"`` is bfloat16 on CUDA and float32 elsewhere.

    ``None`` stays ``None`` (the caller takes the model's own dtype).
    """
    if isinstance(dtype, str) and dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def resolve_device(
    device: torch.device | str | None = "auto", *, cuda_count: int | None = None
) -> torch.device:
    """The ``torch.device`` a backend runs on, checked against what this machine has.

    Args:
        device: ``"auto"`` (or ``None``: CUDA device 0 when CUDA is available, else the
            CPU), ``"cpu"``, ``"cuda"`` (= ``cuda:0``) or ``"cuda:N"``, or a ``torch.device``.
        cuda_count: CUDA devices visible (default: asks torch; tests pass a number).

    Raises ``KnapSpecError`` naming the device for a malformed name, for CUDA without CUDA,
    and for an index beyond the visible devices.
    """
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if cuda_count > 0 else torch.device("cpu")
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", text)
    if m is None:
        raise KnapSpecError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)")
    if text == "cpu":
        return torch.device("cpu")
    index = int(m.group(1) or 0)
    if cuda_count == 0:
        why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise KnapSpecError(
            f"device {text!r} requested but CUDA is not available ({why}; torch "
            f"{torch.__version__}); use --device cpu or auto"
        )
    if index >= cuda_count:
        raise KnapSpecError(
            f"device {text!r} requested but only {cuda_count} CUDA device(s) are visible "
            f"(cuda:0..cuda:{cuda_count - 1})"
        )
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device`` for provenance: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or platform.machine() or "cpu"


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (must be >= 1)."""
    if threads is not None:
        if int(threads) < 1:
            raise KnapSpecError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


def check_model(model: Any, dtype: torch.dtype | None, device: torch.device | None = None) -> str:
    """Refuse what the torch backend cannot run; returns ``config.model_type``.

    Checks the architecture, that the parameters have ``dtype`` (when given) and all lie on
    one device, ``device`` when given (default: wherever the first parameter is).
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KnapSpecError(
            f"unsupported architecture {model_type!r} for the torch backend "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    param = next(model.parameters())
    if dtype is not None and param.dtype != dtype:
        raise KnapSpecError(
            f"the model's parameters are {param.dtype}, not the requested {dtype}; "
            "load it in that dtype or pass dtype=None"
        )
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise KnapSpecError(
            "the model's parameters are spread over "
            f"{', '.join(sorted(map(str, devices)))}; the torch backend needs them on one device"
        )
    if device is not None and param.device != device:
        raise KnapSpecError(
            f"the model is on {param.device}, not the requested device {device}; "
            f"move it with model.to({str(device)!r}) or pass device=None"
        )
    return str(model_type)


def _norm_eps(module: Any, default: float) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", default)))


@dataclass(frozen=True)
class ModelWeights:
    """Every tensor the forward reads, as views of the HF parameters (``L`` layers)."""

    attn_cfg: AttnConfig
    eps: float  # RMSNorm epsilon of the MLP blocks' norm
    dim: int  # D
    attn: list[AttnWeights]  # [L]
    mlp: list[MLPWeights]  # [L]
    act: Callable[[torch.Tensor], torch.Tensor]  # the MLP's activation
    embed: torch.Tensor  # [V, D]
    out: torch.Tensor  # [V, D] LM head (possibly tied to embed)
    out_bias: torch.Tensor | None  # [V]
    norm: torch.Tensor  # [D] final norm weight
    norm_eps: float


def _layer_weights(layer: Any) -> tuple[AttnWeights, MLPWeights]:
    """One decoder layer's two blocks as weight tuples (views, no copies)."""

    def opt(module: Any, attr: str) -> torch.Tensor | None:
        sub = getattr(module, attr, None)
        return None if sub is None else sub.weight.detach()

    def bias(linear: Any) -> torch.Tensor | None:
        return None if linear.bias is None else linear.bias.detach()

    a, m = layer.self_attn, layer.mlp
    attn = AttnWeights(
        layer.input_layernorm.weight.detach(),
        a.q_proj.weight.detach(), bias(a.q_proj),
        a.k_proj.weight.detach(), bias(a.k_proj),
        a.v_proj.weight.detach(), bias(a.v_proj),
        a.o_proj.weight.detach(), bias(a.o_proj),
        opt(a, "q_norm"), opt(a, "k_norm"),
    )  # fmt: skip
    mlp = MLPWeights(
        layer.post_attention_layernorm.weight.detach(),
        m.gate_proj.weight.detach(), bias(m.gate_proj),
        m.up_proj.weight.detach(), bias(m.up_proj),
        m.down_proj.weight.detach(), bias(m.down_proj),
    )  # fmt: skip
    return attn, mlp


def read_weights(model: Any) -> ModelWeights:
    """The block functions' weights and hyper-parameters of a Llama-like HF causal LM."""
    config, body = model.config, model.model
    layers = list(body.layers)
    a0 = layers[0].self_attn
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    eps = _norm_eps(layers[0].input_layernorm, float(config.rms_norm_eps))
    q_norm = getattr(a0, "q_norm", None)
    qk_eps = eps if q_norm is None else _norm_eps(q_norm, eps)
    scale = float(getattr(a0, "scaling", head_dim**-0.5))
    pairs = [_layer_weights(layer) for layer in layers]
    out = model.get_output_embeddings()
    act_name = str(getattr(config, "hidden_act", "silu"))
    return ModelWeights(
        attn_cfg=AttnConfig(n_heads, n_kv, head_dim, eps, qk_eps, scale),
        eps=eps,
        dim=int(config.hidden_size),
        attn=[p[0] for p in pairs],
        mlp=[p[1] for p in pairs],
        act=ACTIVATIONS.get(act_name) or layers[0].mlp.act_fn,
        embed=model.get_input_embeddings().weight.detach(),
        out=out.weight.detach(),
        out_bias=None if getattr(out, "bias", None) is None else out.bias.detach(),
        norm=body.norm.weight.detach(),
        norm_eps=_norm_eps(body.norm, eps),
    )


def context_size(config: Any, max_context: int | None) -> int:
    """KV cache capacity in tokens: ``max_context``, or the model's position limit capped by
    its sliding window.  Refuses a capacity beyond the window (full attention only)."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 8192)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and config.model_type != "mistral" and layer_types is not None:
        window = window if "sliding_attention" in layer_types else None
    if max_context is None:
        max_context = limit if window is None else min(limit, int(window))
    max_context = int(max_context)
    if max_context < 1:
        raise KnapSpecError(f"max_context must be >= 1, got {max_context}")
    if window is not None and max_context > int(window):
        raise KnapSpecError(
            f"max_context {max_context} exceeds the model's sliding window {window}; "
            "the torch backend implements full attention only"
        )
    if max_context > limit:
        log.warning("max_context %d exceeds max_position_embeddings %d", max_context, limit)
    return max_context


def rope_tables(
    rotary_emb: Any, n_positions: int, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[C, hd]`` of positions ``0..C-1`` from the model's rotary module, on
    ``device`` (default: the CPU; the module's buffers must be there too)."""
    rope_type = str(getattr(rotary_emb, "rope_type", "default"))
    if "dynamic" in rope_type:
        log.warning(
            "rope type %r: cos/sin are tabulated once for %d positions, so the dynamic "
            "scaling of the longest context applies to all positions",
            rope_type,
            n_positions,
        )
    with torch.inference_mode():
        pos = torch.arange(n_positions, device=device).unsqueeze(0)  # [1, C]
        cos, sin = rotary_emb(torch.zeros(1, dtype=dtype, device=device), pos)  # [1, C, hd]
        return cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every end-of-sequence id the generation config, config and tokenizer know of."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if value is None:
            return
        for i in value if isinstance(value, (list, tuple, set)) else [value]:
            if i is not None and int(i) >= 0:
                ids.add(int(i))

    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(getattr(model.config, "eos_token_id", None))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        template = str(getattr(tokenizer, "chat_template", None) or "")
        special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        for tok in _END_TOKENS:  # end-of-turn / end-of-text tokens the tokenizer knows
            if tok in vocab and (tok in template or tok in special):
                ids.add(int(vocab[tok]))
    return frozenset(ids)
