"""Token selection and verification: greedy matching and speculative rejection sampling.

Terms, defined once (after Leviathan et al., 2023, "Fast Inference from Transformers via
Speculative Decoding", Alg. 1, and Chen et al., 2023, "Accelerating LLM Decoding with
Speculative Sampling"):

* **accepted** tokens: the longest prefix of the ``d`` drafted tokens that verification
  keeps;
* **recovered** token: when drafted token ``i`` is rejected, a replacement sampled from the
  residual distribution ``norm(max(0, p_i - q_i))`` (greedy: the target's argmax);
* **bonus** token: when all ``d`` drafts are accepted, one more token sampled from the
  target's distribution at position ``d + 1`` for free.

Every round therefore yields ``n_accepted + 1`` tokens, and the output distribution equals
the target's (processed by the same temperature and top-p) exactly.

Shapes: ``d`` drafted tokens, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .agreement import softmax
from .errors import KnapSpecError


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen from logits; ``temperature == 0`` means greedy."""

    temperature: float = 0.0  # 0 = greedy (argmax), else softmax temperature
    top_p: float = 1.0  # nucleus threshold in (0, 1]; 1 = no truncation

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise KnapSpecError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise KnapSpecError(f"top_p must lie in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Processed distribution: softmax at ``temperature``, then top-p truncation.

    Args:
        logits: ``[n, V]`` (or ``[V]``) raw logits.
    Returns:
        float64 ``[n, V]`` (or ``[V]``) probabilities, rows summing to 1.
    """
    p = softmax(logits, max(params.temperature, 1e-8))
    if params.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")  # [n, V] descending
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each token
        keep_sorted = before < params.top_p  # always keeps the top token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def top1_probability(logits: np.ndarray) -> float:
    """Largest softmax probability (temperature 1) of one row of logits ``[V]``: a greedy
    draft's confidence."""
    z = np.asarray(logits, dtype=np.float64)
    return float(1.0 / np.exp(z - z.max()).sum())


def draft_token(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
    confidence: bool = False,
) -> tuple[int, np.ndarray | None, float]:
    """One draft step's choice from its logits ``[V]``: ``(token, q, top)``.

    Greedy: the argmax, ``q`` None; sampling: a draw from the processed distribution ``q``
    ``[V]`` (temperature, top-p).  ``top`` is the draft's confidence, the top-1 probability
    of ``q`` (greedy: of the softmax at temperature 1; computed only with ``confidence``,
    else 1.0)."""
    if params.greedy:
        return int(np.argmax(logits)), None, top1_probability(logits) if confidence else 1.0
    q = probabilities(logits, params)  # [V]
    return sample(q, rng), q, float(q.max())


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token id from a probability vector ``[V]`` (inverse CDF, robust to rounding)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def select(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Next token from one row of logits ``[V]``: argmax when greedy, else a sample."""
    if params.greedy:
        return int(np.argmax(logits))
    return sample(probabilities(logits, params), rng)


def greedy_verify(draft_tokens: np.ndarray, target_logits: np.ndarray) -> tuple[int, int]:
    """Greedy verification.

    Args:
        draft_tokens: ``[d]`` drafted ids.
        target_logits: ``[d + 1, V]`` full-model logits at the ``d + 1`` verified positions.
    Returns:
        ``(n_accepted, next_token)``: the next token is the recovered or bonus token.
    """
    target = np.argmax(target_logits, axis=-1)  # [d + 1]
    d = len(draft_tokens)
    mismatch = np.flatnonzero(target[:d] != np.asarray(draft_tokens))
    n = int(mismatch[0]) if mismatch.size else d
    return n, int(target[n])


def rejection_verify(
    draft_tokens: np.ndarray,
    draft_probs: np.ndarray,
    target_probs: np.ndarray,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Speculative rejection sampling (Leviathan et al., 2023, Alg. 1).

    Args:
        draft_tokens: ``[d]`` ids sampled from ``draft_probs``.
        draft_probs: ``[d, V]`` draft distributions q_i the tokens were sampled from.
        target_probs: ``[d + 1, V]`` target distributions p_i (same processing as q).
    Returns:
        ``(n_accepted, next_token)`` where ``next_token`` is recovered (``n < d``) or bonus.
    """
    d = len(draft_tokens)
    for i in range(d):
        x = int(draft_tokens[i])
        p, q = target_probs[i, x], draft_probs[i, x]
        # accept with probability min(1, p/q); q > 0 because x was sampled from q
        if q <= 0 or rng.random() * q >= p:
            residual = np.maximum(target_probs[i] - draft_probs[i], 0.0)
            total = residual.sum()
            # total == 0 only if p == q, where rejection has probability 0; guard rounding
            return i, sample(residual / total if total > 0 else target_probs[i], rng)
    return d, sample(target_probs[d], rng)
