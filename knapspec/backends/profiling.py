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
stored in ``meta["full_step_max_rel_error"]``.  A backend with reduced-vocabulary draft
heads (``draft_vocab_sizes``, ``time_draft_head``) also has each head timed against the
full one: ``draft_heads = {K: seconds}`` and ``vocab_size`` in the model
(``draft_head_seconds``); a cached profile that lacks some of them gets them measured and
saved when it is next loaded (``cached_profile``), so it is never left pricing reduced
heads by the ``K / V`` projection of ``CostModel.draft_head``.

The timings are checked before they are believed (``profile_trust``: other work on the
CPU, scattered repeats, points their neighbours contradict); suspect points are measured
again, and the verdict with its evidence is stored in ``meta["trust"]``.
``cached_profile`` refuses to cache a profile that stays untrusted.

Every call is timed by the timer of the backend's device (``timing.timer_for``): CUDA
events after a synchronize on a GPU, ``perf_counter`` on the CPU; ``meta["timer"]`` says
which.  Profiles are cached per backend, model, dtype, threads and (off the CPU) device
name.

This module imports ``Backend`` only for typing; backends call it (``Backend.profile``),
never the other way round.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import cache_dir
from ..costmodels.io import load_cost_model, save_cost_model
from ..costmodels.table import TableCostModel
from ..errors import KnapSpecError
from .profile_trust import (
    CpuSample,
    TrustPolicy,
    UntrustedProfileError,
    assess,
    load_before,
    log_load_before,
    other_cpus,
    sample_cpu,
    usable_cpus,
)
from .timing import Timer, backend_device, timer_for

if TYPE_CHECKING:
    from .base import Backend

log = logging.getLogger(__name__)

#: tokens per forward call the profiler times: every verification of d = 1..5 drafts
#: (M = d + 1) is measured, not interpolated (small-M kernels are far from linear in M)
DEFAULT_TOKEN_COUNTS = (1, 2, 3, 4, 5, 6, 8)
DEFAULT_REPEATS = 5
#: Shortest window (seconds) over which the load of other work is judged.
LOAD_WINDOW_S = 1.0


def default_contexts(max_context: int, largest_n: int) -> list[int]:
    """Context lengths to profile: 64, 256, 1K, 2K, 4K, ... up to the model's limit."""
    top = max_context - largest_n - 1
    pts = [c for c in (64, 256, 1024, 2048, 4096, 6144, 8192, 16384, 32768) if c < top]
    if not pts or top - pts[-1] > 256:
        pts.append(top)
    return pts


def profile_masks(n_layers: int) -> dict[str, np.ndarray | None]:
    """The four masks the profiler times, by name (``[2L]`` bool, ``None``: full model)."""
    n_blocks = 2 * n_layers
    return {
        "full": None,
        "no_attn": np.arange(n_blocks) % 2 == 0,
        "no_mlp": np.arange(n_blocks) % 2 == 1,
        "none": np.ones(n_blocks, dtype=bool),
    }


def backend_threads(backend: Backend) -> int:
    """Threads the backend computes with (``describe()["threads"]``, else 1)."""
    try:
        return max(int(backend.describe().get("threads") or 1), 1)
    except (TypeError, ValueError):
        return 1


def host_threads(backend: Backend) -> int:
    """CPUs the backend's own work keeps busy, against which other work is judged: its
    threads on the CPU; one on a GPU (the thread that launches the kernels; torch's
    ``threads`` there are idle host threads)."""
    return 1 if backend_device(backend).startswith("cuda") else backend_threads(backend)


def _check_grid(backend: Backend, contexts: Sequence[int] | None,
                token_counts: Sequence[int], repeats: int) -> tuple[list[int], list[int]]:
    """Validated, sorted ``(contexts, token_counts)``; raises ``KnapSpecError`` naming the
    bad argument."""
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
    return ctxs, ns


class TimingGrid:
    """Raw timings of ``masks`` at every (context, token count), measured on one backend.

    ``samples[name]`` holds seconds ``[C, N, R]`` (``R = repeats``); ``row_load[i]`` the
    CPUs of other work while row ``i`` (context ``contexts[i]``) was last measured.
    ``measure`` can be called again for some points (re-measuring suspects): rows are
    visited in increasing context, growing the KV cache with random tokens (seeded).
    Calls are timed by ``timer_for(backend, clock)``: ``clock`` when given (tests' fake
    clocks), else the timer of the backend's device (CUDA events on a GPU).
    """

    def __init__(
        self, backend: Backend, contexts: Sequence[int], token_counts: Sequence[int],
        masks: dict[str, np.ndarray | None], repeats: int,
        clock: Callable[[], float] | None = None, seed: int = 0,
        cpu_sample: Callable[[], CpuSample] = sample_cpu,
    ) -> None:
        self.backend, self.contexts, self.ns = backend, list(contexts), list(token_counts)
        self.masks, self.repeats, self.cpu_sample = masks, repeats, cpu_sample
        self.timer: Timer = timer_for(backend, clock)
        self.rng = np.random.default_rng(seed)
        self.threads = host_threads(backend)  # for judging the load of other work
        shape = (len(self.contexts), len(self.ns), repeats)
        self.samples = {k: np.zeros(shape) for k in masks}
        self.row_load: list[float | None] = [None] * len(self.contexts)
        vocab = backend.vocab_size
        self.tokens = [[self.rng.integers(0, vocab, n).tolist() for n in self.ns]
                       for _ in self.contexts]

    def medians(self) -> dict[str, np.ndarray]:
        """Mask name -> median seconds ``[C, N]``."""
        return {k: np.median(v, axis=2) for k, v in self.samples.items()}

    def all_points(self) -> dict[int, list[tuple[int, str]]]:
        """Every point, as row -> ``[(token-count index, mask name)]``."""
        return {i: [(j, k) for j in range(len(self.ns)) for k in self.masks]
                for i in range(len(self.contexts))}

    def _grow(self, c: int) -> None:
        be = self.backend
        if be.length > c:
            be.rollback(c)
        while be.length < c:  # in chunks, to bound memory
            chunk = min(512, c - be.length)
            be.forward(self.rng.integers(0, be.vocab_size, chunk).tolist(), None,
                       all_logits=False)

    def _time(self, tokens: list[int], mask: np.ndarray | None, c: int) -> np.ndarray:
        """Seconds ``[R]`` of ``repeats`` calls (each with its rollback) after one untimed
        warm-up call."""
        be = self.backend

        def call() -> None:
            be.forward(tokens, mask, all_logits=True)
            be.rollback(c)

        call()  # warm-up
        return np.array([self.timer.time(call) for _ in range(self.repeats)])

    def measure(self, points: dict[int, list[tuple[int, str]]], replace_rows: set[int],
                on_point: Callable[[], None] | None = None) -> int:
        """Time ``points`` (row -> ``[(j, mask)]``); returns how many were timed.

        A row in ``replace_rows`` takes the new timings outright (its old ones were taken
        under load); elsewhere a point keeps whichever of its old and new repeats is more
        consistent, then faster (other work only ever slows a call down).
        """
        self.backend.reset()
        done = 0
        marks = [self.cpu_sample()]
        for i in sorted(points):
            c = self.contexts[i]
            self._grow(c)
            for j, name in points[i]:
                new = self._time(self.tokens[i][j], self.masks[name], c)
                if i in replace_rows or _better(new, self.samples[name][i, j]):
                    self.samples[name][i, j] = new
                done += 1
                if on_point is not None:
                    on_point()
            marks.append(self.cpu_sample())
            # /proc/stat counts in ticks (10 ms per CPU): judge the load over at least
            # LOAD_WINDOW_S, reaching back over earlier rows when this one was quick
            start = next((m for m in reversed(marks[:-1])
                          if marks[-1].wall - m.wall >= LOAD_WINDOW_S), marks[0])
            self.row_load[i] = other_cpus(start, marks[-1], self.threads)
            log.info("profiled context %d: %d point(s), other work %s CPUs", c,
                     len(points[i]), self.row_load[i])
        self.backend.reset()
        return done


def _better(new: np.ndarray, old: np.ndarray) -> bool:
    """Whether repeats ``new`` beat ``old`` (``[R]`` seconds each; zeros: never measured).

    The more consistent set wins when their relative spreads (MAD / median) differ by more
    than 0.1; otherwise the faster median does (other work only ever slows a call down).
    """
    if not old.any():
        return True

    def spread(x: np.ndarray) -> float:
        med = float(np.median(x))
        return float(np.median(np.abs(x - med))) / max(med, 1e-12)

    if abs(spread(new) - spread(old)) > 0.1:
        return spread(new) < spread(old)
    return float(np.median(new)) < float(np.median(old))


def profile_backend(
    backend: Backend,
    contexts: Sequence[int] | None = None,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    repeats: int = DEFAULT_REPEATS,
    progress: bool = True,
    clock: Callable[[], float] | None = None,
    seed: int = 0,
    policy: TrustPolicy | None = None,
    cpu_sample: Callable[[], CpuSample] = sample_cpu,
    settle_seconds: float = 0.5,
) -> TableCostModel:
    """Time ``backend`` and return its measured cost model (seconds per block/head/step).

    Args:
        contexts: context lengths in tokens (default ``default_contexts``).
        token_counts: tokens per forward call to measure (must start at 1).
        repeats: calls per measurement; the median is kept.
        progress: show a progress bar (tqdm) on stderr.
        clock: seconds, for the timings (tests pass a fake one); default: the timer of
            the backend's device (``timing.timer_for``: CUDA events on a GPU).
        policy: trust thresholds (default ``TrustPolicy()``).
        cpu_sample: reads the machine's CPU use (tests pass a fake one).
        settle_seconds: seconds spent measuring other work before starting.

    Returns:
        the model; ``meta["trust"]`` says whether its timings passed the trust checks
        (after up to ``policy.max_retries`` rounds of re-measuring suspect points), why not,
        and the evidence (load before and during, spreads, jumps).
    """
    ctxs, ns = _check_grid(backend, contexts, token_counts, repeats)
    policy = policy or TrustPolicy()
    n_layers = backend.layout.n_layers
    grid = TimingGrid(backend, ctxs, ns, profile_masks(n_layers), repeats, clock, seed,
                      cpu_sample)
    cpus = usable_cpus()
    before, loadavg_before = load_before(settle_seconds, cpu_sample)
    log_load_before(before, grid.threads, cpus, policy)

    bar = _progress_bar(len(ctxs) * len(ns) * len(grid.masks)) if progress else None
    wall = clock or time.perf_counter
    t0 = wall()
    grid.measure(grid.all_points(), set(), None if bar is None else lambda: bar.update(1))
    if bar is not None:
        bar.close()
    report = assess(grid.samples, ctxs, ns, grid.row_load, grid.threads, cpus, policy)
    retries = remeasured = 0
    while not report.trusted and retries < policy.max_retries:
        todo: dict[int, list[tuple[int, str]]] = {i: [] for i in report.loaded_rows}
        for i in report.loaded_rows:
            todo[i] = grid.all_points()[i]
        for i, j, name in sorted(report.suspects):
            if i not in report.loaded_rows:
                todo.setdefault(i, []).append((j, name))
        log.info("re-measuring %d suspect point(s): %s",
                 sum(map(len, todo.values())), report.summary())
        remeasured += grid.measure(todo, set(report.loaded_rows))
        retries += 1
        report = assess(grid.samples, ctxs, ns, grid.row_load, grid.threads, cpus, policy)
    if report.trusted:
        log.info("profile passed its trust checks (%d re-measuring round(s))", retries)
    else:
        log.warning("profile failed its trust checks: %s", report.summary())

    model = _fit(backend, grid, repeats)
    model.meta.update({
        "profile_seconds": wall() - t0,
        "timer": grid.timer.kind,
        "trust": {
            "trusted": report.trusted,
            "reasons": report.reasons,
            "retries": retries,
            "remeasured_points": remeasured,
            "other_cpus_before": None if before is None else round(before, 3),
            "loadavg_before": loadavg_before,
            **report.evidence,
        },
    })
    return model


def _progress_bar(total: int) -> Any:
    """A tqdm bar on stderr, or ``None`` when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="profiling", unit="pt")


def _fit(backend: Backend, grid: TimingGrid, repeats: int) -> TableCostModel:
    """The table cost model of ``grid``'s medians (see the module doc)."""
    t = grid.medians()
    n_layers = backend.layout.n_layers
    attn = np.maximum(t["full"] - t["no_attn"], 0.0) / n_layers  # [C, N]
    mlp = np.maximum(np.median(t["full"] - t["no_mlp"], axis=0), 0.0) / n_layers  # [N]
    time_head = getattr(backend, "time_head", None)
    if callable(time_head):
        head = np.array([time_head(n, repeats) for n in grid.ns])
    else:
        head = np.zeros(len(grid.ns))
    none = np.median(t["none"], axis=0)  # [N]
    head = np.minimum(head, none)
    overhead = np.maximum(none - head, 0.0)
    meta: dict[str, Any] = {
        **backend.describe(),
        "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repeats": repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "measured_full_step_s": t["full"].tolist(),
    }
    reason = getattr(backend, "timing_only_reason", None)
    if reason:  # e.g. random weights: the timings are real, the model is not
        meta["timing_only_reason"] = reason
    model = TableCostModel(grid.contexts, grid.ns, attn, mlp, head, overhead, meta=meta)
    model.vocab_size = int(backend.vocab_size)
    model.draft_heads.update(draft_head_seconds(backend, float(head[0]), repeats))
    pred = np.array([[model.full_step_seconds(n_layers, c, n) for n in grid.ns]
                     for c in grid.contexts])
    model.meta["full_step_max_rel_error"] = float(np.max(np.abs(pred / t["full"] - 1.0)))
    return model


def draft_head_seconds(
    backend: Backend, full: float, repeats: int = DEFAULT_REPEATS,
    sizes: Sequence[int] | None = None,
) -> dict[int, float]:
    """Seconds of the backend's reduced draft heads, ``{K: seconds}`` (``{}`` when it has
    none or cannot time them), priced against ``full``, the cost model's one-token head.

    The full head and each head of ``sizes`` (default: every ``draft_vocab_sizes``) are
    timed in turn, ``repeats`` rounds interleaved (``time_draft_head``: final norm + head
    on one state, through the linear the draft step uses); head ``K`` costs ``full`` times
    the ratio of the medians, so that heads measured later (a cached profile topped up)
    stay comparable with the ``full`` head measured with the blocks.
    """
    timer = getattr(backend, "time_draft_head", None)
    ks = sorted(_offered_heads(backend) if sizes is None else sizes)
    if not ks or not callable(timer):
        return {}
    runs: dict[int, list[float]] = {k: [] for k in (0, *ks)}
    for _ in range(max(repeats, 1)):
        for k in runs:
            runs[k].append(timer(k, 1))
    base = max(float(np.median(runs[0])), 1e-12)
    out = {k: full * float(np.median(runs[k])) / base for k in ks}
    log.info("draft heads: %s ms (full head %.3f ms)",
             ", ".join(f"K={k} {1e3 * s:.3f}" for k, s in out.items()), 1e3 * full)
    return out


def _offered_heads(backend: Backend) -> list[int]:
    """The reduced draft heads ``K`` the backend runs (``draft_vocab_sizes``; [] if none)."""
    sizes = getattr(backend, "draft_vocab_sizes", None)
    return sorted(sizes()) if callable(sizes) else []


def _top_up_heads(backend: Backend, model: TableCostModel, path: Path) -> None:
    """Time the reduced draft heads a cached profile lacks (profiles made before they
    existed, or before this tokenizer had a ranking) and save them into ``path``."""
    if model.vocab_size is None and getattr(backend, "vocab_size", None):
        model.vocab_size = int(backend.vocab_size)
    missing = [k for k in _offered_heads(backend) if k not in model.draft_heads]
    if not missing:
        return
    found = draft_head_seconds(backend, model.head(1), sizes=missing)
    if not found:
        return
    model.draft_heads.update(found)
    log.info("cached cost model %s lacked draft heads %s: measured now", path, missing)
    try:
        save_cost_model(model, path)
    except (OSError, KnapSpecError) as e:
        log.warning("could not save the measured draft heads into %s: %s", path, e)


# ------------------------------------------------------------------------------ cache


def default_profile_path(backend: Backend) -> Path:
    """The cache file of ``backend``'s profile: one per backend, model, dtype, threads and,
    off the CPU, device name (``describe()["device_name"]``, else ``["device"]``), e.g.
    ``torch-random:llama-3.1-8b-bfloat16-16-NVIDIA_H200.json``.  CPU profiles keep the key
    they had before devices existed, so the caches of CPU users stay valid."""
    d = backend.describe()
    fields = ("backend", "model_key", "dtype", "threads")
    key = "-".join(str(d.get(k, "")).replace("/", "_") for k in fields)
    device = backend_device(backend)
    if device != "cpu":
        name = str(d.get("device_name") or device)
        key += "-" + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    return cache_dir() / "costmodels" / f"{key}.json"


def estimate_profile_seconds(
    backend: Backend,
    contexts: Sequence[int] | None = None,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    repeats: int = DEFAULT_REPEATS,
    clock: Callable[[], float] | None = None,
    **_: Any,
) -> float:
    """Rough seconds (within about 2x) that ``profile_backend`` will take with these arguments.

    Times one call of the largest token count on an empty cache and a 128-token prefill
    (with the device's timer, ``timing.timer_for``), then assumes a call at context ``c``
    costs ``(1 + c / 4096)`` times the first, that a masked call costs 0.6 of a full one on
    average, and one prefill up to the longest context.  Leaves the cache empty.
    """
    ctxs, ns = _check_grid(backend, contexts, token_counts, repeats)
    timer = timer_for(backend, clock)
    toks = [0] * ns[-1]
    backend.reset()
    backend.forward(toks, None, all_logits=True)  # warm-up
    backend.reset()
    call = timer.time(lambda: backend.forward(toks, None, all_logits=True))
    fill = min(128, backend.max_context - ns[-1] - 1)
    backend.reset()
    per_token = timer.time(lambda: backend.forward([0] * fill, None, all_logits=False))
    per_token /= max(fill, 1)
    backend.reset()
    calls = len(ns) * 4 * (repeats + 1)
    return sum(calls * 0.6 * call * (1 + c / 4096) for c in ctxs) + per_token * ctxs[-1]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    minutes = seconds / 60
    return f"about {minutes:.0f} minute{'s' if round(minutes) != 1 else ''}"


def cached_profile(
    backend: Backend,
    path: str | os.PathLike | None = None,
    refresh: bool = False,
    allow_untrusted: bool = False,
    notice: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> TableCostModel:
    """Load the backend's cost model from ``path`` (default: the user cache), else profile and save.

    The default file name (``default_profile_path``) encodes the backend, model, dtype,
    thread count and, off the CPU, the device name, so a profile is reused only for the
    same model, backend, dtype, threads and device.  Before profiling, one line says
    what is happening, roughly how long it takes and where the result goes: logged at INFO
    and passed to ``notice`` (the CLI writes it to stderr).

    A cached profile lacking draft heads the backend offers (``draft_head_seconds``) has
    them timed now (under a second) and saved into the file.

    Args:
        refresh: profile again even if the file exists.
        allow_untrusted: cache a profile that failed its trust checks (it stays marked
            ``meta["trust"]["trusted"] = False``) instead of refusing.
        kwargs: passed to ``backend.profile`` (see ``profile_backend``).

    Raises:
        UntrustedProfileError: the fresh profile failed its trust checks; nothing was
            written.
    """
    p = Path(path) if path is not None else default_profile_path(backend)
    if p.exists() and not refresh:
        model = load_cost_model(p)
        if isinstance(model, TableCostModel):
            trust = model.meta.get("trust") or {}
            if trust.get("trusted") is False:
                log.warning("cached cost model %s is marked untrusted (%s)", p,
                            "; ".join(trust.get("reasons") or ["no reason recorded"]))
            else:
                log.info("using cached cost model %s", p)
            _top_up_heads(backend, model, p)
            return model
    p.parent.mkdir(parents=True, exist_ok=True)
    est = estimate_profile_seconds(backend, **kwargs)
    d = backend.describe()
    device = backend_device(backend)
    what = ", ".join(str(x) for x in (d.get("model"), None if device == "cpu" else device,
                                      f"{backend_threads(backend)} threads") if x)
    message = (f"measuring this machine's {backend.name} latencies ({what}) to plan drafts: "
               f"{_duration(est)}, done once per model, backend and thread count; "
               f"the result is cached at {p}")
    log.info("%s", message)
    if notice is not None:
        notice(message)
    model = backend.profile(**kwargs)
    trust = model.meta.get("trust") or {}
    if trust.get("trusted") is False:
        why = "; ".join(trust.get("reasons") or ["failed its trust checks"])
        if not allow_untrusted:
            raise UntrustedProfileError(
                f"profile not cached, its timings look disturbed by other work: {why}; "
                "re-run on an idle machine, or `knapspec profile --force` to keep it "
                f"(marked untrusted) at {p}"
            )
        log.warning("caching a profile marked untrusted at %s: %s", p, why)
    save_cost_model(model, p)
    log.info("saved cost model to %s", p)
    return model
