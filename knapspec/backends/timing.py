"""Timers that are true on the device that does the work.

A host clock read says when the host got there, not when an accelerator finished: CUDA
kernels run asynchronously, so timing a GPU call with ``perf_counter`` alone measures how
long it took to *launch* it.  Every measurement of the profiler
(``knapspec.backends.profiling``, ``profile_check``) therefore goes through a timer chosen
from the backend's device (``timer_for``):

* ``CpuTimer`` (``kind = "perf_counter"``): ``time.perf_counter`` around the call; on the
  CPU the call's own work is the work.
* ``CudaTimer`` (``kind = "cuda-events"``): synchronize the device (nothing launched
  earlier is counted), record a CUDA event on the device's current stream, call, record a
  second event, wait for it; the seconds between the two events.  That is the device's
  time from the start of the call to the end of its last kernel, including the gaps in
  which it waited for the host to launch the next kernel (what eager decoding pays).
* ``ClockTimer`` (``kind = "clock"``): any ``() -> seconds`` clock (tests pass fake clocks).

``median_seconds`` runs warm-up calls first, then takes the median of the repeats.
The device comes from ``backend.describe()["device"]`` or ``backend.device`` (``"cpu"`` when
absent: the llama.cpp and fake backends).  ``torch`` is imported only for a CUDA timer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import KnapSpecError

if TYPE_CHECKING:
    from .base import Backend

__all__ = [
    "ClockTimer",
    "CpuTimer",
    "CudaTimer",
    "Timer",
    "backend_device",
    "median_seconds",
    "timer_for",
]


class Timer(Protocol):
    """Seconds of one call, measured the way the device that runs it needs."""

    kind: str  # "perf_counter", "cuda-events" or "clock" (recorded in profile meta)

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds ``fn()`` took (its device work included)."""
        ...


class ClockTimer:
    """Seconds between two reads of ``clock`` around the call."""

    kind = "clock"

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def time(self, fn: Callable[[], object]) -> float:
        t0 = self.clock()
        fn()
        return self.clock() - t0


class CpuTimer(ClockTimer):
    """``time.perf_counter`` around the call: for work done by the calling host's CPUs."""

    kind = "perf_counter"

    def __init__(self) -> None:
        super().__init__(time.perf_counter)


class CudaTimer:
    """CUDA events around the call on ``device``'s current stream, after a synchronize.

    Args:
        device: the CUDA device the work runs on (``"cuda:0"``, a ``torch.device``...).
        cuda: the ``torch.cuda`` module (tests pass a stand-in: ``Event``,
            ``current_stream``, ``synchronize``).
    """

    kind = "cuda-events"

    def __init__(self, device: Any, cuda: Any = None) -> None:
        if cuda is None:
            import torch

            cuda = torch.cuda
        self.device, self.cuda = device, cuda

    def time(self, fn: Callable[[], object]) -> float:
        cuda = self.cuda
        start = cuda.Event(enable_timing=True)
        end = cuda.Event(enable_timing=True)
        stream = cuda.current_stream(self.device)
        cuda.synchronize(self.device)  # work launched before the call is not counted
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3  # elapsed_time is in milliseconds


def backend_device(backend: Backend) -> str:
    """The device ``backend`` computes on: ``describe()["device"]``, else its ``device``
    attribute (the torch backends' ``torch.device``), else ``"cpu"``."""
    try:
        device = backend.describe().get("device")
    except (AttributeError, TypeError):
        device = None
    return str(device or getattr(backend, "device", None) or "cpu")


def timer_for(backend: Backend, clock: Callable[[], float] | None = None) -> Timer:
    """The timer for ``backend``'s device: ``ClockTimer(clock)`` when a clock is given,
    ``CudaTimer`` on a CUDA device, else ``CpuTimer``."""
    if clock is not None:
        return ClockTimer(clock)
    device = backend_device(backend)
    if device.startswith("cuda"):
        return CudaTimer(device)
    return CpuTimer()


def median_seconds(timer: Timer, fn: Callable[[], object], repeats: int,
                   warmup: int = 1) -> float:
    """Median seconds of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise KnapSpecError(f"median_seconds: need repeats >= 1 and warmup >= 0, got "
                            f"{repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    return statistics.median(timer.time(fn) for _ in range(repeats))
