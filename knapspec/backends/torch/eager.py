"""The eager PyTorch backend: a hand-written decoder forward over the HF model's weights.

The forward is written out as small module-level pure functions (gpt-fast style) so that a
later ``torch.compile`` backend can wrap the per-block callables unchanged:

* ``attention_block``: norm + attention + residual over a preallocated KV cache,
* ``mlp_block``: norm + gated MLP + residual,
* ``head``: final norm + LM head (``forward`` runs ``rms_norm`` and ``lm_head`` apart, as it
  keeps the final-norm states),
* ``attention_block_batched``: the attention block for ``S`` candidate states at once
  (the block oracle of the model-in-the-loop planner), reading but never writing the cache.

``forward`` calls them through the class attributes ``_attention_fn``, ``_mlp_fn``,
``_norm_fn`` and ``_head_fn``, which ``TorchCompileBackend`` replaces on its instances with
compiled versions of the same functions.

The Hugging Face model is used only as a bag of weights (nothing is copied) plus its rotary
embedding module, which is called once to tabulate cos/sin for every position up to
``max_context`` (so rope scaling variants come for free).  Skipping is an argument of
``forward``; the HF config is never touched.

Shapes: ``T`` tokens in a call, ``D`` hidden size, ``H`` query heads, ``KV`` key/value
heads, ``hd`` head dim, ``C`` cache capacity (``max_context``), ``L`` layers, ``V`` vocab,
``S`` candidate states (oracle).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ...blocks import BlockLayout
from ...errors import KnapSpecError, MissingDependencyError
from ..base import Backend

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise MissingDependencyError(
        "the torch backend needs torch and transformers; install them with "
        "`pip install 'knapspec[torch]'`"
    ) from exc

if TYPE_CHECKING:
    from .loading import LoadedModel

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # tokens per internal forward pass (bounds the causal mask and scores)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# GQA in the cached attention (``gqa_sdpa``): the g = H/KV query heads of a KV head are
# folded into SDPA's query axis, so the cache is read in place.  Measured on this project's
# 2-core AVX2 CPU, 1 thread, SmolLM2 shapes (H=9, KV=3, hd=64), median per SDPA call:
#   1 token at 2K context: fold 289 us, enable_gqa 333 us, repeat_interleave 2041 us
#   4 tokens at 2K context: fold 435 us, enable_gqa 624 us, repeat_interleave 2712 us
# (3-D inputs instead of 4-D: 435 / 1293 us, SDPA's math path.)


# ----------------------------------------------------------------------------- weights


class AttnConfig(NamedTuple):
    """Static hyper-parameters of an attention block."""

    n_heads: int  # H
    n_kv_heads: int  # KV
    head_dim: int  # hd
    eps: float  # RMSNorm epsilon of input_layernorm
    qk_eps: float  # RMSNorm epsilon of the per-head q/k norms (qwen3)
    scale: float  # softmax scale (hd ** -0.5)


class AttnWeights(NamedTuple):
    """One layer's attention sub-block weights (views of the HF parameters)."""

    norm: torch.Tensor  # [D] input_layernorm
    wq: torch.Tensor  # [H*hd, D]
    bq: torch.Tensor | None  # [H*hd] (qwen2)
    wk: torch.Tensor  # [KV*hd, D]
    bk: torch.Tensor | None  # [KV*hd]
    wv: torch.Tensor  # [KV*hd, D]
    bv: torch.Tensor | None  # [KV*hd]
    wo: torch.Tensor  # [D, H*hd]
    bo: torch.Tensor | None  # [D]
    q_norm: torch.Tensor | None  # [hd] per-head RMSNorm (qwen3)
    k_norm: torch.Tensor | None  # [hd]


class MLPWeights(NamedTuple):
    """One layer's MLP sub-block weights (views of the HF parameters)."""

    norm: torch.Tensor  # [D] post_attention_layernorm
    w_gate: torch.Tensor  # [F, D]
    b_gate: torch.Tensor | None  # [F]
    w_up: torch.Tensor  # [F, D]
    b_up: torch.Tensor | None  # [F]
    w_down: torch.Tensor  # [D, F]
    b_down: torch.Tensor | None  # [D]


# ----------------------------------------------------------------------------- the math


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF computes it (in float32, then back to the input dtype).

    x: [..., D], weight: [D] -> [..., D]
    """
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """x: [..., hd] -> [..., hd], (x1, x2) -> (-x2, x1) on the two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding.  x: [..., T, hd], cos/sin: [T, hd] -> [..., T, hd]."""
    return x * cos + rotate_half(x) * sin


def qkv(
    h: torch.Tensor,  # [..., T, D] normed states
    w: AttnWeights,
    cfg: AttnConfig,
    cos: torch.Tensor,  # [T, hd]
    sin: torch.Tensor,  # [T, hd]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project to heads, per-head norm (qwen3), RoPE.

    Returns q [..., H, T, hd], k [..., KV, T, hd], v [..., KV, T, hd].
    """
    lead = h.shape[:-1]  # (..., T)
    q = F.linear(h, w.wq, w.bq).view(*lead, cfg.n_heads, cfg.head_dim)  # [..., T, H, hd]
    k = F.linear(h, w.wk, w.bk).view(*lead, cfg.n_kv_heads, cfg.head_dim)  # [..., T, KV, hd]
    v = F.linear(h, w.wv, w.bv).view(*lead, cfg.n_kv_heads, cfg.head_dim)  # [..., T, KV, hd]
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, cfg.qk_eps)
    if w.k_norm is not None:
        k = rms_norm(k, w.k_norm, cfg.qk_eps)
    q = apply_rope(q.transpose(-2, -3), cos, sin)  # [..., H, T, hd]
    k = apply_rope(k.transpose(-2, -3), cos, sin)  # [..., KV, T, hd]
    return q, k, v.transpose(-2, -3)


def gqa_sdpa(
    q: torch.Tensor,  # [H, T, hd]
    k: torch.Tensor,  # [KV, S, hd] keys of positions 0..S-1
    v: torch.Tensor,  # [KV, S, hd]
    mask: torch.Tensor | None,  # [g*T, S] additive float from causal_mask, None when T == 1
    scale: float,
) -> torch.Tensor:
    """Grouped-query attention for one sequence -> [H, T, hd].

    The g = H / KV query heads sharing a KV head are folded into the query axis
    ([1, KV, g*T, hd]), so SDPA runs plain multi-head attention over the cache as it is:
    no repeat_interleave copy of K/V, no enable_gqa.  Inputs are 4-D because SDPA's fused
    CPU kernel wants 4-D; with 3-D inputs it falls back to the slower math path.
    """
    n_heads, t, hd = q.shape
    n_kv = k.shape[0]
    g = n_heads // n_kv
    qf = q.reshape(1, n_kv, g * t, hd)  # head h = kv*g + j, as HF's repeat_kv
    o = F.scaled_dot_product_attention(qf, k[None], v[None], attn_mask=mask, scale=scale)
    return o.view(n_heads, t, hd)  # [1, KV, g*T, hd] -> [H, T, hd]


def attention_block(
    x: torch.Tensor,  # [T, D] residual stream of positions start..start+T-1
    w: AttnWeights,
    cfg: AttnConfig,
    k_cache: torch.Tensor,  # [KV, C, hd] this layer's keys (written in place)
    v_cache: torch.Tensor,  # [KV, C, hd] this layer's values (written in place)
    cos: torch.Tensor,  # [T, hd] rope rows of positions start..start+T-1
    sin: torch.Tensor,  # [T, hd]
    start: int,  # position of x[0]; the cache holds valid entries for 0..start-1
    mask: torch.Tensor | None,  # [g*T, start+T] from causal_mask, None when T == 1
) -> torch.Tensor:
    """Norm + attention over the cache + residual; writes K/V of the T tokens -> [T, D]."""
    t = x.shape[0]
    end = start + t
    q, k, v = qkv(rms_norm(x, w.norm, cfg.eps), w, cfg, cos, sin)  # [H,T,hd] [KV,T,hd] x2
    k_cache[:, start:end] = k
    v_cache[:, start:end] = v
    o = gqa_sdpa(q, k_cache[:, :end], v_cache[:, :end], mask, cfg.scale)  # [H, T, hd]
    o = o.transpose(0, 1).reshape(t, cfg.n_heads * cfg.head_dim)  # [T, H*hd]
    return x + F.linear(o, w.wo, w.bo)


def causal_mask(start: int, t: int, n_rep: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask of T queries at positions start..start+T-1 over keys 0..start+T-1,
    repeated for the g = n_rep query heads folded into the query axis -> [g*T, start+T]."""
    end = start + t
    allowed = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)  # [T, end]
    mask = torch.zeros(t, end, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return mask.repeat(n_rep, 1)


def candidate_mask(n_cand: int, n_rep: int, t: int, t0: int) -> torch.Tensor:
    """Mask of the folded candidate attention -> [S*g*T, t0 + S*T] bool (True = attend).

    Query row (s, j, i) -- candidate s, query head j of its KV group, token i -- sees every
    prefix key and the own keys (s, i') of its candidate with i' <= i.
    """
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # [T, T] (i, i')
    same = torch.eye(n_cand, dtype=torch.bool)  # [S, S] (s, s')
    own = (same[:, None, :, None] & causal[None, :, None, :]).reshape(n_cand, t, n_cand * t)
    prefix = torch.ones(n_cand, t, t0, dtype=torch.bool)
    mask = torch.cat([prefix, own], dim=-1)  # [S, T, t0 + S*T]
    return mask[:, None].expand(n_cand, n_rep, t, t0 + n_cand * t).reshape(n_cand * n_rep * t, -1)


def attention_block_batched(
    x: torch.Tensor,  # [S, T, D] candidate states of positions t0..t0+T-1
    w: AttnWeights,
    cfg: AttnConfig,
    k_prefix: torch.Tensor,  # [KV, t0, hd] cached keys of positions < t0 (shared by all S)
    v_prefix: torch.Tensor,  # [KV, t0, hd]
    cos: torch.Tensor,  # [T, hd] rope rows of positions t0..t0+T-1
    sin: torch.Tensor,  # [T, hd]
    mask: torch.Tensor,  # [S*g*T, t0 + S*T] bool or additive float, see candidate_mask
) -> torch.Tensor:
    """The attention block on S candidates at once, reading (never writing) the cache.

    Each candidate's T tokens attend to the shared prefix plus, causally, their own K/V.
    One SDPA call per block: for each KV head, the queries of all S candidates (and the g
    query heads of the group) are folded into the query axis, the keys are the prefix
    (once, not S times) followed by the S*T candidates' own keys, and ``mask`` keeps each
    candidate to the prefix and its own keys.  Returns [S, T, D].
    """
    s, t, _ = x.shape
    n_kv, _, hd = k_prefix.shape
    g = cfg.n_heads // n_kv
    q, k, v = qkv(rms_norm(x, w.norm, cfg.eps), w, cfg, cos, sin)  # [S,H,T,hd] [S,KV,T,hd]
    qf = q.view(s, n_kv, g, t, hd).transpose(0, 1).reshape(1, n_kv, s * g * t, hd)
    # keys/values: the prefix once, then every candidate's own T -> [KV, t0 + S*T, hd]
    kf = torch.cat([k_prefix, k.transpose(0, 1).reshape(n_kv, s * t, hd)], dim=1)
    vf = torch.cat([v_prefix, v.transpose(0, 1).reshape(n_kv, s * t, hd)], dim=1)
    o = F.scaled_dot_product_attention(qf, kf[None], vf[None], attn_mask=mask, scale=cfg.scale)
    o = o.view(n_kv, s, g, t, hd).transpose(0, 1)  # [S, KV, g, T, hd]
    o = o.reshape(s, cfg.n_heads, t, hd).transpose(1, 2).reshape(s, t, cfg.n_heads * hd)
    return x + F.linear(o, w.wo, w.bo)


def mlp_block(
    x: torch.Tensor,  # [..., T, D]
    w: MLPWeights,
    eps: float,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Norm + gated MLP (down(act(gate(h)) * up(h))) + residual -> [..., T, D]."""
    h = rms_norm(x, w.norm, eps)
    return x + F.linear(
        act(F.linear(h, w.w_gate, w.b_gate)) * F.linear(h, w.w_up, w.b_up), w.w_down, w.b_down
    )


def head(
    x: torch.Tensor,  # [..., D]
    norm: torch.Tensor,  # [D] final norm weight
    eps: float,
    w_out: torch.Tensor,  # [V, D] LM head (possibly tied to the embedding)
    b_out: torch.Tensor | None,  # [V]
) -> torch.Tensor:
    """Final norm + LM head -> [..., V]."""
    return F.linear(rms_norm(x, norm, eps), w_out, b_out)


def lm_head(
    h: torch.Tensor,  # [..., D] final-norm states
    w_out: torch.Tensor,  # [V, D]
    b_out: torch.Tensor | None,  # [V]
) -> torch.Tensor:
    """LM head alone, float32 logits -> [..., V]."""
    return F.linear(h, w_out, b_out).float()


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


# ----------------------------------------------------------------------------- backend


_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<|endoftext|>")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype or its name (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise KnapSpecError(
            f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})"
        ) from None


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if int(threads) < 1:
            raise KnapSpecError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


def _norm_eps(module: Any, default: float) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", default)))


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
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


class TorchEagerBackend(Backend):
    """Self-speculative decoding backend on eager PyTorch (CPU), one sequence, one KV cache.

    Args:
        model: ``None`` (the default SmolLM2), a path/spec for ``knapspec.backends.torch.loading``, or a
            ``LoadedModel``.  For a bare HF model object use :meth:`from_hf`.
        dtype: parameter dtype (or its name) when loading (default float32); for a given
            model it must match the model's dtype (``None``: take the model's).
        threads: ``torch.set_num_threads(threads)`` if given.
        max_context: KV cache capacity in tokens (default: the model's
            ``max_position_embeddings``, capped by a sliding window if the model has one).
        capture_tokens: positions kept by ``forward(..., capture=True)`` for the oracle.
    """

    name = "torch"

    # The per-block callables of ``forward``; a subclass may hold compiled versions of the
    # same pure functions on the instance (``TorchCompileBackend``).
    _attention_fn = staticmethod(attention_block)
    _mlp_fn = staticmethod(mlp_block)
    _norm_fn = staticmethod(rms_norm)
    _head_fn = staticmethod(lm_head)

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike[str] | None = None,
        dtype: torch.dtype | str | None = torch.float32,
        threads: int | None = None,
        max_context: int | None = None,
        capture_tokens: int = 8,
    ) -> None:
        from .loading import LoadedModel, load_torch_model

        dtype = parse_dtype(dtype)
        _set_threads(threads)
        if isinstance(model, LoadedModel):
            loaded = model
        elif model is None or isinstance(model, (str, os.PathLike)):
            loaded = load_torch_model(model, dtype=dtype)
        else:
            raise KnapSpecError(
                f"model must be None, a path or a LoadedModel, got {type(model).__name__}; "
                "use TorchEagerBackend.from_hf(model, tokenizer) for a transformers model"
            )
        self.loaded = loaded
        key = loaded.cache_path.name if loaded.cache_path is not None else loaded.source.path.name
        self._setup(
            loaded.model,
            loaded.tokenizer,
            dtype,
            max_context,
            capture_tokens,
            model_name=loaded.source.path.name,
            model_key=key,
        )

    @classmethod
    def from_hf(
        cls,
        model: Any,
        tokenizer: Any = None,
        *,
        dtype: torch.dtype | None = None,
        threads: int | None = None,
        max_context: int | None = None,
        capture_tokens: int = 8,
    ) -> TorchEagerBackend:
        """A backend over a ``transformers`` causal-LM object (tokenizer optional)."""
        self = cls.__new__(cls)
        self._init_from_hf(model, tokenizer, dtype, threads, max_context, capture_tokens)
        return self

    def _init_from_hf(
        self,
        model: Any,
        tokenizer: Any,
        dtype: torch.dtype | None,
        threads: int | None,
        max_context: int | None,
        capture_tokens: int,
    ) -> None:
        """``from_hf``'s initialisation of a bare instance (subclasses add their own)."""
        _set_threads(threads)
        self.loaded = None
        name = str(getattr(model.config, "_name_or_path", "") or "")
        cfg = model.config
        fallback = (
            f"{getattr(cfg, 'model_type', '?')}-L{getattr(cfg, 'num_hidden_layers', '?')}"
            f"-D{getattr(cfg, 'hidden_size', '?')}"
        )
        self._setup(
            model,
            tokenizer,
            dtype,
            max_context,
            capture_tokens,
            model_name=name or fallback,
            model_key=(name or fallback).replace("/", "_"),
        )

    # ------------------------------------------------------------------ setup
    def _setup(
        self,
        model: Any,
        tokenizer: Any,
        dtype: torch.dtype | None,
        max_context: int | None,
        capture_tokens: int,
        model_name: str,
        model_key: str,
    ) -> None:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KnapSpecError(
                f"unsupported architecture {model_type!r} for the torch backend "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        body = model.model
        param = next(model.parameters())
        if dtype is not None and param.dtype != dtype:
            raise KnapSpecError(
                f"the model's parameters are {param.dtype}, not the requested {dtype}; "
                "load it in that dtype or pass dtype=None"
            )
        if param.device.type != "cpu":
            raise KnapSpecError(
                f"the torch eager backend runs on CPU; the model is on {param.device}"
            )
        if capture_tokens < 1:
            raise KnapSpecError(f"capture_tokens must be >= 1, got {capture_tokens}")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.model_type = model_type
        self.model_name = model_name
        self.model_key = model_key
        self.dtype = param.dtype
        self.capture_tokens = int(capture_tokens)

        layers = list(body.layers)
        n_layers = len(layers)
        a0 = layers[0].self_attn
        n_heads = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
        eps = _norm_eps(layers[0].input_layernorm, float(config.rms_norm_eps))
        q_norm = getattr(a0, "q_norm", None)
        qk_eps = eps if q_norm is None else _norm_eps(q_norm, eps)
        scale = float(getattr(a0, "scaling", head_dim**-0.5))
        self.attn_cfg = AttnConfig(n_heads, n_kv, head_dim, eps, qk_eps, scale)
        self.eps = eps
        self.dim = int(config.hidden_size)

        def opt(module: Any, attr: str) -> torch.Tensor | None:
            sub = getattr(module, attr, None)
            return None if sub is None else sub.weight.detach()

        def bias(linear: Any) -> torch.Tensor | None:
            return None if linear.bias is None else linear.bias.detach()

        self.attn_w: list[AttnWeights] = []
        self.mlp_w: list[MLPWeights] = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            self.attn_w.append(AttnWeights(
                layer.input_layernorm.weight.detach(),
                a.q_proj.weight.detach(), bias(a.q_proj),
                a.k_proj.weight.detach(), bias(a.k_proj),
                a.v_proj.weight.detach(), bias(a.v_proj),
                a.o_proj.weight.detach(), bias(a.o_proj),
                opt(a, "q_norm"), opt(a, "k_norm"),
            ))  # fmt: skip
            self.mlp_w.append(MLPWeights(
                layer.post_attention_layernorm.weight.detach(),
                m.gate_proj.weight.detach(), bias(m.gate_proj),
                m.up_proj.weight.detach(), bias(m.up_proj),
                m.down_proj.weight.detach(), bias(m.down_proj),
            ))  # fmt: skip
        act_name = str(getattr(config, "hidden_act", "silu"))
        self.act = _ACTIVATIONS.get(act_name) or layers[0].mlp.act_fn
        self.embed_w = model.get_input_embeddings().weight.detach()  # [V, D]
        out = model.get_output_embeddings()
        self.out_w = out.weight.detach()  # [V, D]
        self.out_b = None if getattr(out, "bias", None) is None else out.bias.detach()
        self.norm_w = body.norm.weight.detach()  # [D]
        self.norm_eps = _norm_eps(body.norm, eps)

        # ---- context: position limit, sliding window
        limit = int(getattr(config, "max_position_embeddings", 0) or 8192)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is not None and model_type != "mistral" and layer_types is not None:
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
        self.max_context = max_context

        # ---- RoPE tables for every position, from the HF rotary module (rope scaling incl.)
        rope_type = str(getattr(body.rotary_emb, "rope_type", "default"))
        if "dynamic" in rope_type:
            log.warning(
                "rope type %r: cos/sin are tabulated once for %d positions, so the dynamic "
                "scaling of the longest context applies to all positions",
                rope_type,
                max_context,
            )
        with torch.inference_mode():
            pos = torch.arange(max_context).unsqueeze(0)  # [1, C]
            dummy = torch.zeros(1, dtype=self.dtype)
            cos, sin = body.rotary_emb(dummy, pos)  # [1, C, hd] each
            self.cos = cos[0].to(self.dtype).contiguous()  # [C, hd]
            self.sin = sin[0].to(self.dtype).contiguous()  # [C, hd]
            # ---- the KV cache, preallocated: [L, KV, C, hd]
            shape = (n_layers, n_kv, max_context, head_dim)
            self.k_cache = torch.zeros(shape, dtype=self.dtype)
            self.v_cache = torch.zeros(shape, dtype=self.dtype)

        self.layout = BlockLayout(n_layers)
        self.vocab_size = int(self.out_w.shape[0])
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._length = 0
        self._ids: list[int | None] = []  # token per cached position (None: written by a draft)
        self._cap: torch.Tensor | None = None  # [2L+1, Tc, D] captured boundary states
        self._cap_start = 0  # position of _cap[:, 0]
        self._final: torch.Tensor | None = None  # [n, D] final-norm states of the last call
        log.info(
            "torch backend: %s (%s), %d layers, D=%d, H=%d, KV=%d, hd=%d, V=%d, ctx %d, "
            "KV cache %.0f MiB, %d threads",
            model_name,
            model_type,
            n_layers,
            self.dim,
            n_heads,
            n_kv,
            head_dim,
            self.vocab_size,
            max_context,
            2 * self.k_cache.numel() * self.k_cache.element_size() / 2**20,
            torch.get_num_threads(),
        )

    # ------------------------------------------------------------------ tokenizer
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise KnapSpecError(
                "this backend has no tokenizer (built with from_hf(model, tokenizer=None)); "
                "pass token ids instead of text"
            )
        return self.tokenizer

    def encode(self, text: str, chat: bool = True) -> list[int]:
        tok = self._require_tokenizer()
        if chat:
            from .loading import apply_chat_template

            return apply_chat_template(tok, text)
        return [int(i) for i in tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode([int(i) for i in ids], skip_special_tokens=True)

    # ------------------------------------------------------------------ KV cache
    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._length = 0
        self._ids = []
        self._cap = None
        self._final = None

    def cached_tokens(self) -> list[int | None]:
        return self._ids

    def rollback(self, length: int) -> None:
        length = int(length)
        if not 0 <= length <= self._length:
            raise KnapSpecError(f"cannot roll back to {length}: the cache holds {self._length}")
        self._length = length
        del self._ids[length:]
        if self._cap is not None:
            keep = length - self._cap_start
            if keep <= 0:
                self._cap = None
            elif keep < self._cap.shape[1]:
                self._cap = self._cap[:, :keep]

    # ------------------------------------------------------------------ compute
    def _check_mask(self, mask: np.ndarray | None) -> np.ndarray | None:
        """``[2L]`` bool skip mask, or None for the full model.  Pinned blocks may be skipped
        here (profiling skips every block); planners enforce pinning."""
        if mask is None:
            return None
        arr = self.layout.validate_mask(mask, allow_pinned=True)
        return arr if arr.any() else None

    def forward(
        self,
        tokens: Sequence[int],
        mask: np.ndarray | None = None,
        *,
        capture: bool = False,
        all_logits: bool = True,
    ) -> np.ndarray:
        ids = [int(t) for t in tokens]
        n = len(ids)
        if n == 0:
            raise KnapSpecError("forward needs at least one token")
        n_embed = self.embed_w.shape[0]
        if min(ids) < 0 or max(ids) >= n_embed:
            bad = next(i for i in ids if not 0 <= i < n_embed)
            raise KnapSpecError(f"token id {bad} out of range [0, {n_embed})")
        skip = self._check_mask(mask)
        if capture and skip is not None:
            raise KnapSpecError("capture=True needs the full model (mask=None)")
        start = self._length
        if start + n > self.max_context:
            raise KnapSpecError(
                f"KV cache overflow: {start} cached + {n} new tokens > max_context "
                f"{self.max_context}"
            )
        with torch.inference_mode():
            finals, logits = [], []
            for a in range(0, n, PREFILL_CHUNK):  # long prompts in chunks: bounded memory
                chunk = ids[a : a + PREFILL_CHUNK]
                wanted = capture and a + len(chunk) > n - self.capture_tokens
                h = self._forward(chunk, start + a, skip, wanted)  # [t, D]
                finals.append(h)
                if all_logits:
                    logits.append(self._head_fn(h, self.out_w, self.out_b))  # [t, V]
            h = finals[0] if len(finals) == 1 else torch.cat(finals)  # [n, D]
            if not all_logits:
                logits = [self._head_fn(h[-1:], self.out_w, self.out_b)]  # [1, V]
            out = (logits[0] if len(logits) == 1 else torch.cat(logits)).numpy()
        self._final = h
        self._length = start + n
        del self._ids[start:]
        self._ids.extend(ids if skip is None else [None] * n)  # None: partial (draft) KV
        return out

    def _forward(
        self, ids: list[int], start: int, skip: np.ndarray | None, capture: bool
    ) -> torch.Tensor:
        """Blocks over ``ids`` at positions start..; returns final-norm states [T, D]."""
        n = len(ids)
        end = start + n
        x = F.embedding(torch.tensor(ids, dtype=torch.long), self.embed_w)  # [T, D]
        cos, sin = self.cos[start:end], self.sin[start:end]  # [T, hd]
        cfg, act, eps = self.attn_cfg, self.act, self.eps
        attention, mlp = self._attention_fn, self._mlp_fn
        mask = None  # one query sees every cached key: no mask
        if n > 1:  # query i (position start+i) sees keys 0..start+i; built once for all layers
            mask = causal_mask(start, n, cfg.n_heads // cfg.n_kv_heads, self.dtype)
        keep = min(n, self.capture_tokens)
        # boundary states of the last `keep` tokens, each [keep, D] (copied when a slice, so
        # a long prefill does not keep every block's [T, D] activations alive)
        grab = (lambda t: t) if keep == n else (lambda t: t[n - keep :].clone())
        states = [grab(x)] if capture else None
        skipped = skip.tolist() if skip is not None else None
        for i in range(self.layout.n_layers):
            if skipped is None or not skipped[2 * i]:
                x = attention(
                    x, self.attn_w[i], cfg, self.k_cache[i], self.v_cache[i], cos, sin, start, mask
                )
            if states is not None:
                states.append(grab(x))
            if skipped is None or not skipped[2 * i + 1]:
                x = mlp(x, self.mlp_w[i], eps, act)
            if states is not None:
                states.append(grab(x))
        if states is not None:
            self._store_capture(torch.stack(states), end - keep)
        return self._norm_fn(x, self.norm_w, self.norm_eps)  # [T, D]

    def _store_capture(self, new: torch.Tensor, first: int) -> None:
        """Append captured states ``new`` [2L+1, k, D] of positions first..first+k-1."""
        cap = self._cap
        if cap is not None and self._cap_start + cap.shape[1] == first:  # contiguous: extend
            new = torch.cat([cap, new], dim=1)
            first = self._cap_start
        drop = new.shape[1] - self.capture_tokens
        if drop > 0:  # keep the last capture_tokens positions
            new = new[:, drop:]
            first += drop
        self._cap = new
        self._cap_start = first

    def final_hidden(self) -> torch.Tensor | None:
        """Final-norm hidden states ``[n, D]`` of the last forward call."""
        return self._final

    # ------------------------------------------------------------------ planning support
    def block_oracle(self) -> TorchBlockOracle:
        """Oracle over the captured positions (the last tokens run with ``capture=True``).

        Valid until the cache is rolled back below the first captured position.
        """
        if self._cap is None:
            raise KnapSpecError(
                "nothing captured: run forward(..., capture=True) (or prefill(capture=True)) "
                "before asking for a block oracle"
            )
        return TorchBlockOracle(self, self._cap, self._cap_start)

    # ------------------------------------------------------------------ measurement
    def time_head(self, n_tokens: int, repeats: int) -> float:
        """Median seconds of final norm + LM head on ``n_tokens`` states."""
        if n_tokens < 1 or repeats < 1:
            raise KnapSpecError(f"n_tokens and repeats must be >= 1, got {n_tokens}, {repeats}")
        with torch.inference_mode():
            x = torch.randn(n_tokens, self.dim, generator=torch.Generator().manual_seed(0))
            x = x.to(self.dtype)
            head(x, self.norm_w, self.norm_eps, self.out_w, self.out_b)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                head(x, self.norm_w, self.norm_eps, self.out_w, self.out_b).float().numpy()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_name,
            "model_key": self.model_key,
            "model_type": self.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "max_context": self.max_context,
        }


class TorchBlockOracle:
    """``BlockOracle`` over the captured positions ``t0 .. t0+T-1`` of a ``TorchEagerBackend``.

    ``apply_block`` runs one block on ``S`` candidate states in one batched call; attention
    blocks read the backend's KV cache at positions ``< t0`` and never write it.
    """

    def __init__(self, backend: TorchEagerBackend, states: torch.Tensor, t0: int) -> None:
        self.backend = backend
        self.layout = backend.layout
        self._states = states  # [2L+1, T, D]
        self.t0 = t0
        self.n_tokens = int(states.shape[1])
        end = t0 + self.n_tokens
        self._cos = backend.cos[t0:end]  # [T, hd]
        self._sin = backend.sin[t0:end]  # [T, hd]
        self._mask: tuple[int, torch.Tensor] | None = None  # (S, candidate_mask for S)

    def boundary_states(self) -> torch.Tensor:
        """``[2L+1, T, D]``: index 0 = embeddings, ``b+1`` = after block ``b``."""
        return self._states

    def apply_block(self, block: int, states: torch.Tensor) -> torch.Tensor:
        """Run block ``block`` on ``states`` ``[S, T, D]`` -> ``[S, T, D]`` (tensor or array)."""
        be = self.backend
        states = torch.as_tensor(states, dtype=self._states.dtype)
        block = int(block)
        if not 0 <= block < self.layout.n_blocks:
            raise KnapSpecError(f"block {block} out of range (0..{self.layout.n_blocks - 1})")
        if states.dim() != 3 or states.shape[1:] != self._states.shape[1:]:
            raise KnapSpecError(
                f"states must have shape [S, {self.n_tokens}, {be.dim}], got {tuple(states.shape)}"
            )
        layer = block // 2
        with torch.inference_mode():
            if block % 2 == 1:
                return mlp_block(states, be.mlp_w[layer], be.eps, be.act)
            n_cand = states.shape[0]
            if self._mask is None or self._mask[0] != n_cand:  # built once per S
                n_rep = be.attn_cfg.n_heads // be.attn_cfg.n_kv_heads
                allowed = candidate_mask(n_cand, n_rep, self.n_tokens, self.t0)
                additive = torch.zeros(allowed.shape, dtype=states.dtype)  # SDPA would convert
                self._mask = (n_cand, additive.masked_fill_(~allowed, float("-inf")))
            return attention_block_batched(
                states, be.attn_w[layer], be.attn_cfg,
                be.k_cache[layer, :, : self.t0], be.v_cache[layer, :, : self.t0],
                self._cos, self._sin, self._mask[1],
            )  # fmt: skip

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: ``[S, T, D] -> [S, T, V]`` (tensor or array in)."""
        be = self.backend
        states = torch.as_tensor(states, dtype=self._states.dtype)
        with torch.inference_mode():
            return head(states, be.norm_w, be.norm_eps, be.out_w, be.out_b)
