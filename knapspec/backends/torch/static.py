"""Static-shape decoding steps over the preallocated KV cache, replayed as CUDA graphs.

The dynamic path (``eager._forward``) attends over the first ``start + T`` cache entries,
so every context length is a new shape.  Here (as in gpt-fast's ``generate.py``) a step of
``T`` tokens is a function of tensors only, with shapes fixed by ``T`` and the cache
capacity ``C``:

* the positions are a tensor ``pos`` ``[T]`` (no Python ``start``): RoPE rows are
  gathered with it and the new K/V written at it (``index_copy_``);
* attention runs over all ``C`` cache entries with a position mask (key ``j`` is seen by
  the query at position ``p`` iff ``j <= p``), so the context length never changes a shape;
  entries beyond the valid length are masked out, whatever stale values they hold.

A ``StaticSteps`` keeps one ``_Step`` per key ``(T, skip flags)``: static input buffers
(ids and positions) and, on CUDA, a ``torch.cuda.CUDAGraph`` captured over them the first
time the key is used (its own memory pool, so replays of different graphs never share
scratch memory); a call copies the ids and positions in and replays.  Bounded: full-model
steps for ``T = 1..max_tokens`` (decoding, verification of up to ``max_tokens - 1`` drafts,
short prompts), and draft steps (``T = 1`` under a skip mask) for the ``max_masks`` most
recently used masks (least recently used evicted).  So at most ``max_tokens + max_masks``
graphs, each holding its step's activations and a ``[T, V]`` float32 logits buffer; the
bytes each capture reserved are logged and reported by ``describe()``.

Off CUDA (and on CUDA with ``graphs=False``) the same buffers and step functions run
without capture: this is how the CPU tests check the static path against the dynamic one.

The block functions are the backend's (compiled, for ``torch-compile``); the attention
block is ``static_attention_block``, compiled with the token axis dynamic, so the steps of
every ``T >= 2`` share one graph and ``T = 1`` has its own: nothing is compiled after the
backend's warm-up, across masks, contexts and draft lengths.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .blocks import AttnConfig, AttnWeights, Linear, gqa_sdpa, qkv, rms_norm

log = logging.getLogger(__name__)

#: full-model steps of up to this many tokens take the static path (verification of 15)
MAX_STATIC_TOKENS = 16
#: draft masks whose one-token step is kept (least recently used evicted)
MAX_MASK_GRAPHS = 8


def static_attention_block(
    x: torch.Tensor,  # [T, D] residual stream of the positions ``pos``
    w: AttnWeights,
    cfg: AttnConfig,
    k_cache: torch.Tensor,  # [KV, C, hd] this layer's keys (written in place at ``pos``)
    v_cache: torch.Tensor,  # [KV, C, hd]
    cos: torch.Tensor,  # [T, hd] rope rows of ``pos``
    sin: torch.Tensor,  # [T, hd]
    pos: torch.Tensor,  # [T] long positions
    mask: torch.Tensor,  # [g*T, C] additive, from ``position_mask``
    linear: Linear = F.linear,
) -> torch.Tensor:
    """Norm + attention over the whole cache under ``mask`` + residual -> [T, D]."""
    t = x.shape[0]
    q, k, v = qkv(rms_norm(x, w.norm, cfg.eps), w, cfg, cos, sin, linear)  # [H,T,hd] [KV,T,hd]
    k_cache.index_copy_(1, pos, k)
    v_cache.index_copy_(1, pos, v)
    o = gqa_sdpa(q, k_cache, v_cache, mask, cfg.scale)  # [H, T, hd]
    o = o.transpose(0, 1).reshape(t, cfg.n_heads * cfg.head_dim)  # [T, H*hd]
    return x + linear(o, w.wo, w.bo)


def position_mask(pos: torch.Tensor, capacity: int, n_rep: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of queries at positions ``pos`` ``[T]`` over all ``capacity`` cache
    entries (``0`` where key ``j <= pos``, ``-inf`` elsewhere), repeated for the ``g = n_rep``
    query heads folded into the query axis -> ``[g*T, C]``."""
    keys = torch.arange(capacity, device=pos.device)  # [C]
    allowed = keys.unsqueeze(0) <= pos.unsqueeze(1)  # [T, C]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
    return mask.masked_fill_(~allowed, float("-inf")).repeat(n_rep, 1)


@dataclass
class _Step:
    """One static step: its input buffers and, when captured, its CUDA graph."""

    ids: torch.Tensor  # [T] long token ids (copied in per call)
    pos: torch.Tensor  # [T] long positions (written per call)
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    out: tuple[torch.Tensor, torch.Tensor] | None = None  # the graph's (logits, h) buffers
    nbytes: int = 0  # device memory reserved by the capture


@dataclass
class StaticSteps:
    """The static steps of one backend (see the module docstring).

    ``backend`` provides the weights, cache, RoPE tables and block callables
    (``_layers``, ``cos``, ``sin``, ``embed_w``, ``_mlp_fn``, ``_norm_fn``, ``_head_fn``,
    ``norm_w``, ``out_w`` ...); ``attention`` is ``static_attention_block`` or its compiled
    version, called with ``linear`` when given.
    """

    backend: Any  # the TorchEagerBackend (or subclass) whose cache the steps write
    attention: Callable[..., torch.Tensor]  # static_attention_block, maybe compiled
    graphs: bool  # capture CUDA graphs (only on a CUDA device)
    max_tokens: int = MAX_STATIC_TOKENS  # full-model steps of 1..max_tokens tokens
    max_masks: int = MAX_MASK_GRAPHS  # draft masks kept
    linear: Linear | None = None  # the backend's linear (None: F.linear)
    full: dict[int, _Step] = field(default_factory=dict)  # T -> full-model step
    masked: OrderedDict[tuple[bool, ...], _Step] = field(default_factory=OrderedDict)
    captures: int = 0  # graphs captured so far (evicted ones included)
    evictions: int = 0  # draft-mask steps evicted by the LRU

    def accepts(self, n: int, skip: tuple[bool, ...] | None) -> bool:
        """Whether a call of ``n`` tokens under ``skip`` takes the static path."""
        return 1 <= n <= self.max_tokens if skip is None else n == 1

    def run(
        self, ids: torch.Tensor, skip: tuple[bool, ...] | None, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``ids`` ``[T]`` (on the device) at positions ``start..start+T-1``;
        returns float32 logits ``[T, V]`` and final-norm states ``[T, D]``.  With graphs
        these are the graph's buffers: read them before the next ``run``."""
        t = int(ids.shape[0])
        step = self._step(t, skip)
        with torch.inference_mode():  # the buffers are inference tensors
            step.ids.copy_(ids)
            torch.add(self._arange(t), start, out=step.pos)
        if not self.graphs:
            return self._body(step.ids, step.pos, skip)
        if step.graph is None:
            self._capture(step, skip)
        step.graph.replay()
        return step.out  # type: ignore[return-value]  # set by _capture

    # ------------------------------------------------------------------ internals
    def _arange(self, t: int) -> torch.Tensor:
        return torch.arange(t, device=self.backend.device)

    def _step(self, t: int, skip: tuple[bool, ...] | None) -> _Step:
        with torch.inference_mode():  # inference tensors, whoever calls (compiled guards)
            return self._find_step(t, skip)

    def _find_step(self, t: int, skip: tuple[bool, ...] | None) -> _Step:
        dev = self.backend.device
        if skip is None:
            step = self.full.get(t)
            if step is None:
                step = self.full[t] = _Step(torch.zeros(t, dtype=torch.long, device=dev),
                                            torch.zeros(t, dtype=torch.long, device=dev))
            return step
        step = self.masked.get(skip)
        if step is not None:
            self.masked.move_to_end(skip)
            return step
        while self.masked and len(self.masked) >= self.max_masks:
            _, old = self.masked.popitem(last=False)
            self.evictions += 1
            log.info("static steps: evicted a draft mask's graph (%d MiB)", old.nbytes >> 20)
        step = self.masked[skip] = _Step(torch.zeros(1, dtype=torch.long, device=dev),
                                         torch.zeros(1, dtype=torch.long, device=dev))
        return step

    def _body(
        self, ids: torch.Tensor, pos: torch.Tensor, skip: tuple[bool, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step itself: embedding, blocks (``skip``), final norm, head -> (logits
        ``[T, V]`` float32, states ``[T, D]``)."""
        be = self.backend
        cfg, act, eps = be.attn_cfg, be.act, be.eps
        lin = {} if self.linear is None else {"linear": self.linear}
        with torch.inference_mode():
            x = F.embedding(ids, be.embed_w)  # [T, D]
            cos, sin = be.cos.index_select(0, pos), be.sin.index_select(0, pos)  # [T, hd]
            mask = position_mask(pos, be.max_context, cfg.n_heads // cfg.n_kv_heads, be.dtype)
            for i, (aw, mw, k, v) in enumerate(be._layers):
                if skip is None or not skip[2 * i]:
                    x = self.attention(x, aw, cfg, k, v, cos, sin, pos, mask, **lin)
                if skip is None or not skip[2 * i + 1]:
                    x = be._mlp_fn(x, mw, eps, act)
            h = be._norm_fn(x, be.norm_w, be.norm_eps)  # [T, D]
            return be._head_fn(h, be.out_w, be.out_b), h

    def _capture(self, step: _Step, skip: tuple[bool, ...] | None) -> None:
        """Capture ``step``'s graph with its buffers as they are (the real inputs of this
        call: the warm-up runs write the K/V this call writes anyway)."""
        dev = self.backend.device
        before = torch.cuda.memory_reserved(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture (lazy inits, autotuning)
            for _ in range(2):
                self._body(step.ids, step.pos, skip)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._body(step.ids, step.pos, skip)
        step.graph, step.out = graph, out
        step.nbytes = max(0, torch.cuda.memory_reserved(dev) - before)
        self.captures += 1
        log.info(
            "static steps: captured T=%d %s (%.1f MiB reserved); %d graphs held",
            step.ids.shape[0], "full" if skip is None else "draft mask", step.nbytes / 2**20,
            self.held(),
        )  # fmt: skip

    def held(self) -> int:
        """Captured graphs currently held."""
        steps = [*self.full.values(), *self.masked.values()]
        return sum(s.graph is not None for s in steps)

    def describe(self) -> dict[str, Any]:
        steps = [*self.full.values(), *self.masked.values()]
        return {
            "static_steps": True,
            "cuda_graphs": self.graphs,
            "cuda_graphs_held": self.held(),
            "cuda_graphs_captured": self.captures,
            "cuda_graph_mib": round(sum(s.nbytes for s in steps) / 2**20, 1),
            "cuda_graph_limit": self.max_tokens + self.max_masks,
            "static_mask_evictions": self.evictions,
        }
