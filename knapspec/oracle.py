"""The block oracle: what a backend offers a model-in-the-loop planner.

A neutral module: backends implement ``BlockOracle`` and planners consume it, so neither
imports the other (not even for typing).  Shapes: ``S`` candidate states evaluated together,
``T`` tokens (the last accepted tokens), ``D`` hidden size, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .agreement import cosine, top1_agreement, tv_acceptance
from .blocks import BlockLayout
from .errors import KnapSpecError

#: logits proxy name -> scores ``[S]`` of candidate logits ``[S, T, V]`` against ``[1, T, V]``
_PROXIES = {"top1": top1_agreement, "tv": tv_acceptance}


@runtime_checkable
class BlockOracle(Protocol):
    """Block access to the full model over the last captured tokens (the paper's parallel DP).

    States are backend values (torch tensors on the backend's device, or numpy arrays) and
    stay so through a search: planners slice them with numpy index arrays and pass them back,
    and call the module functions ``concat``, ``similarity`` and ``agreement`` below, which
    use an oracle's own methods of those names when it has them (a GPU oracle keeps states
    on its device and sends only the ``[S]`` scores to the host) and numpy otherwise.  A
    minimal oracle implements the three methods here.
    """

    layout: BlockLayout  # blocks of the model and which are pinned

    def boundary_states(self) -> Any:
        """Full model's states at every block boundary: ``[2L + 1, T, D]`` (index 0 = input)."""
        ...

    def apply_block(self, block: int, states: Any) -> Any:
        """Run block ``block`` on a batch of candidate states ``[S, T, D] -> [S, T, D]``."""
        ...

    def logits(self, states: Any) -> Any:
        """Final norm + LM head on states ``[S, T, D] -> [S, T, V]``."""
        ...


def oracle_array(x: Any) -> np.ndarray:
    """float32 numpy array of an oracle result (a numpy array or a tensor on any device)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def concat(oracle: BlockOracle, parts: Sequence[Any]) -> Any:
    """Candidate batches ``[S_i, T, D]`` as one ``[sum S_i, T, D]`` batch of the oracle's kind
    (the oracle's ``concat`` when it has one, else numpy)."""
    own = getattr(oracle, "concat", None)
    if own is not None:
        return own(parts)
    return np.concatenate([np.asarray(p) for p in parts])


def similarity(oracle: BlockOracle, states: Any, boundary: int, full: Any = None) -> np.ndarray:
    """``[S]``: mean over the ``T`` positions of the cosine between each candidate of
    ``states`` ``[S, T, D]`` and the full model's states at block boundary ``boundary``
    (0 = embeddings, ``b + 1`` = after block ``b``).  ``full``: ``boundary_states()`` when
    the caller holds it already (read again otherwise)."""
    own = getattr(oracle, "similarity", None)
    if own is not None:
        return np.asarray(own(states, boundary), dtype=np.float64)
    full = oracle.boundary_states() if full is None else full
    ref = oracle_array(full[boundary])  # [T, D]
    return cosine(oracle_array(states), ref[None]).mean(axis=1)


def agreement(
    oracle: BlockOracle, states: Any, proxy: str = "top1", full: Any = None
) -> np.ndarray:
    """``[S]`` acceptance predicted for each candidate of ``states`` ``[S, T, D]`` (final
    states of a draft) from its logits against the full model's: ``top1`` (argmax agreement,
    greedy acceptance) or ``tv`` (``1 - TV`` of the softmaxes, speculative sampling's).
    ``full``: ``boundary_states()`` when the caller holds it already."""
    if proxy not in _PROXIES:
        raise KnapSpecError(f"unknown logits proxy {proxy!r} (known: {', '.join(_PROXIES)})")
    own = getattr(oracle, "agreement", None)
    if own is not None:
        return np.asarray(own(states, proxy), dtype=np.float64)
    full = oracle.boundary_states() if full is None else full
    logits = oracle_array(oracle.logits(concat(oracle, [states, full[-1:]])))  # [S + 1, T, V]
    return _PROXIES[proxy](logits[:-1], logits[-1:])
