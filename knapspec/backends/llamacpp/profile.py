"""Profiling on llama.cpp: the generic timing of real forward calls, plus the KV copy.

``knapspec.backends.profiling.profile_backend`` times the full model and three drafts (no
attention, no MLP, nothing) at several context lengths and token counts; on llama.cpp
each draft is a real draft GGUF in its own context, so those are the latencies the loop
will see.  One cost is specific to this backend: after every verification the draft
receives the target's KV of the newly verified positions (``n`` of them after a verify of
``n`` tokens).  It is measured here and added to the cost of verifying ``n >= 2`` tokens
(autoregressive steps, ``n = 1``, never copy), so the planner prices it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...costmodels.table import TableCostModel
from ..profiling import profile_backend


def measure_kv_copy(
    backend: Any, context: int, token_counts: Sequence[int], repeats: int,
    clock: Callable[[], float] = time.perf_counter, seed: int = 1,
) -> list[float]:
    """Median seconds to copy ``n`` newly verified positions into a draft, per ``n``.

    Uses the draft that keeps every attention block (all MLPs skipped): the widest copy.
    """
    rng = np.random.default_rng(seed)
    n_blocks = backend.layout.n_blocks
    mask = np.arange(n_blocks) % 2 == 1
    backend.reset()
    backend.forward(rng.integers(0, backend.vocab_size, context).tolist(), None,
                    all_logits=False)
    entry = backend._draft(mask)
    backend._catch_up_draft(entry, context)  # seed (not timed)
    out = []
    for n in token_counts:
        times = []
        for _ in range(repeats + 1):
            backend.forward(rng.integers(0, backend.vocab_size, n).tolist(), None,
                            all_logits=False)
            t0 = clock()
            backend._catch_up_draft(entry, context + n)
            times.append(clock() - t0)
            backend.rollback(context)
        out.append(statistics.median(times[1:]))
    backend.reset()
    return out


def profile_llamacpp(backend: Any, **kwargs: Any) -> TableCostModel:
    """``profile_backend(backend, **kwargs)`` plus the per-round draft KV copy (seconds, see
    the module doc), measured with the same ``repeats`` and ``clock``."""
    model = profile_backend(backend, **kwargs)
    ctx = int(min(1024, model.contexts[-1]))
    copy = measure_kv_copy(backend, ctx, [int(n) for n in model.n_tokens],
                           int(kwargs.get("repeats", 5)), kwargs.get("clock", time.perf_counter))
    ns = np.asarray(model.n_tokens)
    overhead = np.asarray(model.overhead_table) + np.where(ns >= 2, copy, 0.0)
    meta = {**model.meta, "draft_kv_copy_s": copy, "draft_kv_copy_context": ctx}
    return TableCostModel(model.contexts, model.n_tokens, model.attention_table,
                          model.mlp_table, model.head_table, overhead, meta=meta)
