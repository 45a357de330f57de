"""0/1 knapsack solvers used by the planner.

Maximise the total value of a chosen item set subject to its total integer weight being
``<= capacity``.  In the planner an item is a transformer block, its weight its (integer,
quantised) cost and its value its benefit; see :mod:`knapspec.planner`.

Public API:

* :func:`knapsack` -- one capacity, returns a :class:`KnapsackResult` (value + item mask).
* :func:`knapsack_frontier` -- every capacity ``0..W`` at once, returns a
  :class:`KnapsackFrontier` whose :meth:`KnapsackFrontier.mask` recovers an item set and
  :meth:`KnapsackFrontier.distinct_masks` every distinct one.
* :func:`knapsack_frontier_batch` -- ``B`` instances of equal item count, optionally solved
  in parallel (one per context-length bucket in the planner).
* :func:`masked_value` -- the value of an item set, summed in the DP's order.
* :func:`warmup` -- compile (or load from numba's cache) the kernels of some or all methods
  on tiny inputs, so a first real solve does not pay for it.

Methods:

* ``"exact"`` -- O(n * W) dynamic programme, serial.
* ``"parallel"`` -- the same DP parallel over the capacity axis (numba ``prange``); its
  results are equal to ``"exact"`` bit for bit.  It opens one parallel region per item, so
  on few cores it is slower than ``"exact"`` at planner sizes (docs/benchmarks.md).  In
  :func:`knapsack_frontier_batch`
  ``"parallel"`` instead runs the serial DP on the instances in parallel.
* ``"greedy"`` -- value/weight-ratio greedy compared with the best single item;
  a 1/2-approximation when all values are non-negative.

Determinism: an item is taken only if it strictly improves the value, so items of value
``<= 0`` are never chosen and ties prefer *not* taking an item.  The reported value equals
``masked_value(values, mask)`` exactly (the sum of the chosen values from ``0.0`` in
increasing item order, the order in which the DP adds them).

Weights larger than the capacity are never chosen; internally the DP runs up to
``min(capacity, sum(weights))`` because the frontier is flat beyond the total weight.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import time
from dataclasses import dataclass, field

import numba
import numpy as np

from knapspec.errors import KnapSpecError
from knapspec.planner import _kernels

__all__ = [
    "BATCH_METHODS",
    "METHODS",
    "KnapsackFrontier",
    "KnapsackResult",
    "knapsack",
    "knapsack_frontier",
    "knapsack_frontier_batch",
    "masked_value",
    "memory_limit_bytes",
    "warmup",
]

logger = logging.getLogger(__name__)

METHODS = ("exact", "parallel", "greedy")
BATCH_METHODS = ("parallel", "exact", "greedy")

_MAX_TABLE_BYTES = 2 * 1024**3  # hard ceiling on the memory one solve may allocate
_ALWAYS_OK_BYTES = 64 * 1024**2  # solves below this size are never refused
_WEIGHT_CLIP = 2**40  # weights above capacity+1 are clipped; this bound avoids int64 overflow


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KnapsackResult:
    """Solution of one knapsack instance.

    Attributes:
        value: best total value found (float; exactly ``masked_value(values, mask)``).
        mask: bool ``[n]``; ``mask[i]`` is True iff item ``i`` is chosen.
    """

    value: float
    mask: np.ndarray


@dataclass(frozen=True, eq=False)
class KnapsackFrontier:
    """Best value for every capacity ``0..W`` plus what is needed to recover item sets.

    Attributes:
        values: float64 ``[W+1]`` (read-only), ``values[c]`` = best total value with total
            weight ``<= c``; non-decreasing.
        take: bool ``[n, W'+1]`` (read-only) with ``W' = min(W, sum(weights))``.  For
            ``"exact"``/``"parallel"`` the DP decision table (``take[i, c]``: item ``i``
            strictly improves capacity ``c`` given items ``0..i``); for ``"greedy"`` column
            ``c`` is directly the chosen item set at capacity ``c``.
        weights: int64 ``[n]`` (read-only), the weights used (clipped to ``W+1``).
        capacity: ``W``, the largest capacity covered.
        method: the method that built the frontier.
    """

    values: np.ndarray
    take: np.ndarray = field(repr=False)
    weights: np.ndarray = field(repr=False)
    capacity: int
    method: str

    @property
    def n_items(self) -> int:
        """Number of items ``n``."""
        return int(self.weights.shape[0])

    def mask(self, c: int) -> np.ndarray:
        """An item set achieving ``values[c]``.

        Args:
            c: capacity, integer with ``0 <= c <= capacity``.

        Returns:
            bool ``[n]`` (a fresh array): its total weight is ``<= c`` and
            ``masked_value(item_values, mask) == values[c]`` exactly.
        """
        c = _as_capacity(c, name="c")
        if c > self.capacity:
            raise KnapSpecError(f"c must be <= the frontier capacity {self.capacity}, got {c}")
        c_eff = min(c, self.take.shape[1] - 1)
        if self.method == "greedy":
            return np.array(self.take[:, c_eff], dtype=np.bool_)
        out = np.zeros(self.n_items, dtype=np.bool_)
        _kernels.backtrack(self.take, self.weights, c_eff, out)
        return out

    def distinct_masks(self) -> np.ndarray:
        """Every distinct item set of the frontier, in order of first appearance.

        Equal to collecting ``mask(c)`` for ``c = 0..capacity`` and keeping the first
        occurrence of each set, but in one compiled call (no per-capacity validation).

        Returns:
            bool ``[K, n]`` (a fresh array), ``1 <= K <= capacity + 1``; row 0 is the set at
            capacity 0.
        """
        out = np.empty((self.take.shape[1], self.n_items), dtype=np.bool_)
        k = _kernels.frontier_masks(self.take, self.weights, self.method == "greedy", out)
        return out[:k].copy()


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _as_array(x: object, name: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise KnapSpecError(f"{name} must be a numeric array: {exc}") from exc
    if arr.ndim != ndim:
        raise KnapSpecError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    return arr


def _first_bad(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _as_values(x: object, name: str = "values", ndim: int = 1) -> np.ndarray:
    """Validate item values -> C-contiguous float64 array of ``ndim`` dimensions."""
    arr = _as_array(x, name, ndim)
    if arr.dtype.kind not in "biuf":
        raise KnapSpecError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        idx = _first_bad(~finite)
        raise KnapSpecError(f"{name} must be finite (no NaN/inf); {name}{list(idx)} = {arr[idx]}")
    return arr


def _as_weights(x: object, clip: int, name: str = "weights", ndim: int = 1) -> np.ndarray:
    """Validate integer weights -> C-contiguous int64 array, clipped to ``clip``."""
    arr = _as_array(x, name, ndim)
    kind = arr.dtype.kind
    if kind == "b":
        arr = arr.astype(np.int64)
        kind = "i"
    if kind in "iu":
        if kind == "i" and (arr < 0).any():
            idx = _first_bad(arr < 0)
            raise KnapSpecError(f"{name} must be non-negative; {name}{list(idx)} = {arr[idx]}")
        return np.ascontiguousarray(np.minimum(arr, clip), dtype=np.int64)
    if kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            idx = _first_bad(~finite)
            raise KnapSpecError(f"{name} must be finite integers; {name}{list(idx)} = {arr[idx]}")
        if (arr < 0).any():
            idx = _first_bad(arr < 0)
            raise KnapSpecError(f"{name} must be non-negative; {name}{list(idx)} = {arr[idx]}")
        non_int = arr != np.floor(arr)
        if non_int.any():
            idx = _first_bad(non_int)
            raise KnapSpecError(f"{name} must be integral; {name}{list(idx)} = {arr[idx]}")
        return np.ascontiguousarray(np.minimum(arr, float(clip)), dtype=np.int64)
    raise KnapSpecError(f"{name} must be non-negative integers, got dtype {arr.dtype}")


def _as_capacity(x: object, name: str = "capacity") -> int:
    """Validate a non-negative integer (ints and integral floats accepted; bools are not)."""
    if isinstance(x, (bool, np.bool_)):
        raise KnapSpecError(f"{name} must be a non-negative integer, got bool {x!r}")
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(x) or not float(x).is_integer():
            raise KnapSpecError(f"{name} must be a non-negative integer, got {x!r}")
        c = int(x)
    else:
        try:
            c = operator.index(x)  # type: ignore[arg-type]
        except TypeError:
            raise KnapSpecError(
                f"{name} must be a non-negative integer, got {type(x).__name__} {x!r}"
            ) from None
    if c < 0:
        raise KnapSpecError(f"{name} must be non-negative, got {c}")
    return int(c)


def _check_method(method: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(method, str) or method not in allowed:
        raise KnapSpecError(f"unknown method {method!r}; expected one of {allowed}")
    return method


def memory_limit_bytes() -> int:
    """Most bytes one solve may allocate: ``min(2 GiB, half of the available RAM)``.

    Available RAM is ``MemAvailable`` from ``/proc/meminfo`` where present (it counts
    reclaimable page cache), else ``os.sysconf`` free pages, else only the 2 GiB ceiling.
    """
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return _MAX_TABLE_BYTES
    return int(min(_MAX_TABLE_BYTES, avail // 2))


def _check_memory(n_bytes: int, what: str) -> None:
    if n_bytes <= _ALWAYS_OK_BYTES:  # skip reading /proc/meminfo for small solves
        return
    limit = memory_limit_bytes()
    if n_bytes > limit:
        raise KnapSpecError(
            f"{what} would need about {n_bytes} bytes ({n_bytes / 2**30:.2f} GiB), above the "
            f"limit of {limit} bytes ({limit / 2**30:.2f} GiB); reduce the capacity or "
            "quantise the weights more coarsely"
        )


def _effective_capacity(weights: np.ndarray, cap: int) -> int:
    """``min(cap, sum(weights))`` without int64 overflow (weights are pre-clipped)."""
    if float(weights.sum(dtype=np.float64)) >= 2.0**62:
        return cap
    return min(cap, int(weights.sum()))


def _prepare(values: object, weights: object, capacity: object) -> tuple[np.ndarray, ...]:
    cap = _as_capacity(capacity)
    v = _as_values(values)
    w = _as_weights(weights, min(cap + 1, _WEIGHT_CLIP))
    if v.shape != w.shape:
        raise KnapSpecError(
            f"values and weights must have the same length, got {v.shape[0]} and {w.shape[0]}"
        )
    return v, w, cap


# ---------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------


def _solve_table(
    v: np.ndarray, w: np.ndarray, cap_eff: int, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Run the kernel for ``method``; return ``dp`` [cap_eff+1] and ``take`` [n, cap_eff+1]."""
    n = v.shape[0]
    dp = np.empty(cap_eff + 1, dtype=np.float64)
    if method == "greedy":
        take_t = np.empty((cap_eff + 1, n), dtype=np.bool_)
        _kernels.greedy_frontier(v, w, _kernels.greedy_order(v, w), dp, take_t)
        return dp, take_t.T
    take = np.empty((n, cap_eff + 1), dtype=np.bool_)
    if method == "exact":
        _kernels.dp_exact(v, w, dp, take)
    else:
        _kernels.dp_parallel(v, w, dp, take, numba.get_num_threads())
    return dp, take


def _table_bytes(n: int, cap_eff: int) -> int:
    """Bytes of one DP: bool table ``[n, W+1]``, two float64 scratch rows and ``dp``."""
    return n * (cap_eff + 1) + 3 * 8 * (cap_eff + 1)


def knapsack(
    values: object, weights: object, capacity: object, method: str = "exact"
) -> KnapsackResult:
    """Solve one 0/1 knapsack instance.

    Args:
        values: float array-like ``[n]``, finite (negative allowed: never chosen if harmful).
        weights: non-negative integer array-like ``[n]`` (ints or integral floats), in the
            same units as ``capacity``.
        capacity: non-negative integer.
        method: ``"exact"``, ``"parallel"`` or ``"greedy"``.

    Returns:
        :class:`KnapsackResult` with the best value and the bool ``[n]`` item mask.

    Raises:
        KnapSpecError: bad input (see module docstring) or a DP table over
            :func:`memory_limit_bytes`.
    """
    method = _check_method(method, METHODS)
    v, w, cap = _prepare(values, weights, capacity)
    n = v.shape[0]
    cap_eff = _effective_capacity(w, cap)
    mask = np.zeros(n, dtype=np.bool_)
    if method == "greedy":
        value = _kernels.greedy_fill(v, w, _kernels.greedy_order(v, w), cap_eff, mask)
        return KnapsackResult(value=float(value), mask=mask)
    _check_memory(_table_bytes(n, cap_eff), f"a knapsack DP table for n={n}, W={cap_eff}")
    dp, take = _solve_table(v, w, cap_eff, method)
    _kernels.backtrack(take, w, cap_eff, mask)
    return KnapsackResult(value=float(dp[cap_eff]), mask=mask)


def _make_frontier(
    dp: np.ndarray, take: np.ndarray, w: np.ndarray, cap: int, method: str
) -> KnapsackFrontier:
    if dp.shape[0] == cap + 1:
        out = dp
    else:
        out = np.empty(cap + 1, dtype=np.float64)
        out[: dp.shape[0]] = dp
        out[dp.shape[0] :] = dp[-1]
    for a in (out, take, w):
        a.flags.writeable = False
    return KnapsackFrontier(values=out, take=take, weights=w, capacity=cap, method=method)


def knapsack_frontier(
    values: object, weights: object, capacity: object, method: str = "exact"
) -> KnapsackFrontier:
    """Best value for every capacity ``0..capacity`` of one instance.

    Args:
        values: float array-like ``[n]``, finite.
        weights: non-negative integer array-like ``[n]``.
        capacity: non-negative integer ``W``.
        method: ``"exact"``, ``"parallel"`` (bit-for-bit equal to exact) or ``"greedy"``
            (``values[c]`` = best greedy value over capacities ``<= c``, so it is monotone
            and ``>= knapsack(..., c, "greedy").value``).

    Returns:
        :class:`KnapsackFrontier` with ``values`` float64 ``[W+1]``.  For the exact methods
        ``values[c] == knapsack(values, weights, c, method).value`` bit for bit.

    Raises:
        KnapSpecError: bad input or a table over :func:`memory_limit_bytes`.
    """
    method = _check_method(method, METHODS)
    v, w, cap = _prepare(values, weights, capacity)
    n = v.shape[0]
    cap_eff = _effective_capacity(w, cap)
    _check_memory(
        _table_bytes(n, cap_eff) + 8 * (cap + 1),
        f"a knapsack frontier for n={n}, W={cap}",
    )
    dp, take = _solve_table(v, w, cap_eff, method)
    return _make_frontier(dp, take, w, cap, method)


def knapsack_frontier_batch(
    values: object, weights: object, capacity: object, method: str = "parallel"
) -> list[KnapsackFrontier]:
    """Frontiers of ``B`` instances with the same number of items ``n``.

    Args:
        values: float array-like ``[B, n]``.
        weights: non-negative integer array-like ``[B, n]``.
        capacity: non-negative integer (shared) or integer array-like ``[B]``.
        method: ``"parallel"`` (serial exact DP per instance, instances in parallel via
            ``prange``), ``"exact"`` (instances one after another) or ``"greedy"``.
            ``"parallel"`` and ``"exact"`` give identical frontiers, each bit-for-bit equal
            to ``knapsack_frontier(values[b], weights[b], capacity[b], "exact")``.

    Returns:
        list of ``B`` :class:`KnapsackFrontier`.

    Raises:
        KnapSpecError: bad input or tables over :func:`memory_limit_bytes` in total.
    """
    method = _check_method(method, BATCH_METHODS)
    v = _as_values(values, ndim=2)
    n_inst, n = v.shape
    if np.ndim(capacity) == 0:
        caps = [_as_capacity(capacity)] * n_inst
    else:
        cap_arr = _as_array(capacity, "capacity", 1)
        if cap_arr.shape[0] != n_inst:
            raise KnapSpecError(
                f"capacity must be a scalar or have length B={n_inst}, got {cap_arr.shape[0]}"
            )
        caps = [_as_capacity(c.item(), name=f"capacity[{b}]") for b, c in enumerate(cap_arr)]
    w_raw = _as_weights(weights, _WEIGHT_CLIP, ndim=2)
    if w_raw.shape != v.shape:
        raise KnapSpecError(
            f"values and weights must have the same shape, got {v.shape} and {w_raw.shape}"
        )
    clip = np.array([min(c + 1, _WEIGHT_CLIP) for c in caps], dtype=np.int64).reshape(-1, 1)
    w = np.ascontiguousarray(np.minimum(w_raw, clip))
    caps_eff = [_effective_capacity(w[b], caps[b]) for b in range(n_inst)]
    need = sum(_table_bytes(n, ce) + 8 * (c + 1) for ce, c in zip(caps_eff, caps, strict=True))
    _check_memory(need, f"{n_inst} knapsack frontiers for n={n}, W={max(caps, default=0)}")
    if method != "parallel":
        return [knapsack_frontier(v[b], w[b], caps[b], method=method) for b in range(n_inst)]
    sizes = np.array([ce + 1 for ce in caps_eff], dtype=np.int64)
    dp_off = np.zeros(n_inst + 1, dtype=np.int64)
    dp_off[1:] = np.cumsum(sizes)
    take_off = dp_off * n
    dp_flat = np.empty(int(dp_off[-1]), dtype=np.float64)
    take_flat = np.empty(int(take_off[-1]), dtype=np.bool_)
    _kernels.dp_exact_batch(v, w, dp_flat, dp_off, take_flat, take_off)
    out = []
    for b in range(n_inst):
        dp = dp_flat[dp_off[b] : dp_off[b + 1]]
        take = take_flat[take_off[b] : take_off[b + 1]].reshape(n, int(sizes[b]))
        out.append(_make_frontier(dp, take, w[b].copy(), caps[b], "exact"))
    return out


def masked_value(values: object, mask: object) -> float:
    """Total value of an item set, summed from ``0.0`` in increasing item order.

    This is the order in which the solvers add values, so for any returned mask
    ``masked_value(values, mask) == result.value`` exactly.

    Args:
        values: float array-like ``[n]``.
        mask: bool array-like ``[n]``.
    """
    v = _as_values(values)
    m = np.ascontiguousarray(np.asarray(mask, dtype=np.bool_))
    if m.shape != v.shape:
        raise KnapSpecError(f"mask must have shape {v.shape}, got {m.shape}")
    return float(_kernels.masked_sum(v, m))


def warmup(methods: tuple[str, ...] = METHODS, batch: bool = True) -> float:
    """Compile (or load from numba's on-disk cache) solver kernels on tiny inputs.

    Args:
        methods: the methods whose single-instance kernels to prepare (``knapsack``,
            ``knapsack_frontier``, ``KnapsackFrontier.mask`` and ``distinct_masks``).
        batch: also prepare :func:`knapsack_frontier_batch` and :func:`masked_value`.

    Returns:
        seconds spent.
    """
    t0 = time.perf_counter()
    v = np.array([1.0, 2.0, -1.0, 0.5])
    w = np.array([1, 0, 2, 3], dtype=np.int64)
    for method in methods:
        method = _check_method(method, METHODS)
        knapsack(v, w, 3, method=method)
        frontier = knapsack_frontier(v, w, 4, method=method)
        frontier.mask(2)
        frontier.distinct_masks()
    if batch:
        knapsack_frontier_batch(np.stack([v, v]), np.stack([w, w]), 3, method="parallel")
        masked_value(v, v > 0)
    dt = time.perf_counter() - t0
    logger.info("knapsack kernels (%s) ready in %.3f s", ", ".join(methods), dt)
    return dt
