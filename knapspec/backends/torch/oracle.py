"""``TorchBlockOracle``: the full model's blocks, one at a time, on batches of candidates.

A model-in-the-loop planner explores skip masks by pushing candidate states ``[S, T, D]``
through single blocks (``apply_block``) and comparing them with the full model's states
(``similarity``) or logits (``agreement``).  States stay torch tensors on the backend's
device from start to end: ``apply_block``, ``concat`` and indexing a state tensor with a
numpy index array all return tensors there, and numpy states handed back are moved there
once.  Only the per-candidate scores ``[S]`` come back as numpy (``similarity``,
``agreement``), in bounded chunks of candidates, so the ``[S, T, V]`` logits of a large
search never exist at once.  On the CPU the scores are ``knapspec.agreement`` on numpy
views of the tensors (no copy); on another device the same arithmetic runs there in
float64 (``_device_scores``) and only the ``[S]`` scores cross to the host.  Results are
ordinary tensors (computed under ``no_grad``, not ``inference_mode``), so a planner may
write into them in place.

Shapes: ``L`` layers (``2L`` blocks), ``T`` captured positions ``t0 .. t0+T-1``, ``D``
hidden size, ``V`` vocabulary, ``S`` candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ... import agreement as agree
from ...errors import KnapSpecError
from .blocks import attention_block_batched, candidate_mask, head, mlp_block

if TYPE_CHECKING:
    from .eager import TorchEagerBackend

#: candidates whose logits are computed at once by ``agreement`` (bounds [chunk, T, V])
LOGIT_CHUNK = 32


def _cpu_f32(x: torch.Tensor) -> np.ndarray:
    """A numpy view of ``x`` as float32 on the CPU (a copy only for other dtypes/devices)."""
    return x.detach().to("cpu", torch.float32).numpy()


def _device_scores(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``knapspec.agreement``'s arithmetic on the tensors' device, in float64, for candidates
    ``a`` ``[S, T, X]`` against one reference ``b`` ``[T, X]`` -> ``[S]``.

    ``kind``: ``cosine`` (mean over positions; 0 where a vector is zero), ``top1`` (fraction
    of positions whose argmax agrees) or ``tv`` (mean of ``1 - TV`` of the softmaxes).
    """
    if kind == "top1":
        return (a.argmax(-1) == b.argmax(-1)).double().mean(-1)
    x, y = a.double(), b.double()
    if kind == "cosine":
        den = x.norm(dim=-1) * y.norm(dim=-1)  # [S, T]
        num = (x * y).sum(-1)
        return torch.where(den > 0, num / den.clamp_min(1e-300), 0.0).mean(-1)
    p, q = torch.softmax(x, -1), torch.softmax(y, -1)
    return (1.0 - 0.5 * (p - q).abs().sum(-1)).mean(-1)


class TorchBlockOracle:
    """``BlockOracle`` over the captured positions ``t0 .. t0+T-1`` of a ``TorchEagerBackend``.

    ``apply_block`` runs one block on ``S`` candidate states in one batched call; attention
    blocks read the backend's KV cache at positions ``< t0`` and never write it.  Valid until
    the backend's cache is rolled back below ``t0 + T`` or overwritten there.
    """

    def __init__(self, backend: TorchEagerBackend, states: torch.Tensor, t0: int) -> None:
        self.backend = backend
        self.layout = backend.layout
        self._states = states  # [2L+1, T, D] on the backend's device
        self.device = states.device
        # scores through knapspec.agreement on the CPU, on the device elsewhere
        self._on_host = states.device.type == "cpu"
        self.t0 = t0
        self.n_tokens = int(states.shape[1])
        end = t0 + self.n_tokens
        self._cos = backend.cos[t0:end]  # [T, hd]
        self._sin = backend.sin[t0:end]  # [T, hd]
        self._mask: tuple[int, torch.Tensor] | None = None  # (S, candidate_mask for S)
        self._full_logits: torch.Tensor | None = None  # [T, V] of the full model, lazily

    def boundary_states(self) -> torch.Tensor:
        """``[2L+1, T, D]``: index 0 = embeddings, ``b+1`` = after block ``b``."""
        return self._states

    def _as_states(self, states: Any) -> torch.Tensor:
        """``states`` as a ``[S, T, D]`` tensor of the model's dtype on its device (numpy is
        accepted and converted, without a copy on the CPU when its dtype matches)."""
        states = torch.as_tensor(states, dtype=self._states.dtype, device=self.device)
        if states.dim() != 3 or states.shape[1:] != self._states.shape[1:]:
            raise KnapSpecError(
                f"states must have shape [S, {self.n_tokens}, {self._states.shape[2]}], "
                f"got {tuple(states.shape)}"
            )
        return states

    def apply_block(self, block: int, states: torch.Tensor) -> torch.Tensor:
        """Run block ``block`` on ``states`` ``[S, T, D]`` -> ``[S, T, D]`` tensor."""
        be = self.backend
        block = int(block)
        if not 0 <= block < self.layout.n_blocks:
            raise KnapSpecError(f"block {block} out of range (0..{self.layout.n_blocks - 1})")
        states = self._as_states(states)
        layer = block // 2
        with torch.no_grad():
            if block % 2 == 1:
                return mlp_block(states, be.mlp_w[layer], be.eps, be.act)
            n_cand = states.shape[0]
            if self._mask is None or self._mask[0] != n_cand:  # built once per S
                n_rep = be.attn_cfg.n_heads // be.attn_cfg.n_kv_heads
                allowed = candidate_mask(n_cand, n_rep, self.n_tokens, self.t0, self.device)
                # additive: SDPA would convert a bool mask on every call
                additive = torch.zeros(allowed.shape, dtype=states.dtype, device=self.device)
                self._mask = (n_cand, additive.masked_fill_(~allowed, float("-inf")))
            return attention_block_batched(
                states, be.attn_w[layer], be.attn_cfg,
                be.k_cache[layer, :, : self.t0], be.v_cache[layer, :, : self.t0],
                self._cos, self._sin, self._mask[1],
            )  # fmt: skip

    def concat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Candidates of several batches as one ``[sum S_i, T, D]`` tensor."""
        return torch.cat([self._as_states(p) for p in parts])

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: ``[S, T, D] -> [S, T, V]`` tensor."""
        be = self.backend
        states = self._as_states(states)
        with torch.no_grad():
            return head(states, be.norm_w, be.norm_eps, be.out_w, be.out_b)

    def similarity(self, states: torch.Tensor, boundary: int) -> np.ndarray:
        """Mean over the ``T`` positions of the cosine between each candidate and the full
        model's states at boundary ``boundary`` (0 = embeddings): ``[S, T, D] -> [S]``."""
        if not 0 <= int(boundary) < self._states.shape[0]:
            raise KnapSpecError(
                f"boundary {boundary} out of range (0..{self._states.shape[0] - 1})"
            )
        states, ref = self._as_states(states), self._states[int(boundary)]  # [S, T, D] [T, D]
        if not self._on_host:
            with torch.no_grad():
                return _device_scores("cosine", states, ref).cpu().numpy()
        return agree.cosine(_cpu_f32(states), _cpu_f32(ref)).mean(axis=-1)

    def agreement(self, states: torch.Tensor, proxy: str = "top1") -> np.ndarray:
        """Acceptance predicted from logits, each candidate against the full model:
        ``[S, T, D] -> [S]``.  ``proxy``: ``top1`` (argmax agreement, greedy acceptance) or
        ``tv`` (``1 - TV`` of the softmaxes, speculative sampling's acceptance)."""
        score = {"top1": agree.top1_agreement, "tv": agree.tv_acceptance}.get(proxy)
        if score is None:
            raise KnapSpecError(f"unknown logits proxy {proxy!r} (known: top1, tv)")
        states = self._as_states(states)
        if self._full_logits is None:
            self._full_logits = self.logits(self._states[-1:])[0]  # [T, V]
        chunks = range(0, states.shape[0], LOGIT_CHUNK)
        if not self._on_host:  # scores on the device; only [S] crosses to the host
            with torch.no_grad():
                out_t = [_device_scores(proxy, self.logits(states[a : a + LOGIT_CHUNK]),
                                        self._full_logits) for a in chunks]
                return torch.cat(out_t).cpu().numpy() if out_t else np.zeros(0)
        full = _cpu_f32(self._full_logits)
        out = [score(_cpu_f32(self.logits(states[a : a + LOGIT_CHUNK])), full) for a in chunks]
        return np.concatenate(out) if out else np.zeros(0)
