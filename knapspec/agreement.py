"""How close a draft is to the target: softmax, cosine, top-1 agreement and 1 - TV.

The one implementation of each, on plain numpy arrays, shared by the planner's acceptance
proxies, the model-in-the-loop planners and token sampling.  Inputs broadcast: a batch of
candidates ``[S, T, D]`` against one reference ``[T, D]`` gives ``[S, T]`` (or ``[S]`` for
the means over positions).  Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis of ``logits / temperature`` (``temperature > 0``).

    Shape is kept (``[..., V] -> [..., V]``), float64, each row summing to 1.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity over the last axis: ``[..., D], [..., D] -> [...]`` (broadcast).

    0 where either vector is zero.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    num = (x * y).sum(axis=-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    num, den = np.broadcast_arrays(num, den)
    return np.divide(num, den, out=np.zeros(num.shape), where=den > 0)


def top1_agreement(draft_logits: np.ndarray, target_logits: np.ndarray) -> np.ndarray:
    """Fraction of positions whose argmax tokens agree: ``[..., T, V], [..., T, V] -> [...]``.

    The exact acceptance rate of greedy speculative decoding on those positions.
    """
    d = np.asarray(draft_logits).argmax(axis=-1)
    t = np.asarray(target_logits).argmax(axis=-1)
    return np.mean(d == t, axis=-1)


def tv_acceptance(
    draft_logits: np.ndarray, target_logits: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """Mean over positions of ``1 - TV(p_draft, p_target)`` at ``temperature``:
    ``[..., T, V], [..., T, V] -> [...]``.

    The exact acceptance probability of speculative sampling (Leviathan et al., 2023,
    Thm. 3.5), averaged over positions.
    """
    p = softmax(draft_logits, temperature)
    q = softmax(target_logits, temperature)
    return np.mean(1.0 - 0.5 * np.abs(p - q).sum(axis=-1), axis=-1)
