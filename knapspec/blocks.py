"""The block model: an L-layer decoder seen as 2L skippable blocks.

Block ``2*i`` is the attention sub-block of layer ``i`` (norm + attention + residual add),
block ``2*i + 1`` its MLP sub-block (norm + MLP + residual add).  Skipping a block means
the residual stream passes through it unchanged.  A draft configuration is a boolean skip
mask of shape ``[2L]`` (``True`` = skipped).  Some blocks are *pinned*: never skipped.
By default the two blocks of the first layer and the two of the last layer are pinned,
as in the KnapSpec paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .errors import KnapSpecError

ATTN = 0  # block kind of an attention block (even index)
MLP = 1  # block kind of an MLP block (odd index)


def attn_block(layer: int) -> int:
    """Index of layer ``layer``'s attention block."""
    return 2 * layer


def mlp_block(layer: int) -> int:
    """Index of layer ``layer``'s MLP block."""
    return 2 * layer + 1


def default_pinned(n_layers: int) -> tuple[int, ...]:
    """The paper's default: both blocks of the first and of the last layer."""
    if n_layers < 1:
        raise KnapSpecError(f"n_layers must be >= 1, got {n_layers}")
    return tuple(sorted({0, 1, 2 * n_layers - 2, 2 * n_layers - 1}))


@dataclass(frozen=True)
class BlockLayout:
    """Which blocks exist and which may be skipped.

    Attributes:
        n_layers: number of decoder layers L; there are ``2L`` blocks.
        pinned: block indices that may never be skipped (default: first and last layer).
    """

    n_layers: int
    pinned: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.n_layers, (int, np.integer)) or self.n_layers < 1:
            raise KnapSpecError(f"n_layers must be a positive integer, got {self.n_layers!r}")
        pinned = default_pinned(self.n_layers) if self.pinned == () else self.pinned
        pinned = tuple(sorted({int(b) for b in pinned}))
        for b in pinned:
            if not 0 <= b < 2 * self.n_layers:
                raise KnapSpecError(
                    f"pinned block {b} out of range for {self.n_layers} layers "
                    f"(blocks 0..{2 * self.n_layers - 1})"
                )
        object.__setattr__(self, "pinned", pinned)

    @classmethod
    def unpinned(cls, n_layers: int) -> BlockLayout:
        """A layout where every block may be skipped (pinned set explicitly empty)."""
        layout = cls(n_layers)
        object.__setattr__(layout, "pinned", ())
        return layout

    @property
    def n_blocks(self) -> int:
        return 2 * self.n_layers

    @property
    def kinds(self) -> np.ndarray:
        """``[2L]`` int array: ``ATTN`` (0) or ``MLP`` (1) per block."""
        return np.arange(self.n_blocks) % 2

    @property
    def skippable(self) -> np.ndarray:
        """``[2L]`` bool array: ``True`` where the block may be skipped."""
        ok = np.ones(self.n_blocks, dtype=bool)
        ok[list(self.pinned)] = False
        return ok

    def empty_mask(self) -> np.ndarray:
        """The all-kept mask (plain autoregressive decoding)."""
        return np.zeros(self.n_blocks, dtype=bool)

    def mask_from_blocks(self, skipped: Iterable[int]) -> np.ndarray:
        """Skip mask with the given block indices set; validated."""
        mask = self.empty_mask()
        for b in skipped:
            b = int(b)
            if not 0 <= b < self.n_blocks:
                raise KnapSpecError(f"block {b} out of range (0..{self.n_blocks - 1})")
            mask[b] = True
        return self.validate_mask(mask)

    def validate_mask(
        self, mask: np.ndarray | Iterable[bool], allow_pinned: bool = False
    ) -> np.ndarray:
        """Return ``mask`` as a ``[2L]`` bool array, or raise naming the problem.

        ``allow_pinned``: accept masks that skip pinned blocks (backends run any mask, for
        profiling and early exit; planners enforce pinning).
        """
        arr = np.asarray(mask)
        if arr.shape != (self.n_blocks,):
            raise KnapSpecError(
                f"skip mask must have shape ({self.n_blocks},) for {self.n_layers} layers, "
                f"got {arr.shape}"
            )
        if arr.dtype != bool:
            if not np.isin(arr, (0, 1)).all():
                raise KnapSpecError("skip mask must be boolean (or 0/1)")
            arr = arr.astype(bool)
        bad = [] if allow_pinned else [b for b in self.pinned if arr[b]]
        if bad:
            raise KnapSpecError(f"skip mask skips pinned block(s) {bad}")
        return arr


def describe_mask(mask: np.ndarray) -> str:
    """Compact human-readable form, e.g. ``'attn[3,5] mlp[7]'`` (layer numbers)."""
    mask = np.asarray(mask, dtype=bool)
    attn = [i for i in range(len(mask) // 2) if mask[2 * i]]
    mlp = [i for i in range(len(mask) // 2) if mask[2 * i + 1]]
    if not attn and not mlp:
        return "none"
    parts = []
    if attn:
        parts.append("attn[" + ",".join(map(str, attn)) + "]")
    if mlp:
        parts.append("mlp[" + ",".join(map(str, mlp)) + "]")
    return " ".join(parts)
