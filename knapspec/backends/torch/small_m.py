"""A small-token-count linear for the CPU: ``y = x @ w.T`` with ``x`` of 1..16 rows, in numba.

Why: decoding, drafting and verification multiply every weight by ``M = 1..k+1`` token rows.
At such ``M`` the product is bound by reading the weight from memory, and both CPU
libraries torch offers spend far more than that read (SmolLM2-135M, fp32, 2 threads, the
30 MLPs of one step streamed from DRAM, issue 10's measurements):

=====  ============  ===========  ==================
M      ``F.linear``  oneDNN       this kernel
=====  ============  ===========  ==================
1      29.6 ms       22.4 ms      12-15 ms (~ DRAM)
5      51.0 ms       33.0 ms      20-25 ms
=====  ============  ===========  ==================

The kernel reads each weight row once per call (the ``M`` input rows stay in L1/L2) and
computes the ``M`` dot products of that row, four input rows per pass; rows of the weight
are shared out between the threads in blocks of ``ROW_BLOCK``.

Batch invariance: every output element ``y[m, n]`` is one dot product over ``k`` whose
summation order does not depend on ``M`` (measured: bit-identical rows for M = 1..16, a
test), so a token's row is the same whether it is verified alone or with others.  (MKL
and oneDNN switch kernels with ``M``.)

Threads: numba's own thread pool (``numba.set_num_threads``, set by the caller to torch's
thread count).  The kernel is float32 only; the caller falls back for other dtypes.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

#: weight rows per parallel work item
ROW_BLOCK = 64


@njit(fastmath=True, cache=True, inline="always")
def _dot(x: np.ndarray, m: int, w: np.ndarray, n: int) -> np.float32:  # pragma: no cover
    """sum_k x[m, k] * w[n, k] (one output element)."""
    acc = np.float32(0.0)
    for k in range(x.shape[1]):
        acc += x[m, k] * w[n, k]
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def _linear_rows(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """out[m, n] = sum_k x[m, k] * w[n, k].

    x: [M, K] float32 C-contiguous; w: [N, K] float32 C-contiguous; out: [M, N] float32.
    Input rows go four at a time through one pass over the weight row (one load of
    ``w[n, k]`` for four products), the rest one at a time.  ``fastmath`` lets LLVM
    vectorize the reductions over ``k``; it gives each of the five accumulators the same
    vectorization, so a row's result does not depend on which pass computed it (tested:
    ``tests/test_small_m.py``).
    """
    m_rows, k_len = x.shape
    n_rows = w.shape[0]
    blocks = (n_rows + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(blocks):
        for n in range(b * ROW_BLOCK, min(n_rows, (b + 1) * ROW_BLOCK)):
            m = 0
            while m + 4 <= m_rows:
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for k in range(k_len):
                    wk = w[n, k]
                    a0 += x[m, k] * wk
                    a1 += x[m + 1, k] * wk
                    a2 += x[m + 2, k] * wk
                    a3 += x[m + 3, k] * wk
                out[m, n] = a0
                out[m + 1, n] = a1
                out[m + 2, n] = a2
                out[m + 3, n] = a3
                m += 4
            while m < m_rows:
                out[m, n] = _dot(x, m, w, n)
                m += 1


def available() -> bool:
    """Whether numba can run the kernel in parallel here (a threading layer exists)."""
    try:
        return numba.config.NUMBA_NUM_THREADS >= 1
    except AttributeError:  # pragma: no cover - very old numba
        return False


def linear(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None,
           threads: int | None = None) -> np.ndarray:
    """``x @ w.T`` for float32 ``x`` [M, K] and ``w`` [N, K] (both C-contiguous) -> [M, N].

    ``out``: a preallocated [M, N] float32 array to write into; ``threads``: numba threads
    for this call (default: leave numba's setting).  Raises ``ValueError`` on shapes or
    dtypes the kernel does not take (the caller falls back to another kernel).
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"small_m.linear: x {x.shape} and w {w.shape} do not multiply")
    if x.dtype != np.float32 or w.dtype != np.float32:
        raise ValueError(f"small_m.linear: float32 only, got {x.dtype} and {w.dtype}")
    if not (x.flags.c_contiguous and w.flags.c_contiguous):
        raise ValueError("small_m.linear: x and w must be C-contiguous")
    if out is None:
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if threads is not None:
        threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
    _linear_rows(x, w, out)
    return out
