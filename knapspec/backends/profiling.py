"""Measure a backend's latencies into a ``TableCostModel`` by timing real forward calls.

Works on any ``Backend`` through its public primitives only, so every backend is profiled
the same way.  At each context length ``c`` (the KV cache filled with ``c`` tokens) and
each token count ``n``, four masks are timed (median of ``repeats`` calls, the cache rolled
back after each)::

    t_full      nothing skipped
    t_no_attn   every attention block skipped
    t_no_mlp    every MLP block skipped
    t_none      every block skipped (embedding + head + per-call overhead)

and per block ``attention(c, n) = (t_full - t_no_attn) / L``,
``mlp(n) = median_c (t_full - t_no_mlp) / L``, ``head(n)`` from the backend's own head
timer when it has one, ``overhead(n) = t_none - head(n)``.  The fit is checked: the cost
model's full step is compared with the measured ``t_full`` and the worst relative error is
stored in ``meta["full_step_max_rel_error"]``.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import cache_dir
from ..costmodels.io import load_cost_model, save_cost_model
from ..costmodels.table import TableCostModel
from ..errors import KnapSpecError

if TYPE_CHECKING:
    from .base import Backend

log = logging.getLogger(__name__)

DEFAULT_TOKEN_COUNTS = (1, 2, 4, 8)


def default_contexts(max_context: int, largest_n: int) -> list[int]:
    """Context lengths to profile: 64, 256, 1K, 2K, 4K, ... up to the model's limit."""
    top = max_context - largest_n - 1
    pts = [c for c in (64, 256, 1024, 2048, 4096, 6144, 8192, 16384, 32768) if c < top]
    if not pts or top - pts[-1] > 256:
        pts.append(top)
    return pts


def _median_seconds(fn: Callable[[], Any], repeats: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def profile_backend(
    backend: Backend,
    contexts: Sequence[int] | None = None,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    repeats: int = 5,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    seed: int = 0,
) -> TableCostModel:
    """Time ``backend`` and return its measured cost model (seconds per block/head/step).

    Args:
        contexts: context lengths in tokens (default ``default_contexts``).
        token_counts: tokens per forward call to measure (must start at 1).
        repeats: calls per measurement; the median is kept.
        progress: show a progress bar (tqdm) on stderr.
    """
    ns = [int(n) for n in token_counts]
    if not ns or ns[0] != 1 or any(b <= a for a, b in itertools.pairwise(ns)):
        raise KnapSpecError(f"token_counts must be increasing and start at 1, got {ns}")
    if repeats < 1:
        raise KnapSpecError(f"repeats must be >= 1, got {repeats}")
    ctxs = sorted(int(c) for c in (contexts or default_contexts(backend.max_context, ns[-1])))
    if ctxs[0] < 1 or ctxs[-1] + ns[-1] >= backend.max_context:
        raise KnapSpecError(
            f"profile contexts must lie in [1, {backend.max_context - ns[-1] - 1}], got {ctxs}"
        )
    n_layers = backend.layout.n_layers
    n_blocks = 2 * n_layers
    masks = {
        "full": None,
        "no_attn": np.arange(n_blocks) % 2 == 0,
        "no_mlp": np.arange(n_blocks) % 2 == 1,
        "none": np.ones(n_blocks, dtype=bool),
    }
    rng = np.random.default_rng(seed)
    vocab = backend.vocab_size
    t = {k: np.zeros((len(ctxs), len(ns))) for k in masks}  # seconds [C, N]

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ctxs) * len(ns) * len(masks), desc="profiling", unit="pt")
        except ImportError:
            bar = None
    backend.reset()
    t0 = clock()
    for i, c in enumerate(ctxs):
        # grow the KV cache to c tokens, in chunks to bound memory
        while backend.length < c:
            chunk = min(512, c - backend.length)
            backend.forward(rng.integers(0, vocab, chunk).tolist(), None, all_logits=False)
        for j, n in enumerate(ns):
            toks = rng.integers(0, vocab, n).tolist()
            for name, mask in masks.items():

                def call(
                    toks: list[int] = toks, mask: np.ndarray | None = mask, c: int = c
                ) -> None:
                    backend.forward(toks, mask, all_logits=True)
                    backend.rollback(c)

                call()  # warm-up (allocations, caches)
                t[name][i, j] = _median_seconds(call, repeats, clock)
                if bar is not None:
                    bar.update(1)
        log.info("profiled context %d: full step %.2f ms", c, 1e3 * t["full"][i, 0])
    if bar is not None:
        bar.close()
    backend.reset()

    attn = np.maximum(t["full"] - t["no_attn"], 0.0) / n_layers  # [C, N]
    mlp = np.maximum(np.median(t["full"] - t["no_mlp"], axis=0), 0.0) / n_layers  # [N]
    time_head = getattr(backend, "time_head", None)
    if callable(time_head):
        head = np.array([time_head(n, repeats) for n in ns])
    else:
        head = np.zeros(len(ns))
    none = np.median(t["none"], axis=0)  # [N]
    head = np.minimum(head, none)
    overhead = np.maximum(none - head, 0.0)
    meta: dict[str, Any] = {
        **backend.describe(),
        "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "profile_seconds": clock() - t0,
        "repeats": repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "measured_full_step_s": t["full"].tolist(),
    }
    model = TableCostModel(ctxs, ns, attn, mlp, head, overhead, meta=meta)
    pred = np.array([[model.full_step_seconds(n_layers, c, n) for n in ns] for c in ctxs])
    model.meta["full_step_max_rel_error"] = float(np.max(np.abs(pred / t["full"] - 1.0)))
    return model


def cached_profile(
    backend: Backend,
    path: str | os.PathLike | None = None,
    refresh: bool = False,
    **kwargs: Any,
) -> TableCostModel:
    """Load the backend's cost model from ``path`` (default: the user cache), else profile and save.

    The default file name encodes the backend, model and thread count, so a profile is
    reused only for the same model, backend and threads.
    """
    if path is None:
        d = backend.describe()
        fields = ("backend", "model_key", "dtype", "threads")
        key = "-".join(str(d.get(k, "")).replace("/", "_") for k in fields)
        path = cache_dir() / "costmodels" / f"{key}.json"
    p = Path(path)
    if p.exists() and not refresh:
        model = load_cost_model(p)
        if isinstance(model, TableCostModel):
            log.info("using cached cost model %s", p)
            return model
    model = backend.profile(**kwargs)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_cost_model(model, p)
    log.info("saved cost model to %s", p)
    return model
