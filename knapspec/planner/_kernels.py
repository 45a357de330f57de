"""Numba kernels behind :mod:`knapspec.planner.solvers` (0/1 knapsack).

Every kernel is an ``@njit(cache=True)`` function over plain NumPy arrays and scalars; none
allocates its outputs (the Python wrappers in :mod:`knapspec.planner.solvers` validate the
input, allocate, and call in).  Conventions shared by all kernels:

* ``values``  -- float64 ``[n]``, item values (finite; validated by the caller).
* ``weights`` -- int64 ``[n]``, non-negative integer item weights (capacity units).
* ``dp``      -- float64 ``[W+1]``, ``dp[c]`` = best total value with total weight ``<= c``.
* ``take``    -- bool ``[n, W+1]``, ``take[i, c]`` is True iff item ``i`` improves the best
  value at capacity ``c`` once items ``0..i`` are available (the DP decision table).

All DP kernels update cells through :func:`row_update` (double-buffered rows), so exact,
capacity-parallel and batch results are identical bit for bit.

Tie rule: an item is taken only on a *strict* improvement (``cand > best``), so results are
deterministic and items of value ``<= 0`` are never taken.  The value of an optimal item set
recovered by :func:`backtrack` equals ``dp[c]`` bit for bit when summed from ``0.0`` in
increasing item order (:func:`masked_sum`), because that is exactly the order the DP adds.

Topics: exact DP (serial, capacity-parallel, instance-parallel batch), recovery (one set, or
every distinct set of a frontier), greedy.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# ---------------------------------------------------------------------------------------
# Exact dynamic programme
# ---------------------------------------------------------------------------------------


@njit(cache=True)
def row_update(src, dst, row, w, v, a, b):
    """One item's DP update on the capacity cells ``a <= c < b``.

    ``dst[c] = max(src[c], src[c - w] + v)`` (strict ``>`` decides) and ``row[c]`` records
    whether the item was taken.  Every DP kernel goes through this function, so all of
    them perform the same floating-point operations per cell.

    Args:
        src: float64 ``[W+1]``, best values before the item.
        dst: float64 ``[W+1]`` output row (must not overlap ``src``).
        row: bool ``[W+1]`` output, this item's row of the decision table.
        w: item weight (non-negative int).
        v: item value (float).
        a, b: cell range, ``0 <= a <= b <= W+1``.
    """
    lo = min(max(w, a), b)  # cells below the item's weight cannot take it
    for c in range(a, lo):
        dst[c] = src[c]
        row[c] = False
    m = b - lo
    if m > 0:
        # Slices keep every index a plain 0-based loop counter, so LLVM can vectorise.
        s_lo = src[lo - w : b - w]
        s_hi = src[lo:b]
        d_hi = dst[lo:b]
        r_hi = row[lo:b]
        for k in range(m):
            cand = s_lo[k] + v
            old = s_hi[k]
            t = cand > old
            d_hi[k] = cand if t else old
            r_hi[k] = t


@njit(cache=True)
def dp_exact(values, weights, dp, take):
    """Serial 0/1 knapsack DP over a double-buffered row.

    Args:
        values: float64 ``[n]``.
        weights: int64 ``[n]``, non-negative.
        dp: float64 ``[W+1]`` output; overwritten with the best value per capacity.
        take: bool ``[n, W+1]`` output (C-contiguous); every entry is written.

    Cost O(n * W) time, ``2 * (W+1)`` float64 scratch.
    """
    n = values.shape[0]
    cap = dp.shape[0] - 1
    buf = np.zeros((2, cap + 1), dtype=np.float64)
    for i in range(n):
        row_update(buf[i % 2], buf[(i + 1) % 2], take[i], weights[i], values[i], 0, cap + 1)
    last = buf[n % 2]
    for c in range(cap + 1):
        dp[c] = last[c]


@njit(parallel=True, cache=True)
def dp_parallel(values, weights, dp, take, n_chunks):
    """Same DP as :func:`dp_exact`, parallel over the capacity axis (``prange``).

    For each item the capacity cells are split into ``n_chunks`` contiguous chunks that
    are updated concurrently from the previous row of the double buffer.  Every cell goes
    through :func:`row_update` exactly as in :func:`dp_exact`, so the results are equal
    bit for bit.

    Args:
        values: float64 ``[n]``.
        weights: int64 ``[n]``, non-negative.
        dp: float64 ``[W+1]`` output.
        take: bool ``[n, W+1]`` output; every entry is written.
        n_chunks: number of capacity chunks per item (the caller passes
            ``numba.get_num_threads()``; calling it here would stop numba caching the kernel).

    Cost O(n * W) work, ``2 * (W+1)`` float64 scratch, one parallel region per item.
    """
    n = values.shape[0]
    cap = dp.shape[0] - 1
    n_chunks = max(1, min(n_chunks, cap + 1))
    size = (cap + 1 + n_chunks - 1) // n_chunks
    buf = np.zeros((2, cap + 1), dtype=np.float64)
    for i in range(n):
        src = buf[i % 2]
        dst = buf[(i + 1) % 2]
        row = take[i]
        w = weights[i]
        v = values[i]
        for j in prange(n_chunks):
            a = min(j * size, cap + 1)
            b = min(a + size, cap + 1)
            row_update(src, dst, row, w, v, a, b)
    last = buf[n % 2]
    for c in range(cap + 1):
        dp[c] = last[c]


@njit(parallel=True, cache=True)
def dp_exact_batch(values, weights, dp_flat, dp_off, take_flat, take_off):
    """Run :func:`dp_exact` on ``B`` instances in parallel (``prange`` over instances).

    Args:
        values: float64 ``[B, n]`` (C-contiguous).
        weights: int64 ``[B, n]`` (C-contiguous).
        dp_flat: float64 ``[sum_b (W_b+1)]`` output; instance ``b`` owns
            ``dp_flat[dp_off[b]:dp_off[b+1]]`` (its ``dp``, length ``W_b+1``).
        dp_off: int64 ``[B+1]`` offsets into ``dp_flat``.
        take_flat: bool ``[sum_b n*(W_b+1)]`` output; instance ``b`` owns
            ``take_flat[take_off[b]:take_off[b+1]]`` viewed as ``[n, W_b+1]``.
        take_off: int64 ``[B+1]`` offsets into ``take_flat``.
    """
    n_inst = values.shape[0]
    n = values.shape[1]
    for b in prange(n_inst):
        k = dp_off[b + 1] - dp_off[b]
        dp = dp_flat[dp_off[b] : dp_off[b + 1]]
        take = take_flat[take_off[b] : take_off[b + 1]].reshape((n, k))
        dp_exact(values[b], weights[b], dp, take)


# ---------------------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------------------


@njit(cache=True)
def backtrack(take, weights, c, mask):
    """Recover an optimal item set for capacity ``c`` from a DP decision table.

    Args:
        take: bool ``[n, W+1]`` decision table from :func:`dp_exact` / :func:`dp_parallel`.
        weights: int64 ``[n]``, the weights the table was built with.
        c: capacity, ``0 <= c <= W``.
        mask: bool ``[n]`` output; ``mask[i]`` is True iff item ``i`` is chosen.
    """
    n = weights.shape[0]
    for i in range(n - 1, -1, -1):
        if take[i, c]:
            mask[i] = True
            c -= weights[i]
        else:
            mask[i] = False


@njit(cache=True)
def frontier_masks(take, weights, greedy, out):
    """The distinct item sets of a frontier, in order of first appearance as capacity grows.

    Row ``c`` of ``out`` first receives the item set at capacity ``c`` (what
    :meth:`~knapspec.planner.solvers.KnapsackFrontier.mask` returns for ``c``); the rows are
    then compacted in place so rows ``0..K-1`` hold each distinct set once, at the position
    of its smallest capacity.  Sets are compared through a 64-bit FNV-1a hash of their bits
    and, on equal hashes, bit by bit, so the result is exact.

    Args:
        take: bool ``[n, W+1]``: the DP decision table (``greedy`` False) or, for the greedy
            frontier, column ``c`` = the chosen item set at capacity ``c``.
        weights: int64 ``[n]``, the weights the table was built with.
        greedy: whether ``take`` holds item sets directly (greedy) or DP decisions.
        out: bool ``[W+1, n]`` output (scratch for every capacity's set).

    Returns:
        ``K``, the number of distinct sets (``1 <= K <= W+1``).

    Cost O(n * W) time; O(W) scratch.
    """
    n = weights.shape[0]
    m = take.shape[1]
    h = np.empty(m, dtype=np.uint64)
    prime = np.uint64(1099511628211)
    for c in range(m):
        row = out[c]
        if greedy:
            for i in range(n):
                row[i] = take[i, c]
        else:
            backtrack(take, weights, c, row)
        x = np.uint64(14695981039346656037)
        for i in range(n):
            x = (x ^ np.uint64(row[i])) * prime
        h[c] = x
    order = np.argsort(h, kind="mergesort")  # equal hashes stay in capacity order
    dup = np.zeros(m, dtype=np.bool_)
    start = 0
    while start < m:
        stop = start + 1
        while stop < m and h[order[stop]] == h[order[start]]:
            stop += 1
        for a in range(start + 1, stop):  # later capacities against earlier, same hash
            ra = order[a]
            for b in range(start, a):
                rb = order[b]
                if dup[rb]:
                    continue
                same = True
                for i in range(n):
                    if out[ra, i] != out[rb, i]:
                        same = False
                        break
                if same:
                    dup[ra] = True
                    break
        start = stop
    k = 0
    for c in range(m):  # compact in place: the write row never passes the read row
        if not dup[c]:
            if k != c:
                for i in range(n):
                    out[k, i] = out[c, i]
            k += 1
    return k


@njit(cache=True)
def masked_sum(values, mask):
    """Sum ``values[mask]`` from ``0.0`` in increasing index order (the DP's order).

    Args:
        values: float64 ``[n]``.
        mask: bool ``[n]``.

    Returns:
        float64 total.
    """
    s = 0.0
    for i in range(values.shape[0]):
        if mask[i]:
            s += values[i]
    return s


# ---------------------------------------------------------------------------------------
# Greedy 1/2-approximation
# ---------------------------------------------------------------------------------------


@njit(cache=True)
def greedy_order(values, weights):
    """Indices of the positive-value items by decreasing value/weight ratio.

    Zero-weight items come first (ratio +inf); items with value ``<= 0`` are left out;
    ties keep increasing index order (stable merge sort).

    Args:
        values: float64 ``[n]``.
        weights: int64 ``[n]``.

    Returns:
        int64 ``[m]``, ``m <=`` n.
    """
    n = values.shape[0]
    m = 0
    for i in range(n):
        if values[i] > 0.0:
            m += 1
    idx = np.empty(m, dtype=np.int64)
    key = np.empty(m, dtype=np.float64)
    k = 0
    for i in range(n):
        if values[i] > 0.0:
            idx[k] = i
            if weights[i] == 0:
                key[k] = -np.inf
            else:
                key[k] = -(values[i] / weights[i])
            k += 1
    order = np.argsort(key, kind="mergesort")
    return idx[order]


@njit(cache=True)
def greedy_fill(values, weights, order, cap, mask):
    """Greedy by ratio at capacity ``cap``, compared with the best single item.

    Walks ``order`` (from :func:`greedy_order`), taking every item that still fits and
    skipping (not stopping at) those that do not.  The best single positive item that fits
    replaces the greedy set only if strictly better.

    Args:
        values: float64 ``[n]``.
        weights: int64 ``[n]``.
        order: int64 ``[m]`` from :func:`greedy_order`.
        cap: capacity (non-negative int).
        mask: bool ``[n]`` output.

    Returns:
        float64 value of ``mask``, summed as in :func:`masked_sum`.
    """
    n = values.shape[0]
    for i in range(n):
        mask[i] = False
    rem = cap
    for k in range(order.shape[0]):
        i = order[k]
        if weights[i] <= rem:
            mask[i] = True
            rem -= weights[i]
    g = masked_sum(values, mask)
    best_i = -1
    best_v = 0.0
    for i in range(n):
        if weights[i] <= cap and values[i] > best_v:
            best_v = values[i]
            best_i = i
    if best_i >= 0 and best_v > g:
        for i in range(n):
            mask[i] = False
        mask[best_i] = True
        g = masked_sum(values, mask)
    return g


@njit(cache=True)
def greedy_frontier(values, weights, order, dp, take_t):
    """Greedy value for every capacity ``0..W``, made monotone by a running maximum.

    ``dp[c]`` is the best :func:`greedy_fill` value over capacities ``<= c`` (the set
    found at the smallest such capacity; later capacities replace it only on strict
    improvement), so ``dp`` is non-decreasing and still at least half the optimum for
    non-negative values.

    Args:
        values: float64 ``[n]``.
        weights: int64 ``[n]``.
        order: int64 ``[m]`` from :func:`greedy_order`.
        dp: float64 ``[W+1]`` output.
        take_t: bool ``[W+1, n]`` output; row ``c`` is the chosen item set at capacity ``c``.

    Cost O(n * W).
    """
    cap = dp.shape[0] - 1
    n = values.shape[0]
    mask = np.zeros(n, dtype=np.bool_)
    for c in range(cap + 1):
        g = greedy_fill(values, weights, order, c, mask)
        if c == 0 or g > dp[c - 1]:
            dp[c] = g
            for i in range(n):
                take_t[c, i] = mask[i]
        else:
            dp[c] = dp[c - 1]
            for i in range(n):
                take_t[c, i] = take_t[c - 1, i]
