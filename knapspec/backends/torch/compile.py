"""The ``torch-compile`` backend: the per-block functions of ``blocks`` under ``torch.compile``.

Everything but the block math is inherited from ``TorchEagerBackend`` (weights, KV cache,
prompt caching, capture, block oracle).  The four callables of ``forward`` --

* ``attention_block``: norm + attention over the preallocated KV cache + residual,
* ``mlp_block``: norm + gated MLP + residual,
* ``rms_norm``: the final norm,
* ``lm_head``: the LM head (float32 logits),

-- are the pure functions of ``blocks`` that the eager backend calls, each wrapped once per
process by ``torch.compile`` (one set per ``(compile_mode, threads)``, shared by every
instance) and held on the instance.  The skip mask only decides which compiled callables
``forward`` calls, so it never reaches a compiled graph and cannot cause a recompilation.

Shapes: one graph serves all ``L`` layers (weights are graph inputs, not constants).  The
growing context (``start``) and the token count ``T`` are dynamic through dynamo's automatic
dynamic shapes: the warm-up runs each callable at two different values of every size that
varies in use, so the graphs it leaves behind are the dynamic ones.  The graphs (for
SmolLM2: about 14 in all) are: ``T == 1`` (one decoding token, no attention mask) and
``T > 1`` (verification and prefill chunks), each at ``start == 0``, ``start == 1`` (dynamo
specialises the values 0 and 1) and ``start >= 2``.  ``recompilations()`` reports graphs
compiled since the warm-up; it stays 0 across masks and context lengths (tested).

Compilation cost: the warm-up (``warmup_seconds``, also in ``describe()``) happens in the
constructor; the first backend of a process pays dynamo tracing plus inductor's compilation
or its on-disk FX graph cache (``TORCHINDUCTOR_CACHE_DIR``, default
``/tmp/torchinductor_<user>``), later backends of the same process re-run the warm-up
shapes in well under a second.

The block oracle (``block_oracle().apply_block``, batched candidates) stays eager: its
``[S, T, D]`` shapes vary with the planner's search and it runs once per plan.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ...errors import KnapSpecError
from . import prepack
from .blocks import attention_block, lm_head, mlp_block, rms_norm
from .eager import TorchEagerBackend
from .static import StaticSteps, static_attention_block
from .vocab import ReducedHead

if TYPE_CHECKING:
    from .loading import LoadedModel

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PREPACK_MODES = prepack.MODES
#: ``prepack="auto"``: interleaved rounds of whole steps per kernel policy, and the cached
#: context (tokens) they run over (``_choose_kernels``)
KERNEL_POLICY_REPEATS = 5
KERNEL_POLICY_CONTEXT = 256
STATIC_MODES = ("auto", "on", "off")
#: with explicit CUDA graphs (static steps on CUDA), inductor must not add its own
GRAPH_FREE_MODE = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}

#: dynamo's per-function cache limit is raised to at least this many graphs: the warm-up of
#: one model leaves about 6 graphs per function, and tests build several models per process
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompiledBlocks:
    """The compiled per-block callables of one ``(compile_mode, threads)``."""

    mode: str
    threads: int  # inductor's C++ kernels fix their OpenMP thread count when compiled
    attention: Callable[..., torch.Tensor]
    mlp: Callable[..., torch.Tensor]
    norm: Callable[..., torch.Tensor]
    head: Callable[..., torch.Tensor]
    static_attention: Callable[..., torch.Tensor]  # static.static_attention_block


_COMPILED: dict[tuple[str, int], CompiledBlocks] = {}
_LOCK = threading.Lock()


def compiled_blocks(mode: str = "default") -> CompiledBlocks:
    """The process-wide compiled callables for ``mode`` at the current torch thread count.

    ``torch.compile`` itself compiles lazily, on the first call of each shape; this only
    wraps the pure functions (once per key, so graphs are shared by every backend instance).
    """
    if mode not in COMPILE_MODES:
        raise KnapSpecError(
            f"unknown compile_mode {mode!r} (expected one of {', '.join(COMPILE_MODES)})"
        )
    key = (mode, torch.get_num_threads())
    with _LOCK:
        blocks = _COMPILED.get(key)
        if blocks is None:
            limit = int(torch._dynamo.config.recompile_limit)
            if limit < RECOMPILE_LIMIT:
                log.info("raising torch._dynamo recompile_limit %d -> %d", limit, RECOMPILE_LIMIT)
                torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT

            def comp(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
                return torch.compile(fn, mode=mode, dynamic=None, fullgraph=True)

            blocks = CompiledBlocks(
                mode, key[1], comp(attention_block), comp(mlp_block), comp(rms_norm),
                comp(lm_head), comp(static_attention_block),
            )  # fmt: skip
            _COMPILED[key] = blocks
    return blocks


def compile_counters() -> dict[str, int]:
    """Process-wide compilation counters from ``torch._dynamo.utils.counters``.

    ``unique_graphs``: graphs dynamo has captured (every compilation or recompilation adds
    one); ``aot_compiles``: graphs AOTAutograd compiled; ``fxgraph_cache_hit`` /
    ``fxgraph_cache_miss``: inductor graphs loaded from / missing in the on-disk FX graph cache.
    """
    counters = torch._dynamo.utils.counters
    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "aot_compiles": int(counters["aot_autograd"]["total"]),
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
    }


def cached_graphs() -> int:
    """Graphs dynamo holds for the four block functions (all modes, all instances): the
    entries of their code objects' caches.  Falls back to the process-wide
    ``unique_graphs`` counter where torch lacks the debug accessor."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - older or newer torch
        return compile_counters()["unique_graphs"]
    fns = (attention_block, mlp_block, rms_norm, lm_head, static_attention_block)
    return sum(len(_debug_get_cache_entry_list(fn.__code__)) for fn in fns)


def _fx_graph_cache() -> dict[str, Any]:
    """Whether inductor's on-disk FX graph cache is on, and where it lives."""
    info: dict[str, Any] = {"fx_graph_cache": bool(torch._inductor.config.fx_graph_cache)}
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        info["inductor_cache_dir"] = str(cache_dir())
    except ImportError:  # older torch: the location moved
        info["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    return info


class TorchCompileBackend(TorchEagerBackend):
    """``TorchEagerBackend`` with its per-block functions compiled by ``torch.compile``.

    Args:
        model, dtype, threads, max_context, capture_tokens, device: as ``TorchEagerBackend``.
        compile_mode: ``torch.compile`` mode (``default``, ``reduce-overhead``,
            ``max-autotune``, ``max-autotune-no-cudagraphs``; on CPU the CUDA-graph part of
            ``reduce-overhead`` does not apply).
        prepack: CPU only, each linear weight's kernel (see ``prepack``): ``"auto"``
            (default) the fastest of ``F.linear``, oneDNN-prepacked and the numba small-M
            kernel, measured per weight shape at setup; ``"on"`` oneDNN for all without
            measuring, ``"numba"`` the numba kernel for decoding-sized calls, ``"off"``
            ``F.linear``.  Ignored off the CPU.
        static_steps: ``"auto"`` (default: on CUDA only), ``"on"`` or ``"off"``: decoding,
            draft and verification steps of up to ``static.MAX_STATIC_TOKENS`` tokens run as
            static-shape steps over the whole cache (``static``), captured as CUDA graphs on
            CUDA.  With them on CUDA, ``reduce-overhead`` / ``max-autotune`` compile the
            blocks in their graph-free variant (the explicit graphs replace inductor's).

    Attributes:
        warmup_seconds: seconds this instance's constructor spent compiling (or loading
            compiled graphs) and running the warm-up shapes; near 0 when an earlier backend of
            the process already compiled them.
        warmup_graphs: graphs compiled during this instance's warm-up.
    """

    name = "torch-compile"

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike[str] | None = None,
        dtype: torch.dtype | str | None = "auto",
        threads: int | None = None,
        max_context: int | None = None,
        capture_tokens: int = 8,
        compile_mode: str = "default",
        device: torch.device | str | None = "auto",
        prepack: str = "auto",
        static_steps: str = "auto",
    ) -> None:
        self.compile_mode = compile_mode
        self.prepack_mode = prepack
        self.static_mode = static_steps
        super().__init__(model, dtype, threads, max_context, capture_tokens, device=device)

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
        compile_mode: str = "default",
        device: torch.device | str | None = None,
        prepack: str = "auto",
        static_steps: str = "auto",
    ) -> TorchCompileBackend:
        """A compiled backend over a ``transformers`` causal-LM object (tokenizer optional),
        on the model's device."""
        self = cls.__new__(cls)
        self.compile_mode = compile_mode
        self.prepack_mode = prepack
        self.static_mode = static_steps
        self._init_from_hf(model, tokenizer, dtype, threads, max_context, capture_tokens,
                           device)
        return self

    def _setup(self, *args: Any, **kwargs: Any) -> None:
        mode = getattr(self, "compile_mode", "default")
        packing = getattr(self, "prepack_mode", "auto")
        static = getattr(self, "static_mode", "auto")
        for what, value, allowed in (("prepack", packing, PREPACK_MODES),
                                     ("static_steps", static, STATIC_MODES)):
            if value not in allowed:
                raise KnapSpecError(
                    f"unknown {what} {value!r} (expected one of {', '.join(allowed)})"
                )
        compiled_blocks(mode)  # validates the mode before the weights are set up
        super()._setup(*args, **kwargs)
        self.compile_mode = mode
        cuda = self.device.type == "cuda"
        use_static = static == "on" or (static == "auto" and cuda)
        inductor_mode = GRAPH_FREE_MODE.get(mode, mode) if use_static and cuda else mode
        if inductor_mode != mode:
            log.info("torch-compile: mode %s compiled as %s (explicit CUDA graphs instead)",
                     mode, inductor_mode)
        self.inductor_mode = inductor_mode
        blocks = compiled_blocks(inductor_mode)
        self._compiled = blocks
        self._packed = prepack.PackedLinears()
        self._linear: Callable[..., torch.Tensor] | None = None  # None: F.linear
        if self.device.type == "cpu" and packing != "off" and prepack.available():
            self._packed.prepack(self._linear_weights(), packing)
            self._packed.attach(self)
            self._linear = prepack.linear  # graphs never depend on what was packed
        lin = {} if self._linear is None else {"linear": self._linear}
        self._attention_fn = partial(blocks.attention, **lin)
        self._mlp_fn = partial(blocks.mlp, **lin)
        self._norm_fn = blocks.norm
        self._head_fn = partial(blocks.head, **lin)
        self._static: StaticSteps | None = None
        if use_static:
            self._static = StaticSteps(self, blocks.static_attention, graphs=cuda,
                                       linear=self._linear)
        self.warmup_seconds = 0.0
        self.warmup_graphs = 0
        self.warmup_cache: dict[str, int] = {}
        self._graphs_after_warmup = 0
        self.warmup()
        if self._linear is not None and packing == "auto":
            self._choose_kernels()

    def _choose_kernels(self, repeats: int = KERNEL_POLICY_REPEATS) -> None:
        """``prepack="auto"``: time whole steps (one token, then five: a decoding step and
        the verification of four drafts, over a short cached context) under each of the
        registry's kernel policies (``PackedLinears.policies``), interleaved, and keep the
        fastest by the median of their sum.  Uses the KV cache as scratch (reset after)."""
        options = self._packed.policies()
        if len({tuple(sorted(p.items())) for p in options.values()}) < 2:
            self._packed.choose(next(iter(options), "per-shape"))
            return
        n_embed = int(self.embed_w.shape[0])
        ctx = max(0, min(KERNEL_POLICY_CONTEXT, self.max_context - 8))
        tok = [i % n_embed for i in range(1, ctx + 8)]
        runs: dict[str, list[float]] = {name: [] for name in options}
        try:
            self.reset()
            if ctx:
                self.forward(tok[:ctx], None, all_logits=False)
            for _ in range(repeats + 1):  # the first round warms each policy up
                for name, policy in options.items():
                    self._packed.apply(policy)
                    seconds = 0.0
                    for n in (1, 5):
                        self.rollback(ctx)
                        t0 = time.perf_counter()
                        self.forward(tok[ctx : ctx + n], None)
                        seconds += time.perf_counter() - t0
                    runs[name].append(seconds)
        finally:
            self.reset()
            with torch.inference_mode():  # leave no scratch K/V behind
                self.k_cache[:, :, : len(tok)].zero_()
                self.v_cache[:, :, : len(tok)].zero_()
        medians = {name: 1e3 * statistics.median(r[1:]) for name, r in runs.items()}
        self._packed.choose(min(medians, key=medians.__getitem__),
                            {k: round(v, 2) for k, v in medians.items()})

    def _linear_weights(self) -> list[torch.Tensor]:
        """Every weight the forward multiplies by: per layer q, k, v, o, gate, up, down,
        then the LM head."""
        out: list[torch.Tensor] = []
        for a, m in zip(self.attn_w, self.mlp_w, strict=True):
            out += [a.wq, a.wk, a.wv, a.wo, m.w_gate, m.w_up, m.w_down]
        return [*out, self.out_w]

    # ------------------------------------------------------------------ compilation
    def warmup(self) -> float:
        """Run every shape class ``forward`` meets, so that later calls never compile.

        Uses the KV cache as scratch (it is reset afterwards).  Returns the seconds spent
        (also stored in ``warmup_seconds``).  The sequence gives every varying size two
        values, so dynamo marks it dynamic: ``T`` in 1 (decoding), 2.. (verification,
        prefill chunks); ``start`` at 0, 1 and two values >= 2; logits of all positions and
        of the last only (a view at a varying offset).
        """
        before = compile_counters()
        t0 = time.perf_counter()
        n_embed = int(self.embed_w.shape[0])
        tok = [i % n_embed for i in range(1, 17)]
        # (tokens, all_logits, reset before); positions in the comment
        plan: list[tuple[int, bool, bool]] = [
            (6, True, True),  # start 0, T 6
            (1, False, False),  # start 6, T 1
            (1, True, False),  # start 7, T 1
            (3, True, False),  # start 8, T 3
            (4, False, False),  # start 11, T 4 -> T, start dynamic
            (5, False, True),  # start 0, T 5 -> T dynamic at start 0
            (1, True, True),  # start 0, T 1 (one-token prompt)
            (1, False, False),  # start 1, T 1
            (2, True, False),  # start 2, T 2
            (3, False, True),  # start 0, T 3
            (2, True, True),  # start 0, T 2
            (1, True, False),  # start 2, T 1
            (2, False, True),  # start 0, T 2
            (3, True, False),  # start 2, T 3
            (1, True, True),  # start 0, T 1
            (2, True, False),  # start 1, T 2
            (3, False, False),  # start 3, T 3
            (1, True, True),  # start 0, T 1
            (3, False, False),  # start 1, T 3
        ]
        static, self._static = self._static, None  # the plan warms the dynamic path
        try:
            self._warm_token_dim()
            for n, all_logits, fresh in plan:
                if fresh:
                    self.reset()
                if self.length + n > self.max_context:
                    continue  # a tiny cache: these shapes can never occur
                self.forward(tok[:n], None, all_logits=all_logits)
            self._static = static
            self._warm_static(tok)
        finally:
            self._static = static
            self.reset()
            with torch.inference_mode():  # leave no scratch K/V behind (the eager one has none)
                self.k_cache[:, :, : len(tok)].zero_()
                self.v_cache[:, :, : len(tok)].zero_()
        self.warmup_seconds = time.perf_counter() - t0
        after = compile_counters()
        self.warmup_graphs = after["unique_graphs"] - before["unique_graphs"]
        self.warmup_cache = {k: after[k] - before[k] for k in after if k.startswith("fxgraph")}
        self._graphs_after_warmup = cached_graphs()
        log.info(
            "torch-compile warm-up (mode %s, %d threads): %.1f s, %d graphs compiled",
            self.compile_mode, self._compiled.threads, self.warmup_seconds, self.warmup_graphs,
        )  # fmt: skip
        return self.warmup_seconds

    def _warm_token_dim(self) -> None:
        """Compile the MLP, final-norm and head graphs with the token axis dynamic from the
        start (``mark_dynamic``), instead of first specialising them to one prefill length."""
        with torch.inference_mode():
            x = torch.zeros(2, self.dim, dtype=self.dtype, device=self.device)  # [T, D]

            def dyn() -> torch.Tensor:
                t = x.clone()
                torch._dynamo.mark_dynamic(t, 0)
                return t

            self._mlp_fn(dyn(), self.mlp_w[0], self.eps, self.act)
            self._norm_fn(dyn(), self.norm_w, self.norm_eps)
            self._head_fn(dyn(), self.out_w, self.out_b)
            if self.draft_vocab_sizes():  # reduced draft heads: the head's rows dynamic too
                h = x[:1].contiguous()  # [1, D], as a draft step's states
                for rows in (64, 128):  # scratch weights, two sizes: the graph is dynamic in K
                    # copies made here are inference tensors, as ReducedHead's rows are
                    w = self.out_w[:rows].clone()  # [rows, D]
                    b = None if self.out_b is None else self.out_b[:rows].clone()
                    self._head_fn(h, w, b)

    def _warm_static(self, tok: list[int]) -> None:
        """Compile the static steps' attention for ``T = 1`` and ``T >= 2`` (run without
        capture: graphs are captured on first use, which compiles nothing)."""
        if self._static is None:
            return
        for t, start in ((1, 0), (2, 1), (3, 3), (4, 2)):
            if start + t <= self.max_context:
                with torch.inference_mode():  # as the steps' buffers (guards see the keys)
                    ids = torch.tensor(tok[:t], dtype=torch.long, device=self.device)
                    pos = torch.arange(start, start + t, device=self.device)
                self._static._body(ids, pos, None)

    # ------------------------------------------------------------------ static steps
    def _run(
        self, ids: torch.Tensor, skip: tuple[bool, ...] | None, capture: bool,
        all_logits: bool, record: list[int] | None,
    ) -> torch.Tensor:
        """``TorchEagerBackend._run``, through the static steps when they take the call."""
        n = int(ids.shape[0])
        steps = self._static
        if steps is None or capture or not steps.accepts(n, skip):
            return super()._run(ids, skip, capture, all_logits, record)
        self.cache.check_room(n)
        logits, h = steps.run(ids, skip, self.cache.length)  # [n, V], [n, D]
        self._final = h.clone()  # a graph's buffer is overwritten by its next replay
        self.cache.append(record if record is not None else range(n), full=record is not None)
        return logits if all_logits else logits[-1:]

    def _reduced_head(self, vocab: int) -> ReducedHead:
        """``ReducedHeads._reduced_head``; a new head's weight is prepacked like the full
        head's (same decision rule, ``prepack``), so that a reduced draft step runs through
        the same linear as a full one (the compiled head, ``prepack.linear``)."""
        fresh = int(vocab) not in self._heads
        head = super()._reduced_head(vocab)
        if fresh and self._linear is not None:
            self._packed.prepack([head.w], self.prepack_mode)
        return head

    def _drop_head(self, vocab: int) -> None:
        head = self._heads.get(vocab)
        if head is not None and head.w.data_ptr() in self._packed.keys:  # unregister it
            self._packed.keys.remove(head.w.data_ptr())
            self._packed.nbytes -= head.w.numel() * head.w.element_size()
            prepack.release([head.w.data_ptr()])
        super()._drop_head(vocab)

    def _draft_step(
        self, tok: torch.Tensor, skip: tuple[bool, ...] | None, head: ReducedHead | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self._static
        if steps is None or head is not None or not steps.accepts(1, skip):
            return super()._draft_step(tok, skip, head)
        logits, h = steps.run(tok, skip, self.cache.length)  # [1, V], [1, D]
        return h.clone(), logits  # the draft keeps h as final_hidden(): not a graph buffer

    def recompilations(self) -> int:
        """Graphs compiled for the block functions since this backend's warm-up (another
        backend's warm-up in between, e.g. of another model or mode, counts too)."""
        return cached_graphs() - self._graphs_after_warmup

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "compile_mode": self.compile_mode,
            "inductor_mode": self.inductor_mode,
            **(self._static.describe() if self._static is not None else {"static_steps": False}),
            "prepack": self.prepack_mode if self._linear is not None else "off",
            **self._packed.describe(),
            "warmup_seconds": self.warmup_seconds,
            "warmup_graphs": self.warmup_graphs,
            "warmup_fxgraph_cache": self.warmup_cache,
            **_fx_graph_cache(),
        }
