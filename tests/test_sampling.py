"""Speculative rejection sampling against its exact output distribution, d >= 2.

For draft distributions ``q_1..q_d`` and target distributions ``p_1..p_{d+1}`` (rows that do
not depend on earlier tokens), with drafts ``x_i ~ q_i``, ``rejection_verify`` emits the
accepted drafts and one more token.  Its exact law, enumerated here:

* draft ``i`` (reached) is accepted with probability ``min(p_i(x), q_i(x))`` summed over x;
* ``n`` drafts accepted, then recovered token ``t`` (``n < d``): probability
  ``prod_{j<n} min(p_j(x_j), q_j(x_j)) * max(p_n(t) - q_n(t), 0)`` (the rejection mass
  ``1 - sum min(p_n, q_n)`` times the normalised residual is exactly the residual);
* all ``d`` accepted, then bonus token ``t``: ``prod_j min(p_j(x_j), q_j(x_j)) * p_{d+1}(t)``.

The implementation is run on many seeded draws and compared cell by cell (every emitted
sequence: the accepted drafts and the next token) with a chi-square test; cells of
probability 0 must never occur.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from knapspec.sampling import SamplingParams, probabilities, rejection_verify


def exact_outputs(q: np.ndarray, p: np.ndarray) -> dict[tuple[int, ...], float]:
    """Probability of every emitted sequence ``(x_1..x_n, next)``: q ``[d, V]``, p ``[d+1, V]``."""
    d, v = q.shape
    out: dict[tuple[int, ...], float] = {}
    for n in range(d + 1):
        for accepted in itertools.product(range(v), repeat=n):
            reach = float(np.prod([min(p[j, x], q[j, x]) for j, x in enumerate(accepted)]))
            last = p[d] if n == d else np.maximum(p[n] - q[n], 0.0)
            for t in range(v):
                out[(*accepted, t)] = reach * float(last[t])
    return out


def _rows(rng: np.random.Generator, n: int, v: int, top_p: float) -> np.ndarray:
    """``n`` distributions over ``v`` tokens: random logits through temperature 1 and top-p."""
    return probabilities(rng.normal(size=(n, v)) * 1.5, SamplingParams(1.0, top_p))


def _case(d: int, v: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Draft ``[d, V]`` and target ``[d + 1, V]`` rows that reach every path of the sampler."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        q, p = _rows(rng, d, v, top_p), _rows(rng, d + 1, v, top_p)
        accept = np.minimum(p[:d], q).sum(axis=1)  # [d] acceptance per position
        if not (0.3 < accept.min() and accept.max() < 0.8):
            continue  # rejections and long acceptances both common
        if top_p < 1.0 and not ((q > 0) & (p[:d] == 0)).any():
            continue  # top-p must cut a drafted token from the target: always rejected
        if top_p < 1.0 and not ((q == 0) & (p[:d] > 0)).any():
            continue  # and leave a target token only the residual can give
        return q, p
    raise AssertionError("no case found")


@pytest.mark.parametrize("d, v", [(2, 4), (3, 3)])
@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_rejection_verify_matches_enumeration(d, v, top_p):
    scipy_stats = pytest.importorskip("scipy.stats")
    q, p = _case(d, v, top_p)
    exact = exact_outputs(q, p)
    assert sum(exact.values()) == pytest.approx(1.0)
    cells = {seq: i for i, seq in enumerate(exact)}
    rng = np.random.default_rng(2)
    n = 40000
    # drafts x_i ~ q_i for every trial, by inverse CDF: [n, d]
    cdf = np.cumsum(q, axis=1)
    drafts = np.stack([np.searchsorted(cdf[i], rng.random(n) * cdf[i, -1], side="right")
                       for i in range(d)], axis=1).clip(0, v - 1)
    counts = np.zeros(len(cells))
    accepted = np.zeros(d + 1, dtype=int)
    for x in drafts:
        k, nxt = rejection_verify(x, q, p, rng)
        counts[cells[(*map(int, x[:k]), nxt)]] += 1
        accepted[k] += 1
    # every path occurs: rejection at each position (residual) and full acceptance (bonus)
    assert (accepted > n * 0.02).all(), accepted
    expected = np.array(list(exact.values())) * n
    assert counts[expected == 0].sum() == 0  # nothing outside the exact support
    live = expected > 0
    obs, exp = counts[live], expected[live]
    rare = exp < 5  # pool rare cells so the chi-square approximation holds
    if rare.any():
        obs = np.append(obs[~rare], obs[rare].sum())
        exp = np.append(exp[~rare], exp[rare].sum())
    stat, pval = scipy_stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert pval > 1e-3, (stat, pval)


def test_enumeration_marginals_are_the_target():
    """The enumeration itself: the emitted token at every position is distributed as p."""
    q, p = _case(3, 3, 0.7)
    exact = exact_outputs(q, p)
    for pos in range(3):
        marginal = np.zeros(3)
        for seq, prob in exact.items():
            if len(seq) > pos:
                marginal[seq[pos]] += prob
        reached = sum(prob for seq, prob in exact.items() if len(seq) > pos)
        np.testing.assert_allclose(marginal / reached, p[pos], atol=1e-12)


def test_identical_draft_and_target_always_accept():
    rng = np.random.default_rng(0)
    p = _rows(rng, 4, 5, 0.8)
    for _ in range(200):
        x = np.array([rng.choice(5, p=row) for row in p[:3]])
        assert rejection_verify(x, p[:3], p, rng)[0] == 3
