"""The numba small-M linear (``knapspec.backends.torch.small_m``) against a float64 brute
force, its batch invariance (a row is bit-identical whatever the other rows), and its
refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knapspec.backends.torch import small_m


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 200), k=st.integers(1, 130),
       seed=st.integers(0, 2**31 - 1))
def test_matches_brute_force(m, n, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T  # [m, n]
    out = small_m.linear(x, w)
    assert out.shape == (m, n) and out.dtype == np.float32
    # float32 accumulation of k products of N(0,1) values: error grows like sqrt(k) ulps
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * k + 1e-5)


def test_rows_are_bit_identical_across_token_counts():
    """What lossless verification relies on: a token's output row is the same bits when it
    runs alone (a decoding step) and with others (verification of k drafts)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1000, 576)).astype(np.float32)  # N not a multiple of ROW_BLOCK
    x = rng.standard_normal((16, 576)).astype(np.float32)
    alone = np.concatenate([small_m.linear(x[i : i + 1], w) for i in range(16)])
    for m in (2, 5, 9, 16):
        assert np.array_equal(small_m.linear(x[:m], w), alone[:m])


def test_writes_into_out_with_any_thread_count():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((130, 33)).astype(np.float32)
    x = rng.standard_normal((3, 33)).astype(np.float32)
    out = np.full((3, 130), np.nan, np.float32)
    assert small_m.linear(x, w, out, threads=1) is out
    np.testing.assert_array_equal(out, small_m.linear(x, w, threads=2))


@pytest.mark.parametrize("x, w, match", [
    (np.ones((2, 3), np.float32), np.ones((4, 5), np.float32), "do not multiply"),
    (np.ones((2, 3), np.float64), np.ones((4, 3), np.float32), "float32 only"),
    (np.ones((3, 2), np.float32).T, np.ones((4, 3), np.float32), "C-contiguous"),
    (np.ones(3, np.float32), np.ones((4, 3), np.float32), "do not multiply"),
])
def test_refuses_what_it_cannot_take(x, w, match):
    with pytest.raises(ValueError, match=match):
        small_m.linear(x, w)
