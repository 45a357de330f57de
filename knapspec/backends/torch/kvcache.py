"""What the torch backends keep per position: the KV cache and the captured hidden states.

``KVCache`` is one preallocated key and one value tensor ``[L, KV, C, hd]`` (on the
backend's device) plus the token id behind every cached position (``None`` where a draft
wrote partial K/V, so prompt caching never reuses it).  Rolling back only moves the length:
stale entries beyond it are overwritten by the next forward, never read.

``CaptureWindow`` holds the full model's hidden states at every block boundary for the last
few positions (``[2L+1, T, D]``), the block oracle's input.  It is filled only by forwards
with ``capture=True``; a forward without capture never touches it.

Shapes: ``L`` layers, ``KV`` key/value heads, ``C`` capacity (tokens), ``hd`` head dim,
``D`` hidden size, ``T`` captured positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import KnapSpecError


class KVCache:
    """A preallocated KV cache of one sequence and the tokens it holds.

    Attributes:
        k, v: ``[L, KV, C, hd]`` keys and values (``C`` = ``capacity``).
        layer_k, layer_v: ``L`` views ``[KV, C, hd]`` of ``k`` / ``v``, made once so the
            forward does not index the cache per layer and call.
        length: positions ``0..length-1`` hold valid entries.
        ids: the token at every valid position (``None``: written by a draft).
    """

    def __init__(
        self, n_layers: int, n_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layer_k = list(self.k.unbind(0))
        self.layer_v = list(self.v.unbind(0))
        self.capacity = int(capacity)
        self.length = 0
        self.ids: list[int | None] = []

    @property
    def nbytes(self) -> int:
        """Bytes of keys plus values."""
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self) -> None:
        """Forget every position (the tensors are kept and overwritten later)."""
        self.length = 0
        self.ids = []

    def rollback(self, length: int) -> None:
        """Keep positions ``0..length-1`` (``0 <= length <= self.length``)."""
        length = int(length)
        if not 0 <= length <= self.length:
            raise KnapSpecError(f"cannot roll back to {length}: the cache holds {self.length}")
        self.length = length
        del self.ids[length:]

    def check_room(self, n: int) -> None:
        """Raise unless ``n`` more tokens fit."""
        if self.length + n > self.capacity:
            raise KnapSpecError(
                f"KV cache overflow: {self.length} cached + {n} new tokens > max_context "
                f"{self.capacity}"
            )

    def append(self, ids: Sequence[int], full: bool) -> None:
        """Record that ``ids`` were written after the current length (by the full model when
        ``full``, else by a draft: their positions are marked ``None``)."""
        del self.ids[self.length :]
        self.ids.extend(ids if full else [None] * len(ids))
        self.length += len(ids)


class CaptureWindow:
    """Boundary states ``[2L+1, T, D]`` of the last ``size`` captured positions.

    ``states[0]`` is the embedding, ``states[b + 1]`` the residual stream after block ``b``;
    ``start`` is the position of ``states[:, 0]``.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise KnapSpecError(f"capture_tokens must be >= 1, got {size}")
        self.size = int(size)
        self.states: torch.Tensor | None = None
        self.start = 0

    def clear(self) -> None:
        self.states = None

    def store(self, new: torch.Tensor, first: int) -> None:
        """Add states ``new`` ``[2L+1, k, D]`` of positions ``first..first+k-1``: appended
        when they continue the window, else they replace it; the last ``size`` are kept."""
        cap = self.states
        if cap is not None and self.start + cap.shape[1] == first:  # contiguous: extend
            new = torch.cat([cap, new], dim=1)
            first = self.start
        drop = new.shape[1] - self.size
        if drop > 0:
            new = new[:, drop:]
            first += drop
        self.states = new
        self.start = first

    def rollback(self, length: int) -> None:
        """Drop captured positions ``>= length``."""
        if self.states is None:
            return
        keep = length - self.start
        if keep <= 0:
            self.states = None
        elif keep < self.states.shape[1]:
            self.states = self.states[:, :keep]
