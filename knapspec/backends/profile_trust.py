"""Can a profile be trusted?  Checks that catch timings poisoned by other work on the CPU.

A profile taken while another job shares the CPU can be off by a large factor at some
points (one such run put llama.cpp attention at 6,144 tokens at 61.7 ms against 1.5 ms at
4,096; taken alone it was 2.8 ms), and since the table cost model makes attention monotone
in context, one slow point raises every longer context too.  Three checks, all pure
functions of the measurements so they can be tested on synthetic data:

* **load** (``load_limit``): CPUs' worth of work by *other* processes while a context's
  points were measured (from ``/proc/stat`` over the CPUs this process may use, minus its
  own CPU time; where ``/proc/stat`` is missing, the 1-minute load average minus our
  threads).  More than the CPUs our threads leave free (``cpu_count - threads``) plus
  ``load_tolerance_cpus`` means the timings competed for a core.  The load in the second
  before profiling is recorded and logged, but not judged: a job that ended before the
  measurements does no harm.
* **spread** (``spread_flags``): the repeats of one point disagree: median absolute
  deviation over median above ``max_rel_spread`` (and above ``min_excess_s`` in absolute
  terms, so microsecond jitter on tiny calls does not count).  Needs 3 or more repeats.
* **jumps** (``jump_flags``): along the context axis every raw timing is a constant plus a
  near-linear attention term, so a point more than ``max_jump`` times what its neighbours
  imply (linear interpolation between them; for the last point, extrapolation of the two
  before it with a non-negative slope; for the first, the next point) is contradicted by
  them.

The profiler re-measures what is suspect (``TrustPolicy.max_retries`` rounds) and
``assess`` gives the final verdict; ``cached_profile`` refuses to cache an untrusted
profile (``UntrustedProfileError``) unless told to keep it marked untrusted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import KnapSpecError

log = logging.getLogger(__name__)

#: A suspect measurement: (context index, token-count index, mask name).
Point = tuple[int, int, str]


class UntrustedProfileError(KnapSpecError):
    """A profile failed its trust checks and was not cached; the message says why."""


@dataclass(frozen=True)
class TrustPolicy:
    """Thresholds of the trust checks (see the module doc).

    Attributes:
        max_rel_spread: largest median absolute deviation of a point's repeats, as a
            fraction of their median.
        max_jump: largest ratio of a point to what its context neighbours imply.
        min_excess_s: seconds; a spread or jump smaller than this is never flagged.
        load_tolerance_cpus: CPUs of other work tolerated beyond those our threads leave free.
        max_retries: rounds of re-measuring suspect points before giving up.
    """

    max_rel_spread: float = 0.25
    max_jump: float = 1.5
    min_excess_s: float = 1e-4
    load_tolerance_cpus: float = 0.5
    max_retries: int = 2

    def __post_init__(self) -> None:
        if not (self.max_rel_spread > 0 and self.max_jump > 1 and self.min_excess_s >= 0
                and self.load_tolerance_cpus >= 0 and self.max_retries >= 0):
            raise KnapSpecError(f"invalid trust thresholds: {self}")


# ------------------------------------------------------------------------------ load


@dataclass(frozen=True)
class CpuSample:
    """One reading of the machine's CPU use.

    Attributes:
        wall: monotonic seconds.
        busy: busy CPU-seconds summed over all CPUs since boot (``/proc/stat``), or ``None``.
        own: CPU-seconds used by this process so far (all its threads).
        loadavg: 1-minute load average, or ``None``.
    """

    wall: float
    busy: float | None
    own: float
    loadavg: float | None


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None


def proc_stat_busy(text: str, cpus: set[int] | None, hz: float) -> float | None:
    """Busy CPU-seconds since boot in ``/proc/stat`` ``text``, summed over ``cpus`` (the
    CPUs this process may use: work elsewhere on a shared host does not slow it down), or
    over the machine when ``cpus`` is ``None``; ``None`` if ``text`` cannot be read."""
    total, seen = 0, False
    for line in text.splitlines():
        name, *fields = line.split() or [""]
        index = name[3:]
        if not name.startswith("cpu") or not (index == "" or index.isdigit()):
            continue
        if (cpus is None) != (index == "") or (cpus is not None and int(index) not in cpus):
            continue
        try:
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        except ValueError:
            return None
        if len(ticks) < 8:
            return None
        total += sum(ticks) - ticks[3] - ticks[4]
        seen = True
    return total / hz if seen else None


def _proc_stat_busy() -> float | None:
    """Busy CPU-seconds of the CPUs this process may use (``None`` off Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            text = f.read()
        hz = float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None
    return proc_stat_busy(text, _affinity(), hz)


def sample_cpu() -> CpuSample:
    """Read the machine's CPU use now."""
    try:
        load: float | None = os.getloadavg()[0]
    except OSError:  # pragma: no cover - platform without a load average
        load = None
    return CpuSample(time.monotonic(), _proc_stat_busy(), time.process_time(), load)


def other_cpus(a: CpuSample, b: CpuSample, threads: int) -> float | None:
    """CPUs' worth of work by other processes between samples ``a`` and ``b``.

    From ``/proc/stat`` when both samples have it (busy CPU time less our own, per wall
    second); else the load average at ``b`` less our ``threads``; ``None`` if neither.
    """
    wall = b.wall - a.wall
    if a.busy is not None and b.busy is not None and wall > 0:
        return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / wall
    if b.loadavg is not None:
        return max(0.0, b.loadavg - threads)
    return None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where known, else ``os.cpu_count``)."""
    cpus = _affinity()
    return len(cpus) if cpus else os.cpu_count() or 1


def load_limit(threads: int, cpu_count: int, policy: TrustPolicy) -> float:
    """Most CPUs of other work that leave ``threads`` profiling threads undisturbed."""
    return max(cpu_count - threads, 0) + policy.load_tolerance_cpus


# ------------------------------------------------------------------------------ checks


def spread_flags(samples: Mapping[str, np.ndarray], policy: TrustPolicy) -> dict[Point, float]:
    """Points whose repeats disagree, with their relative spread.

    Args:
        samples: mask name -> seconds ``[C, N, R]`` (``R`` repeats of each point).

    Returns:
        ``{(i, j, name): MAD / median}`` for each flagged point.
    """
    out: dict[Point, float] = {}
    for name, s in samples.items():
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 3:
            raise KnapSpecError(f"samples[{name!r}]: expected [C, N, R], got shape {s.shape}")
        if s.shape[2] < 3:
            continue
        med = np.median(s, axis=2)
        mad = np.median(np.abs(s - med[..., None]), axis=2)
        rel = mad / np.maximum(med, 1e-12)
        for i, j in zip(*np.nonzero((rel > policy.max_rel_spread) & (mad > policy.min_excess_s)),
                        strict=True):
            out[(int(i), int(j), name)] = float(rel[i, j])
    return out


def _implied(t: np.ndarray, c: np.ndarray, i: int) -> float:
    """What the neighbours of point ``i`` imply for ``t[i]`` (``t``, ``c``: ``[C]``)."""
    k = t.size
    if 0 < i < k - 1:
        w = (c[i] - c[i - 1]) / (c[i + 1] - c[i - 1])
        return float(t[i - 1] + w * (t[i + 1] - t[i - 1]))
    if i == k - 1:
        if k == 2:
            return float("inf")  # a longer context may cost anything more
        slope = max((t[i - 1] - t[i - 2]) / (c[i - 1] - c[i - 2]), 0.0)
        return float(t[i - 1] + slope * (c[i] - c[i - 1]))
    return float(t[1])  # the first point should not exceed the next


def jump_flags(
    medians: Mapping[str, np.ndarray], contexts: Sequence[int], policy: TrustPolicy
) -> dict[Point, float]:
    """Points far above what their context neighbours imply, with that ratio.

    Args:
        medians: mask name -> median seconds ``[C, N]``.
        contexts: ``[C]`` increasing context lengths (tokens).

    Returns:
        ``{(i, j, name): measured / implied}`` for each flagged point.
    """
    c = np.asarray(contexts, dtype=np.float64)
    out: dict[Point, float] = {}
    if c.size < 2:
        return out
    for name, m in medians.items():
        m = np.asarray(m, dtype=np.float64)
        for j in range(m.shape[1]):
            col = m[:, j]
            for i in range(c.size):
                implied = _implied(col, c, i)
                if (col[i] > policy.max_jump * implied
                        and col[i] - implied > policy.min_excess_s):
                    out[(i, j, name)] = float(col[i] / max(implied, 1e-12))
    return out


@dataclass
class TrustReport:
    """The verdict on one set of measurements.

    Attributes:
        trusted: no check fired.
        reasons: one short phrase per kind of failure (empty when trusted).
        suspects: points to re-measure (spread or jump), as ``(i, j, mask)``.
        loaded_rows: context indices measured under too much other work (re-measure whole).
        evidence: JSON-able numbers behind the verdict (stored in the profile's meta).
    """

    trusted: bool
    reasons: list[str]
    suspects: set[Point] = field(default_factory=set)
    loaded_rows: set[int] = field(default_factory=set)
    evidence: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """The reasons in one line."""
        return "; ".join(self.reasons) if self.reasons else "all checks passed"


def _describe(point: Point, contexts: Sequence[int], ns: Sequence[int]) -> str:
    i, j, name = point
    return f"'{name}' at context {int(contexts[i])}, {int(ns[j])} tokens"


def assess(
    samples: Mapping[str, np.ndarray],
    contexts: Sequence[int],
    token_counts: Sequence[int],
    row_load: Sequence[float | None],
    threads: int,
    cpu_count: int,
    policy: TrustPolicy | None = None,
) -> TrustReport:
    """Judge a profile's measurements (a pure function: no clock, no machine).

    Args:
        samples: mask name -> seconds ``[C, N, R]``.
        contexts: ``[C]`` context lengths (tokens); token_counts: ``[N]`` tokens per call.
        row_load: ``[C]`` CPUs of other work while each context's points were measured
            (``None`` where unknown).
        threads: the backend's threads; cpu_count: CPUs usable by this process.
        policy: thresholds (default ``TrustPolicy()``).
    """
    policy = policy or TrustPolicy()
    medians = {k: np.median(np.asarray(v, dtype=np.float64), axis=2) for k, v in samples.items()}
    spread = spread_flags(samples, policy)
    jumps = jump_flags(medians, contexts, policy)
    limit = load_limit(threads, cpu_count, policy)
    loaded = {i for i, x in enumerate(row_load) if x is not None and x > limit}
    reasons = []
    if loaded:
        worst = max(loaded, key=lambda i: row_load[i] or 0.0)
        reasons.append(
            f"other work used {row_load[worst]:.1f} CPUs while context {int(contexts[worst])} "
            f"was measured (limit {limit:.1f}: {threads} threads on {cpu_count} CPUs)"
        )
    if jumps:
        worst_p = max(jumps, key=jumps.__getitem__)
        reasons.append(f"{len(jumps)} point(s) contradicted by their neighbours "
                       f"(worst: {_describe(worst_p, contexts, token_counts)} at "
                       f"{jumps[worst_p]:.1f}x their trend, limit {policy.max_jump}x)")
    if spread:
        worst_p = max(spread, key=spread.__getitem__)
        reasons.append(f"{len(spread)} point(s) with scattered repeats "
                       f"(worst: {_describe(worst_p, contexts, token_counts)}, spread "
                       f"{spread[worst_p]:.0%} of the median, limit {policy.max_rel_spread:.0%})")
    evidence = {
        "threads": threads,
        "cpu_count": cpu_count,
        "load_limit_cpus": limit,
        "other_cpus_during": [None if x is None else round(float(x), 3) for x in row_load],
        "max_rel_spread": max(spread.values(), default=0.0),
        "max_jump": max(jumps.values(), default=0.0),
        "thresholds": asdict(policy),
    }
    return TrustReport(not reasons, reasons, set(spread) | set(jumps), loaded, evidence)


def log_load_before(other: float | None, threads: int, cpu_count: int,
                    policy: TrustPolicy) -> None:
    """Warn when other work already uses the CPUs the profile needs (the timings will be
    checked and re-measured; a job that stops before they start does no harm)."""
    if other is not None and other > load_limit(threads, cpu_count, policy):
        log.warning("other work is using %.1f of %d CPUs before profiling with %d threads; "
                    "timings taken meanwhile will be re-measured or refused", other,
                    cpu_count, threads)


def load_before(seconds: float, sample: Callable[[], CpuSample] = sample_cpu,
                sleep: Callable[[float], None] = time.sleep) -> tuple[float | None, float | None]:
    """CPUs of other work over the next ``seconds`` (this process idle), and the load average.

    Returns ``(other_cpus, loadavg)``; where ``/proc/stat`` is missing, ``other_cpus`` is the
    load average itself (it may still include this process's own recent work).
    """
    a = sample()
    if seconds > 0:
        sleep(seconds)
    b = sample()
    return other_cpus(a, b, threads=0), b.loadavg
