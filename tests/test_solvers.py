"""Property tests for the knapsack solvers in :mod:`knapspec.planner.solvers`."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knapspec.errors import KnapSpecError
from knapspec.planner import _kernels
from knapspec.planner.solvers import (
    BATCH_METHODS,
    METHODS,
    KnapsackFrontier,
    KnapsackResult,
    knapsack,
    knapsack_frontier,
    knapsack_frontier_batch,
    masked_value,
    warmup,
)

# ---------------------------------------------------------------------------------------
# Helpers and strategies
# ---------------------------------------------------------------------------------------

REL = 1e-12
ABS = 1e-9


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


def seq_sum(values: np.ndarray, mask: np.ndarray) -> float:
    """Sum from 0.0 in increasing index order -- the order the DP adds values."""
    s = 0.0
    for v, m in zip(values.tolist(), mask.tolist(), strict=True):
        if m:
            s += v
    return s


def subsets(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 2^n item sets: masks bool [2^n, n], total weights int [2^n], values float [2^n]."""
    n = len(values)
    masks = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    tot_w = masks.astype(np.int64) @ weights.astype(np.int64)
    tot_v = masks.astype(np.float64) @ values.astype(np.float64)
    return masks, tot_w, tot_v


def brute_opt(tot_w: np.ndarray, tot_v: np.ndarray, cap: int) -> float:
    return float(tot_v[tot_w <= cap].max())  # the empty set (value 0) is always feasible


def assert_valid(values, weights, cap, mask, value):
    """Mask is bool [n], fits, its DP-order sum is exactly value, takes no value<=0 item."""
    assert mask.dtype == np.bool_ and mask.shape == (len(values),)
    assert int(np.asarray(weights, dtype=np.int64)[mask].sum()) <= cap
    assert seq_sum(np.asarray(values, dtype=np.float64), mask) == value
    assert masked_value(values, mask) == value
    assert not np.any(np.asarray(values)[mask] <= 0.0)


value_elem = st.one_of(
    st.integers(-5, 10).map(float),  # many exact ties
    st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False),
)
nonneg_elem = st.one_of(
    st.integers(0, 10).map(float),
    st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False),
)


@st.composite
def instances(draw, max_n=14, max_w=12, elem=value_elem, slack=3):
    n = draw(st.integers(0, max_n))
    values = np.array(draw(st.lists(elem, min_size=n, max_size=n)), dtype=np.float64)
    weights = np.array(draw(st.lists(st.integers(0, max_w), min_size=n, max_size=n)), np.int64)
    cap = draw(st.integers(0, int(weights.sum()) + slack))
    return values, weights, cap


# ---------------------------------------------------------------------------------------
# Exact DP
# ---------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(instances())
def test_exact_matches_brute_force(inst):
    values, weights, cap = inst
    res = knapsack(values, weights, cap, method="exact")
    assert isinstance(res, KnapsackResult)
    _, tot_w, tot_v = subsets(values, weights)
    assert close(res.value, brute_opt(tot_w, tot_v, cap))
    assert_valid(values, weights, cap, res.mask, res.value)


@settings(max_examples=80, deadline=None)
@given(instances())
def test_frontier_consistent_with_knapsack_and_brute_force(inst):
    values, weights, cap = inst
    fr = knapsack_frontier(values, weights, cap, method="exact")
    assert isinstance(fr, KnapsackFrontier)
    assert fr.values.shape == (cap + 1,) and fr.values.dtype == np.float64
    assert fr.n_items == len(values) and fr.capacity == cap
    assert np.all(np.diff(fr.values) >= 0.0)
    _, tot_w, tot_v = subsets(values, weights)
    for c in range(cap + 1):
        res = knapsack(values, weights, c, method="exact")
        assert fr.values[c] == res.value
        m = fr.mask(c)
        assert np.array_equal(m, res.mask)
        assert_valid(values, weights, c, m, fr.values[c])
        assert close(fr.values[c], brute_opt(tot_w, tot_v, c))


@settings(max_examples=80, deadline=None)
@given(instances(max_n=8, max_w=6, slack=4))
def test_exact_matches_networkx_longest_path(inst):
    """Oracle: longest path from (0, 0) in the layered DAG of (item, used capacity) states."""
    values, weights, cap = inst
    n = len(values)
    g = nx.MultiDiGraph()
    g.add_node((0, 0))
    for i in range(n):
        for c in range(cap + 1):
            g.add_edge((i, c), (i + 1, c), neg=0.0)  # skip item i
            if c + weights[i] <= cap:  # take item i
                g.add_edge((i, c), (i + 1, c + int(weights[i])), neg=-float(values[i]))
    dist = nx.single_source_bellman_ford_path_length(g, (0, 0), weight="neg")
    oracle = -min(d for (i, _), d in dist.items() if i == n)
    assert close(knapsack(values, weights, cap).value, oracle)
    assert close(knapsack_frontier(values, weights, cap).values[cap], oracle)


@settings(max_examples=100, deadline=None)
@given(instances(), st.data())
def test_permuting_items_permutes_solution(inst, data):
    values, weights, cap = inst
    perm = np.array(data.draw(st.permutations(range(len(values)))), dtype=np.int64)
    base = knapsack(values, weights, cap)
    moved = knapsack(values[perm], weights[perm], cap)
    assert close(moved.value, base.value)
    _, tot_w, tot_v = subsets(values, weights)
    opt = brute_opt(tot_w, tot_v, cap)
    n_optimal = int(np.sum((tot_w <= cap) & (tot_v >= opt - ABS - REL * abs(opt))))
    if n_optimal == 1:  # unique optimum: the chosen set must follow the items
        assert np.array_equal(moved.mask, base.mask[perm])


def test_ties_prefer_not_taking():
    # Equal items: the second never strictly improves on the first.
    assert knapsack([1.0, 1.0], [1, 1], 1).mask.tolist() == [True, False]
    # Zero-value and negative zero-weight items are never taken.
    res = knapsack([0.0, -2.0, 3.0, 0.0], [0, 0, 1, 1], 5)
    assert res.mask.tolist() == [False, False, True, False] and res.value == 3.0
    # Two sets of equal value: the one not using the later item wins.
    assert knapsack([2.0, 1.0, 1.0], [2, 1, 1], 2).mask.tolist() == [True, False, False]


def test_edge_cases_empty_and_large_capacity():
    for method in METHODS:
        res = knapsack([], [], 5, method=method)
        assert res.value == 0.0 and res.mask.shape == (0,)
        fr = knapsack_frontier([], [], 3, method=method)
        assert fr.values.tolist() == [0.0] * 4 and fr.mask(3).shape == (0,)
        # capacity far above the total weight: frontier still has length W+1
        fr = knapsack_frontier([1.0, 2.0], [1, 2], 10, method=method)
        assert fr.values.shape == (11,) and fr.values[10] == 3.0
        assert fr.mask(10).tolist() == [True, True]
        # a capacity too large to tabulate is fine for a single solve (clipped internally)
        assert knapsack([1.0, 2.0], [3, 4], 10**15, method=method).value == 3.0
    # integral float weights are accepted and equal integer weights
    a = knapsack_frontier([1.5, 2.0, 0.25], [1.0, 2.0, 0.0], 3)
    b = knapsack_frontier([1.5, 2.0, 0.25], [1, 2, 0], 3)
    assert np.array_equal(a.values, b.values)
    # weights above the capacity are never chosen
    assert knapsack([5.0, 1.0], [2**62, 1], 3).mask.tolist() == [False, True]


def test_frontier_arrays_are_read_only():
    fr = knapsack_frontier([1.0, 2.0], [1, 1], 2)
    with pytest.raises(ValueError):
        fr.values[0] = 9.0
    m = fr.mask(2)
    m[0] = False  # the recovered mask is a fresh, writable array
    assert fr.mask(2).tolist() == [True, True]


# ---------------------------------------------------------------------------------------
# Parallel DP: bit-for-bit equal to exact
# ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(instances(max_n=16, max_w=30, slack=10))
def test_parallel_equals_exact_bit_for_bit(inst):
    values, weights, cap = inst
    fe = knapsack_frontier(values, weights, cap, method="exact")
    fp = knapsack_frontier(values, weights, cap, method="parallel")
    assert np.array_equal(fe.values.view(np.int64), fp.values.view(np.int64))
    assert np.array_equal(fe.take, fp.take)
    for c in range(cap + 1):
        assert np.array_equal(fe.mask(c), fp.mask(c))
    re, rp = knapsack(values, weights, cap, "exact"), knapsack(values, weights, cap, "parallel")
    assert np.float64(re.value).view(np.int64) == np.float64(rp.value).view(np.int64)
    assert np.array_equal(re.mask, rp.mask)


@settings(max_examples=40, deadline=None)
@given(instances(max_n=12, max_w=30, slack=10), st.integers(1, 70))
def test_parallel_kernel_chunking_is_bit_identical(inst, n_chunks):
    """Any number of capacity chunks (not just the thread count) gives the exact DP."""
    values, weights, cap = inst
    n = len(values)
    dp_e, take_e = np.empty(cap + 1), np.empty((n, cap + 1), dtype=np.bool_)
    dp_p, take_p = np.empty(cap + 1), np.empty((n, cap + 1), dtype=np.bool_)
    _kernels.dp_exact(values, weights, dp_e, take_e)
    _kernels.dp_parallel(values, weights, dp_p, take_p, n_chunks)
    assert np.array_equal(dp_e.view(np.int64), dp_p.view(np.int64))
    assert np.array_equal(take_e, take_p)


def test_parallel_equals_exact_on_a_planner_sized_instance():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 160)
    weights = rng.integers(0, 60, 160)
    fe = knapsack_frontier(values, weights, 1024, method="exact")
    fp = knapsack_frontier(values, weights, 1024, method="parallel")
    assert np.array_equal(fe.values.view(np.int64), fp.values.view(np.int64))
    assert np.array_equal(fe.take, fp.take)


# ---------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(instances(elem=nonneg_elem))
def test_greedy_is_half_approximation(inst):
    values, weights, cap = inst
    _, tot_w, tot_v = subsets(values, weights)
    opt = brute_opt(tot_w, tot_v, cap)
    res = knapsack(values, weights, cap, method="greedy")
    assert_valid(values, weights, cap, res.mask, res.value)
    assert opt / 2 - ABS <= res.value <= opt + ABS


@settings(max_examples=60, deadline=None)
@given(instances())
def test_greedy_frontier_is_running_best_of_greedy(inst):
    values, weights, cap = inst
    fr = knapsack_frontier(values, weights, cap, method="greedy")
    assert fr.values.shape == (cap + 1,)
    assert np.all(np.diff(fr.values) >= 0.0)
    running = -math.inf
    _, tot_w, tot_v = subsets(values, weights)
    for c in range(cap + 1):
        g = knapsack(values, weights, c, method="greedy")
        assert_valid(values, weights, c, g.mask, g.value)
        running = max(running, g.value)
        assert fr.values[c] == running
        assert_valid(values, weights, c, fr.mask(c), fr.values[c])
        if np.all(values >= 0):
            assert fr.values[c] >= brute_opt(tot_w, tot_v, c) / 2 - ABS


def distinct_in_order(masks: list[np.ndarray]) -> list[np.ndarray]:
    """First occurrence of each mask, in the order given (what the planner used to loop)."""
    seen, out = set(), []
    for m in masks:
        if m.tobytes() not in seen:
            seen.add(m.tobytes())
            out.append(m)
    return out


@settings(max_examples=120, deadline=None)
@given(instances(max_n=12, max_w=10, slack=4), st.sampled_from(METHODS))
def test_distinct_masks_equal_the_python_loop_over_capacities(inst, method):
    values, weights, cap = inst
    fr = knapsack_frontier(values, weights, cap, method=method)
    expected = distinct_in_order([fr.mask(c) for c in range(cap + 1)])
    got = fr.distinct_masks()
    assert got.dtype == np.bool_ and got.shape == (len(expected), len(values))
    for g, e in zip(got, expected, strict=True):
        assert np.array_equal(g, e)


def test_distinct_masks_drop_repeats_that_are_not_adjacent():
    # take table where capacity 0 and 2 choose the same set and capacity 1 another
    take = np.array([[False, True, False], [False, False, True]])
    weights = np.array([1, 2], dtype=np.int64)
    fr = KnapsackFrontier(values=np.zeros(3), take=take, weights=weights, capacity=2,
                          method="greedy")
    assert fr.distinct_masks().tolist() == [[False, False], [True, False], [False, True]]
    take_g = np.array([[False, True, False], [False, False, False]])
    fr = KnapsackFrontier(values=np.zeros(3), take=take_g, weights=weights, capacity=2,
                          method="greedy")
    assert fr.distinct_masks().tolist() == [[False, False], [True, False]]


def test_greedy_rules():
    # ratio order with skip-and-continue: item 0 (ratio 2), item 1 skipped, item 2 fits
    assert knapsack([6.0, 5.0, 1.0], [3, 5, 1], 4, "greedy").mask.tolist() == [True, False, True]
    # the best single item beats the greedy set {2, 1} (value 4)
    res = knapsack([10.0, 1.0, 3.0], [10, 1, 2], 11, "greedy")
    assert res.mask.tolist() == [True, False, False] and res.value == 10.0
    # zero-weight positive items are always taken; negative / zero values never
    res = knapsack([-1.0, 0.5, 0.0, 4.0], [0, 0, 0, 9], 3, "greedy")
    assert res.mask.tolist() == [False, True, False, False]


# ---------------------------------------------------------------------------------------
# Batch
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 4),
    st.integers(0, 10),
    st.booleans(),
    st.sampled_from(BATCH_METHODS),
    st.data(),
)
def test_batch_equals_per_instance(n_inst, n, shared_cap, method, data):
    vals = data.draw(st.lists(value_elem, min_size=n_inst * n, max_size=n_inst * n))
    wts = data.draw(st.lists(st.integers(0, 12), min_size=n_inst * n, max_size=n_inst * n))
    values = np.array(vals, dtype=np.float64).reshape(n_inst, n)
    weights = np.array(wts, dtype=np.int64).reshape(n_inst, n)
    if shared_cap:
        cap = data.draw(st.integers(0, 40))
        caps = [cap] * n_inst
    else:
        caps = data.draw(st.lists(st.integers(0, 40), min_size=n_inst, max_size=n_inst))
        cap = caps
    out = knapsack_frontier_batch(values, weights, cap, method=method)
    assert len(out) == n_inst
    single_method = "greedy" if method == "greedy" else "exact"
    for b, fb in enumerate(out):
        fs = knapsack_frontier(values[b], weights[b], caps[b], method=single_method)
        assert fb.capacity == caps[b]
        assert np.array_equal(fb.values.view(np.int64), fs.values.view(np.int64))
        for c in range(caps[b] + 1):
            assert np.array_equal(fb.mask(c), fs.mask(c))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

BIG = 10**10

BAD_SINGLE = [
    pytest.param(([1.0, math.nan], [1, 1], 2), {}, "finite", id="nan-value"),
    pytest.param(([1.0, math.inf], [1, 1], 2), {}, "finite", id="inf-value"),
    pytest.param(([1.0, -math.inf], [1, 1], 2), {}, "finite", id="neg-inf-value"),
    pytest.param((["a", "b"], [1, 1], 2), {}, "real numbers", id="string-values"),
    pytest.param(([1.0, 2.0], [1, -1], 2), {}, "non-negative", id="negative-int-weight"),
    pytest.param(([1.0, 2.0], [1.0, -2.0], 2), {}, "non-negative", id="negative-float-weight"),
    pytest.param(([1.0, 2.0], [1.0, 1.5], 2), {}, "integral", id="non-integral-weight"),
    pytest.param(([1.0, 2.0], [1.0, math.nan], 2), {}, "finite", id="nan-weight"),
    pytest.param(([1.0, 2.0], ["x", "y"], 2), {}, "integers", id="string-weights"),
    pytest.param(([1.0, 2.0], [1, 1, 1], 2), {}, "same length", id="length-mismatch"),
    pytest.param(([[1.0, 2.0]], [1, 1], 2), {}, "1-D", id="2d-values"),
    pytest.param(([1.0, 2.0], [[1, 1]], 2), {}, "1-D", id="2d-weights"),
    pytest.param((3.0, [1], 2), {}, "1-D", id="scalar-values"),
    pytest.param(([1.0, 2.0], [1, 1], -1), {}, "non-negative", id="negative-capacity"),
    pytest.param(([1.0, 2.0], [1, 1], 2.5), {}, "integer", id="fractional-capacity"),
    pytest.param(([1.0, 2.0], [1, 1], math.nan), {}, "integer", id="nan-capacity"),
    pytest.param(([1.0, 2.0], [1, 1], "3"), {}, "integer", id="string-capacity"),
    pytest.param(([1.0, 2.0], [1, 1], True), {}, "bool", id="bool-capacity"),
    pytest.param(([1.0, 2.0], [1, 1], 2), {"method": "dp"}, "unknown method", id="bad-method"),
    pytest.param(([1.0] * 4, [BIG] * 4, BIG), {}, "bytes", id="table-too-large"),
]


@pytest.mark.parametrize("solver", [knapsack, knapsack_frontier])
@pytest.mark.parametrize(("args", "kwargs", "match"), BAD_SINGLE)
def test_bad_input_raises(solver, args, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        solver(*args, **kwargs)
    assert isinstance(err.value, KnapSpecError)


def test_frontier_too_long_to_store_raises_but_single_solve_does_not():
    with pytest.raises(KnapSpecError, match="bytes"):
        knapsack_frontier([1.0, 2.0], [1, 2], BIG)
    assert knapsack([1.0, 2.0], [1, 2], BIG).value == 3.0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        pytest.param(([1.0, 2.0], [1, 1], 2), {}, "2-D", id="1d-values"),
        pytest.param(([[1.0, 2.0]], [[1, 1, 1]], 2), {}, "same shape", id="shape-mismatch"),
        pytest.param(([[1.0], [2.0]], [[1], [1]], [2]), {}, "length B=2", id="caps-length"),
        pytest.param(([[1.0], [2.0]], [[1], [1]], [2, -1]), {}, "non-negative", id="neg-cap"),
        pytest.param(([[1.0], [2.0]], [[1], [1]], [2, 0.5]), {}, "integer", id="frac-cap"),
        pytest.param(([[math.nan]], [[1]], 2), {}, "finite", id="nan-value"),
        pytest.param(([[1.0]], [[-1]], 2), {}, "non-negative", id="neg-weight"),
        pytest.param(([[1.0]], [[1]], 2), {"method": "fast"}, "unknown method", id="method"),
        pytest.param(([[1.0]] * 2, [[BIG]] * 2, BIG), {}, "bytes", id="too-large"),
    ],
)
def test_batch_bad_input_raises(args, kwargs, match):
    with pytest.raises(KnapSpecError, match=match):
        knapsack_frontier_batch(*args, **kwargs)


@pytest.mark.parametrize("c", [-1, 4, 1.5, None])
def test_frontier_mask_rejects_bad_capacity(c):
    fr = knapsack_frontier([1.0, 2.0], [1, 2], 3)
    with pytest.raises(KnapSpecError):
        fr.mask(c)


def test_masked_value_rejects_wrong_shape():
    with pytest.raises(KnapSpecError, match="shape"):
        masked_value([1.0, 2.0], [True])


def test_warmup_compiles_all_kernels():
    assert warmup() >= 0.0
    # after warm-up every method answers a tiny instance correctly
    for method in METHODS:
        assert knapsack([1.0, 2.0], [1, 1], 1, method=method).value == 2.0
