"""The decoder's math as small pure functions over plain tensors (gpt-fast style).

Each function is one piece of a Llama-like decoder, so the eager backend calls them and the
``torch-compile`` backend compiles the very same functions:

* ``attention_block``: norm + attention + residual over a preallocated KV cache,
* ``mlp_block``: norm + gated MLP + residual,
* ``rms_norm`` and ``lm_head``: the final norm and the LM head (``head`` is both),
* ``attention_block_batched``: the attention block for ``S`` candidate states at once
  (the block oracle of the model-in-the-loop planners), reading but never writing the cache.

Weights come as the ``AttnWeights`` / ``MLPWeights`` tuples of views of the Hugging Face
parameters (``weights.read_weights``); nothing here knows of ``transformers``.

Shapes: ``T`` tokens in a call, ``D`` hidden size, ``H`` query heads, ``KV`` key/value
heads, ``hd`` head dim, ``C`` cache capacity, ``V`` vocab, ``S`` candidate states.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

# GQA in the cached attention (``gqa_sdpa``): the g = H/KV query heads of a KV head are
# folded into SDPA's query axis, so the cache is read in place.  Measured on this project's
# 2-core AVX2 CPU, 1 thread, SmolLM2 shapes (H=9, KV=3, hd=64), median per SDPA call:
#   1 token at 2K context: fold 289 us, enable_gqa 333 us, repeat_interleave 2041 us
#   4 tokens at 2K context: fold 435 us, enable_gqa 624 us, repeat_interleave 2712 us
# (3-D inputs instead of 4-D: 435 / 1293 us, SDPA's math path.)


#: a linear map x [..., K], w [N, K], b [N] or None -> [..., N]: ``F.linear``, or the
#: ``torch-compile`` backend's ``prepack.linear`` (prepacked oneDNN weights on the CPU)
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

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
    linear: Linear = F.linear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project to heads, per-head norm (qwen3), RoPE.

    Returns q [..., H, T, hd], k [..., KV, T, hd], v [..., KV, T, hd].
    """
    lead = h.shape[:-1]  # (..., T)
    q = linear(h, w.wq, w.bq).view(*lead, cfg.n_heads, cfg.head_dim)  # [..., T, H, hd]
    k = linear(h, w.wk, w.bk).view(*lead, cfg.n_kv_heads, cfg.head_dim)  # [..., T, KV, hd]
    v = linear(h, w.wv, w.bv).view(*lead, cfg.n_kv_heads, cfg.head_dim)  # [..., T, KV, hd]
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
    linear: Linear = F.linear,
) -> torch.Tensor:
    """Norm + attention over the cache + residual; writes K/V of the T tokens -> [T, D]."""
    t = x.shape[0]
    end = start + t
    q, k, v = qkv(rms_norm(x, w.norm, cfg.eps), w, cfg, cos, sin, linear)  # [H,T,hd] [KV,T,hd]
    k_cache[:, start:end] = k
    v_cache[:, start:end] = v
    o = gqa_sdpa(q, k_cache[:, :end], v_cache[:, :end], mask, cfg.scale)  # [H, T, hd]
    o = o.transpose(0, 1).reshape(t, cfg.n_heads * cfg.head_dim)  # [T, H*hd]
    return x + linear(o, w.wo, w.bo)


def causal_mask(
    start: int, t: int, n_rep: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """Additive causal mask of T queries at positions start..start+T-1 over keys 0..start+T-1,
    repeated for the g = n_rep query heads folded into the query axis -> [g*T, start+T], on
    ``device`` (default: the CPU)."""
    end = start + t
    keys = torch.arange(end, device=device).unsqueeze(0)
    allowed = keys <= torch.arange(start, end, device=device).unsqueeze(1)  # [T, end]
    mask = torch.zeros(t, end, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return mask.repeat(n_rep, 1)


def candidate_mask(
    n_cand: int, n_rep: int, t: int, t0: int, device: torch.device | None = None
) -> torch.Tensor:
    """Mask of the folded candidate attention -> [S*g*T, t0 + S*T] bool (True = attend), on
    ``device`` (default: the CPU).

    Query row (s, j, i) -- candidate s, query head j of its KV group, token i -- sees every
    prefix key and the own keys (s, i') of its candidate with i' <= i.
    """
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()  # [T, T] (i, i')
    same = torch.eye(n_cand, dtype=torch.bool, device=device)  # [S, S] (s, s')
    own = (same[:, None, :, None] & causal[None, :, None, :]).reshape(n_cand, t, n_cand * t)
    prefix = torch.ones(n_cand, t, t0, dtype=torch.bool, device=device)
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
    linear: Linear = F.linear,
) -> torch.Tensor:
    """Norm + gated MLP (down(act(gate(h)) * up(h))) + residual -> [..., T, D]."""
    h = rms_norm(x, w.norm, eps)
    return x + linear(
        act(linear(h, w.w_gate, w.b_gate)) * linear(h, w.w_up, w.b_up), w.w_down, w.b_down
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
    linear: Linear = F.linear,
) -> torch.Tensor:
    """LM head alone, float32 logits -> [..., V]."""
    return linear(h, w_out, b_out).float()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
