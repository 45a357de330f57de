"""``TorchEagerBackend``: self-speculative decoding on eager PyTorch, one sequence, one cache.

The forward is the pure per-block functions of ``blocks`` called in order over the
preallocated ``kvcache.KVCache``; skipping is an argument of ``forward``, never a change to
the model.  ``forward`` calls the blocks through the class attributes ``_attention_fn``,
``_mlp_fn``, ``_norm_fn`` and ``_head_fn``, which ``TorchCompileBackend`` replaces on its
instances with compiled versions of the same functions.

The Hugging Face model is used only as a bag of weights (``weights.read_weights``: views,
nothing is copied) plus its rotary embedding module, called once to tabulate cos/sin for
every position up to ``max_context``.

What ``forward`` pays per call, and only when asked: the hidden states of every block
boundary are kept only with ``capture=True`` (for the planner's block oracle); a skip
mask is validated once per distinct mask; logits of every position are computed only with
``all_logits=True``.

Devices: the weights, the KV cache, the RoPE tables, masks, token ids and drafted tokens
all live on ``self.device`` (``auto``: CUDA when available, else the CPU).  ``forward``
returns float32 numpy logits (one copy to the host per call, for profiling and tests); the
decoding loop's hot path is ``draft`` and ``verify``, which select and verify tokens on the
device (``tokens``) and bring back only the ids, one small transfer per call.

Shapes: ``T`` tokens in a call, ``D`` hidden size, ``C`` cache capacity (``max_context``),
``L`` layers, ``V`` vocab.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ...blocks import BlockLayout
from ...draft_vocab import find_ranking
from ...errors import KnapSpecError
from ...sampling import SamplingParams
from ..base import Backend
from . import tokens as device_tokens
from .blocks import attention_block, causal_mask, lm_head, mlp_block, rms_norm
from .kvcache import CaptureWindow, KVCache
from .oracle import TorchBlockOracle
from .vocab import ReducedHead, ReducedHeads, draft_confidence
from .weights import (
    check_model,
    context_size,
    device_name,
    eos_ids,
    parse_dtype,
    read_weights,
    resolve_device,
    resolve_dtype,
    rope_tables,
    set_threads,
)

if TYPE_CHECKING:
    from .loading import LoadedModel

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # tokens per internal forward pass (bounds the causal mask and scores)

#: distinct skip masks whose validated form ``forward`` remembers
MASK_MEMO_SIZE = 64

__all__ = ["PREFILL_CHUNK", "TorchBlockOracle", "TorchEagerBackend", "parse_dtype"]


class TorchEagerBackend(ReducedHeads, Backend):
    """Self-speculative decoding backend on eager PyTorch, one sequence, one KV cache.

    Args:
        model: ``None`` (the default SmolLM2), a path or spec that
            ``knapspec.backends.sources.resolve_model`` accepts, or a ``LoadedModel``.  For a
            bare HF model object use :meth:`from_hf`.
        dtype: parameter dtype (or its name) when loading; ``"auto"`` (default): bfloat16 on
            CUDA, float32 on the CPU.  For a ``LoadedModel`` it must match the model's dtype
            (``"auto"`` or ``None``: take the model's).
        threads: ``torch.set_num_threads(threads)`` if given.
        max_context: KV cache capacity in tokens (default: the model's
            ``max_position_embeddings``, capped by a sliding window if the model has one).
        capture_tokens: positions kept by ``forward(..., capture=True)`` for the oracle.
        device: ``"auto"`` (default: CUDA when available, else the CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``; the weights are loaded straight onto it.  For a
            ``LoadedModel``, ``"auto"`` is where the model already is.
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
        dtype: torch.dtype | str | None = "auto",
        threads: int | None = None,
        max_context: int | None = None,
        capture_tokens: int = 8,
        device: torch.device | str | None = "auto",
    ) -> None:
        from .loading import LoadedModel, load_torch_model

        set_threads(threads)
        if isinstance(model, LoadedModel):
            loaded = model
            dev = None if device in (None, "auto") else resolve_device(device)
            dtype = None if dtype == "auto" else parse_dtype(dtype)  # None: the model's
        elif model is None or isinstance(model, (str, os.PathLike)):
            dev = resolve_device(device)
            dtype = resolve_dtype(dtype, dev)
            loaded = load_torch_model(model, dtype=dtype, device=dev)
        else:
            raise KnapSpecError(
                f"model must be None, a path or a LoadedModel, got {type(model).__name__}; "
                "use TorchEagerBackend.from_hf(model, tokenizer) for a transformers model"
            )
        self.loaded = loaded
        self.timing_only_reason = loaded.source.timing_only_reason  # random weights: set
        key = loaded.cache_path.name if loaded.cache_path is not None else loaded.source.path.name
        self._setup(
            loaded.model,
            loaded.tokenizer,
            dtype,
            dev,
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
        dtype: torch.dtype | str | None = None,
        threads: int | None = None,
        max_context: int | None = None,
        capture_tokens: int = 8,
        device: torch.device | str | None = None,
    ) -> TorchEagerBackend:
        """A backend over a ``transformers`` causal-LM object (tokenizer optional), on the
        model's device (``device``, when given, must be that device)."""
        self = cls.__new__(cls)
        self._init_from_hf(model, tokenizer, dtype, threads, max_context, capture_tokens,
                           device)
        return self

    def _init_from_hf(
        self,
        model: Any,
        tokenizer: Any,
        dtype: torch.dtype | str | None,
        threads: int | None,
        max_context: int | None,
        capture_tokens: int,
        device: torch.device | str | None = None,
    ) -> None:
        """``from_hf``'s initialisation of a bare instance (subclasses add their own)."""
        set_threads(threads)
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
            None if dtype == "auto" else parse_dtype(dtype),  # None: the model's
            None if device in (None, "auto") else resolve_device(device),
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
        device: torch.device | None,
        max_context: int | None,
        capture_tokens: int,
        model_name: str,
        model_key: str,
    ) -> None:
        """Check the model (``dtype`` / ``device``: required of it when given), take views of
        its weights, allocate the KV cache and RoPE tables on its device."""
        self.model_type = check_model(model, dtype, device)
        self._capture = CaptureWindow(capture_tokens)  # validates capture_tokens
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_key = model_key
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.device_name = device_name(self.device)  # the GPU's or the CPU's name
        self._set_weights(read_weights(model))
        self.max_context = context_size(model.config, max_context)
        self.cos, self.sin = rope_tables(model.model.rotary_emb, self.max_context, self.dtype,
                                         self.device)  # [C, hd] each
        cfg = self.attn_cfg
        self.cache = KVCache(self.layout.n_layers, cfg.n_kv_heads, self.max_context,
                             cfg.head_dim, self.dtype, self.device)
        self.k_cache, self.v_cache = self.cache.k, self.cache.v  # [L, KV, C, hd]
        # per layer, what its two blocks read: made once, not indexed per forward
        self._layers = list(zip(self.attn_w, self.mlp_w, self.cache.layer_k,
                                self.cache.layer_v, strict=True))
        self._skip_memo: dict[bytes, tuple[bool, ...] | None] = {}
        self.vocab_size = int(self.out_w.shape[0])
        self.eos_token_ids = eos_ids(model, tokenizer)
        self._final: torch.Tensor | None = None  # [n, D] final-norm states of the last call
        self._gen: torch.Generator | None = None  # sampling on the device, made when needed
        # the tokenizer's token ranking by frequency (reduced draft heads; None: none)
        self.vocab_ranking = find_ranking(tokenizer, self.vocab_size)
        self._heads: dict[int, ReducedHead] = {}  # K -> reduced draft head, made when used
        log.info(
            "torch backend: %s (%s), %d layers, D=%d, H=%d, KV=%d, hd=%d, V=%d, ctx %d, "
            "KV cache %.0f MiB, %s %s, %d threads",
            model_name, self.model_type, self.layout.n_layers, self.dim, cfg.n_heads,
            cfg.n_kv_heads, cfg.head_dim, self.vocab_size, self.max_context,
            self.cache.nbytes / 2**20, self.device, self.dtype, torch.get_num_threads(),
        )  # fmt: skip

    def _set_weights(self, w: Any) -> None:
        """Hold the ``weights.ModelWeights`` ``w`` as the attributes the forward reads."""
        self.attn_cfg, self.eps, self.dim = w.attn_cfg, w.eps, w.dim
        self.attn_w, self.mlp_w, self.act = w.attn, w.mlp, w.act
        self.embed_w, self.out_w, self.out_b = w.embed, w.out, w.out_bias  # [V, D] [V, D] [V]
        self.norm_w, self.norm_eps = w.norm, w.norm_eps
        self.layout = BlockLayout(len(w.attn))

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
        return self.cache.length

    @property
    def capture_tokens(self) -> int:
        """Positions kept by ``forward(..., capture=True)`` for the block oracle."""
        return self._capture.size

    @capture_tokens.setter
    def capture_tokens(self, value: int) -> None:
        if int(value) < 1:
            raise KnapSpecError(f"capture_tokens must be >= 1, got {value}")
        self._capture.size = int(value)

    def reset(self) -> None:
        self.cache.reset()
        self._capture.clear()
        self._final = None

    def cached_tokens(self) -> list[int | None]:
        return self.cache.ids

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)
        self._capture.rollback(int(length))

    # ------------------------------------------------------------------ compute
    def _skip_flags(self, mask: np.ndarray | None) -> tuple[bool, ...] | None:
        """``[2L]`` skip flags of ``mask``, or None for the full model (None or all False).

        Validated once per distinct mask and remembered: drafting runs the same mask every
        round.  Pinned blocks may be skipped here (profiling skips every block); planners
        enforce pinning.
        """
        if mask is None:
            return None
        arr = np.asarray(mask)
        key = arr.dtype.str.encode() + arr.tobytes() if arr.ndim == 1 else None
        if key is not None and key in self._skip_memo:
            return self._skip_memo[key]
        valid = self.layout.validate_mask(arr, allow_pinned=True)
        flags = tuple(valid.tolist()) if valid.any() else None
        if key is not None:
            if len(self._skip_memo) >= MASK_MEMO_SIZE:
                self._skip_memo.clear()
            self._skip_memo[key] = flags
        return flags

    def _check_ids(self, ids: list[int]) -> None:
        """Raise unless ``ids`` is a non-empty list of ids the embedding has."""
        if not ids:
            raise KnapSpecError("forward needs at least one token")
        n_embed = self.embed_w.shape[0]
        if min(ids) < 0 or max(ids) >= n_embed:
            bad = next(i for i in ids if not 0 <= i < n_embed)
            raise KnapSpecError(f"token id {bad} out of range [0, {n_embed})")

    def forward(
        self,
        tokens: Sequence[int],
        mask: np.ndarray | None = None,
        *,
        capture: bool = False,
        all_logits: bool = True,
    ) -> np.ndarray:
        ids = [int(t) for t in tokens]
        self._check_ids(ids)
        skip = self._skip_flags(mask)
        if capture and skip is not None:
            raise KnapSpecError("capture=True needs the full model (mask=None)")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)  # [n]
        out = self._run(ids_t, skip, capture, all_logits, ids if skip is None else None)
        return out.cpu().numpy()  # float32 [n or 1, V] (a view on the CPU)

    def _run(
        self, ids: torch.Tensor, skip: tuple[bool, ...] | None, capture: bool,
        all_logits: bool, record: list[int] | None,
    ) -> torch.Tensor:
        """Run token ids ``ids`` ``[n]`` (on the device) after the cached positions; returns
        float32 logits ``[n, V]`` (or ``[1, V]``) on the device.  ``record``: the ids as a
        list, kept for prompt caching (``None``: the positions are marked as a draft's)."""
        n = int(ids.shape[0])
        self.cache.check_room(n)
        start = self.cache.length
        with torch.inference_mode():
            if n <= PREFILL_CHUNK:  # decoding, drafting, verification: one pass
                h = self._forward(ids, start, skip, capture)  # [n, D]
                out = self._head_fn(h if all_logits else h[-1:], self.out_w, self.out_b)
            else:
                h, out = self._forward_chunked(ids, start, skip, capture, all_logits)
        self._final = h
        self.cache.append(record if record is not None else range(n), full=record is not None)
        return out

    def _forward_chunked(
        self, ids: torch.Tensor, start: int, skip: tuple[bool, ...] | None, capture: bool,
        all_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A long prompt ``ids`` ``[n]`` in chunks of ``PREFILL_CHUNK`` (bounded memory);
        returns final-norm states ``[n, D]`` and float32 logits ``[n, V]`` (or ``[1, V]``)."""
        n = int(ids.shape[0])
        finals, logits = [], []
        for a in range(0, n, PREFILL_CHUNK):
            chunk = ids[a : a + PREFILL_CHUNK]
            wanted = capture and a + len(chunk) > n - self._capture.size
            h = self._forward(chunk, start + a, skip, wanted)  # [t, D]
            finals.append(h)
            if all_logits:
                logits.append(self._head_fn(h, self.out_w, self.out_b))  # [t, V]
        h = torch.cat(finals)  # [n, D]
        if not all_logits:
            return h, self._head_fn(h[-1:], self.out_w, self.out_b)  # [1, V]
        return h, torch.cat(logits)

    def _forward(
        self, ids: torch.Tensor, start: int, skip: tuple[bool, ...] | None, capture: bool
    ) -> torch.Tensor:
        """Blocks over ``ids`` ``[T]`` (on the device) at positions start..; returns
        final-norm states [T, D].

        With ``capture``, the states at every block boundary of the last ``capture_tokens``
        positions go to the capture window; without it nothing is kept.
        """
        n = int(ids.shape[0])
        x = F.embedding(ids, self.embed_w)  # [T, D]
        cos, sin = self.cos[start : start + n], self.sin[start : start + n]  # [T, hd]
        cfg, act, eps = self.attn_cfg, self.act, self.eps
        attention, mlp = self._attention_fn, self._mlp_fn
        mask = None  # one query sees every cached key: no mask
        if n > 1:  # query i (position start+i) sees keys 0..start+i; built once for all layers
            mask = causal_mask(start, n, cfg.n_heads // cfg.n_kv_heads, self.dtype, self.device)
        if capture:
            return self._forward_capture(x, cos, sin, start, mask)
        for i, (aw, mw, k, v) in enumerate(self._layers):
            if skip is None or not skip[2 * i]:
                x = attention(x, aw, cfg, k, v, cos, sin, start, mask)
            if skip is None or not skip[2 * i + 1]:
                x = mlp(x, mw, eps, act)
        return self._norm_fn(x, self.norm_w, self.norm_eps)  # [T, D]

    def _forward_capture(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The full model over embeddings ``x`` ``[T, D]``, keeping the boundary states of the
        last ``capture_tokens`` positions; returns final-norm states ``[T, D]``."""
        n = x.shape[0]
        keep = min(n, self._capture.size)
        cfg, act, eps = self.attn_cfg, self.act, self.eps
        # each boundary state is [keep, D] (copied when a slice, so a long prefill does not
        # keep every block's [T, D] activations alive)
        grab = (lambda t: t) if keep == n else (lambda t: t[n - keep :].clone())
        states = [grab(x)]
        for aw, mw, k, v in self._layers:
            x = self._attention_fn(x, aw, cfg, k, v, cos, sin, start, mask)
            states.append(grab(x))
            x = self._mlp_fn(x, mw, eps, act)
            states.append(grab(x))
        self._capture.store(torch.stack(states), start + n - keep)  # [2L+1, keep, D]
        return self._norm_fn(x, self.norm_w, self.norm_eps)  # [T, D]

    # ------------------------------------------------------------------ the loop's hot path
    def _generator(self, rng: np.random.Generator) -> torch.Generator:
        """This backend's ``torch.Generator`` on its device, reseeded from ``rng``."""
        if self._gen is None:
            self._gen = torch.Generator(device=self.device)
        return device_tokens.seed_generator(self._gen, rng)

    def draft(
        self,
        last: int,
        mask: np.ndarray | None,
        n: int,
        sampling: SamplingParams,
        rng: np.random.Generator,
        stop_ids: frozenset[int],
        *,
        vocab: int = 0,
        stop_confidence: float = 0.0,
    ) -> tuple[list[int], torch.Tensor | None]:
        """``n`` draft steps under ``mask`` from token ``last``, tokens chosen on the device.

        Each drafted token feeds the next step as a device tensor; the ids come to the host
        in one transfer at the end and are cut after the first one in ``stop_ids`` (the
        steps after it are computed but never returned; the loop rolls the cache back).

        ``vocab`` (``Backend.draft``): the draft head scores only the top ``vocab`` ids of
        ``draft_vocab_sizes`` (0: every id).  ``stop_confidence``: drafting stops after the
        first token whose top-1 draft probability is below it; each step then reads that
        probability on the host (one small transfer per step, only when set).

        Returns:
            the drafted ids and, when sampling, their distributions: a float32 ``[k, V]``
            tensor on the device, zero outside a reduced head's ids (``None`` when greedy).
            The cache grows by the steps run (``n``, fewer after a confidence stop).
        """
        if n < 1:
            return [], None
        self._check_ids([int(last)])
        skip = self._skip_flags(mask)
        head = self._reduced_head(vocab) if vocab else None
        self.cache.check_room(n)
        gen = None if sampling.greedy else self._generator(rng)
        tok = torch.tensor([int(last)], dtype=torch.long, device=self.device)  # [1]
        drafted, probs = [], []
        with torch.inference_mode():
            for _ in range(n):
                h, logits = self._draft_step(tok, skip, head)  # [1, D], [1, V or K] float32
                self.cache.append(range(1), full=False)
                if gen is None:
                    pick = logits.argmax(-1)  # [1]
                    q = None
                else:
                    q = device_tokens.probabilities(logits, sampling)  # [1, V or K]
                    pick = device_tokens.sample(q, gen)
                tok = pick if head is None else head.ids[pick]  # [1] ids of the full vocab
                if q is not None:
                    probs.append(q if head is None else head.scatter(q))  # [1, V]
                drafted.append(tok)
                if stop_confidence > 0.0 and draft_confidence(logits, q) < stop_confidence:
                    break  # unsure: this draft is the round's last
            ids = torch.cat(drafted).tolist()  # the one transfer to the host
        self._final = h
        k = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
        return ids[:k], (torch.cat(probs[:k]) if probs else None)

    def _draft_step(
        self, tok: torch.Tensor, skip: tuple[bool, ...] | None, head: ReducedHead | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step of token ``tok`` ``[1]`` -> final-norm states ``[1, D]`` and
        float32 logits ``[1, V]`` (``[1, K]`` over a reduced ``head``'s ids); the cache's
        length is the caller's to advance."""
        h = self._forward(tok, self.cache.length, skip, False)
        if head is None:
            return h, self._head_fn(h, self.out_w, self.out_b)
        return h, self._head_fn(h, head.w, head.b)

    def verify(
        self,
        last: int,
        drafts: Sequence[int],
        q: Any,
        sampling: SamplingParams,
        rng: np.random.Generator,
        *,
        capture: bool = False,
        accept: int | None = None,
    ) -> tuple[int, int]:
        """Run ``[last, *drafts]`` through the full model and verify on the device.

        Greedy match, or rejection sampling with the draft distributions ``q`` (``[d, V]``,
        as ``draft`` returns them); with no drafts, one plain step (only the last row's
        logits).  ``accept`` (simulated acceptance, timing only): take exactly
        ``min(accept, d)`` drafts and the next token from the target's row there.  The
        cache grows by ``d + 1``; ``capture`` keeps the hidden states for the oracle.

        Returns ``(n_accepted, next_token)``, brought to the host in one transfer.
        """
        ids = [int(last), *map(int, drafts)]
        self._check_ids(ids)
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)  # [d + 1]
        logits = self._run(ids_t, None, capture, len(ids) > 1, ids)  # [d + 1 or 1, V]
        gen = None if sampling.greedy else self._generator(rng)
        with torch.inference_mode():
            out = device_tokens.verify_rows(logits, ids_t[1:], q, sampling, gen, accept)
            n, nxt = out.tolist()  # the one transfer to the host
        return int(n), int(nxt)

    def final_hidden(self) -> torch.Tensor | None:
        """Final-norm hidden states ``[n, D]`` of the last forward call."""
        return self._final

    # ------------------------------------------------------------------ planning support
    def block_oracle(self) -> TorchBlockOracle:
        """Oracle over the captured positions (the last tokens run with ``capture=True``).

        Valid until the cache is rolled back below the first captured position.
        """
        if self._capture.states is None:
            raise KnapSpecError(
                "nothing captured: run forward(..., capture=True) (or prefill(capture=True)) "
                "before asking for a block oracle"
            )
        return TorchBlockOracle(self, self._capture.states, self._capture.start)

    # ------------------------------------------------------------------ measurement
    def synchronize(self) -> None:
        """Wait for the work queued on this backend's device (a no-op on the CPU); clocks
        that time device work read after this."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_head(self, n_tokens: int, repeats: int) -> float:
        """Median seconds of final norm + LM head on ``n_tokens`` states, through the norm
        and linear ``forward`` uses (device work included: synchronised before and after
        each call)."""
        return self._time_norm_head(n_tokens, repeats, self.out_w, self.out_b)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_name,
            "model_key": self.model_key,
            "model_type": self.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "device_name": self.device_name,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "max_context": self.max_context,
        }
