"""The block oracle: what a backend offers a model-in-the-loop planner.

A neutral module: backends implement ``BlockOracle`` and planners consume it, so neither
imports the other (not even for typing).  Shapes: ``S`` candidate states evaluated together,
``T`` tokens (the last accepted tokens), ``D`` hidden size, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .blocks import BlockLayout


@runtime_checkable
class BlockOracle(Protocol):
    """Block access to the full model over the last captured tokens (the paper's parallel DP).

    States are backend tensors (or numpy arrays); planners read every result through
    ``oracle_array``.
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
