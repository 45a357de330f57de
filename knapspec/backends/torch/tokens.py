"""Token selection and verification on the backend's device: the torch twin of
``knapspec.sampling`` (same rules, same terms: accepted, recovered, bonus).

The torch backends draft and verify with these so that argmax, the comparison with the
drafts, the accepted count and rejection sampling run where the logits are; a verification
returns one small ``[2]`` tensor ``(n_accepted, next_token)`` that the backend brings to
the host in one transfer.  No function here synchronises with the device.

Random numbers come from a ``torch.Generator`` on the device; ``seed_generator`` reseeds it
from the decoding loop's numpy generator once per call, so a seeded run reproduces (on the
same device and torch version).  Sampling is by inverse CDF in float64 (as
``knapspec.sampling.sample``), so rounding never makes a token of tiny probability
unreachable or lets a token of probability 0 be drawn.

Shapes: ``d`` drafted tokens, ``V`` vocabulary, ``n`` rows.  Probabilities are float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import KnapSpecError
from ...sampling import SamplingParams


def seed_generator(gen: torch.Generator, rng: np.random.Generator) -> torch.Generator:
    """Reseed ``gen`` from ``rng`` (advancing it), so torch draws follow the numpy seed."""
    gen.manual_seed(int(rng.integers(0, 2**63 - 1)))
    return gen


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax at ``temperature``, then top-p truncation: ``[n, V]`` -> float32 ``[n, V]``
    rows summing to 1 (``knapspec.sampling.probabilities`` on the device)."""
    p = torch.softmax(logits.float() / max(params.temperature, 1e-8), dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p * (before < params.top_p)  # always keeps the top token
        p = torch.zeros_like(p).scatter_(-1, order, sorted_p)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token id per row of probabilities ``[n, V]`` -> ``[n]`` long (inverse CDF)."""
    c = p.double().cumsum(-1)  # [n, V]
    u = torch.rand((p.shape[0], 1), generator=gen, device=p.device, dtype=torch.float64)
    idx = torch.searchsorted(c, u * c[:, -1:], right=True)  # [n, 1]
    return idx.squeeze(1).clamp_(max=p.shape[-1] - 1)


def select(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
           ) -> torch.Tensor:
    """Next token of each row of ``logits`` ``[n, V]`` -> ``[n]`` long: argmax when greedy,
    else a sample (``gen`` is then required)."""
    if params.greedy:
        return logits.argmax(-1)
    if gen is None:
        raise KnapSpecError("internal: sampling on the device needs a torch.Generator")
    return sample(probabilities(logits, params), gen)


def greedy_verify(drafts: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Greedy verification: drafts ``[d]`` long, full-model logits ``[d + 1, V]`` ->
    ``[2]`` long ``(n_accepted, next_token)`` (next: recovered or bonus token)."""
    target = target_logits.argmax(-1)  # [d + 1]
    n = (target[:-1] == drafts).long().cumprod(0).sum().view(1)  # matching prefix length
    return torch.cat([n, target.gather(0, n)])


def rejection_verify(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Speculative rejection sampling (Leviathan et al., 2023, Alg. 1) on the device.

    Args:
        drafts: ``[d]`` long ids sampled from ``draft_probs``.
        draft_probs: ``[d, V]`` draft distributions q_i the drafts were sampled from.
        target_probs: ``[d + 1, V]`` target distributions p_i (same processing as q).
        gen: the device's generator.
    Returns:
        ``[2]`` long ``(n_accepted, next_token)``: next is recovered (``n < d``) or bonus.

    Draft i is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))`` (all ``d``
    uniforms are drawn at once; only those up to the first rejection matter); the next
    token comes from the residual ``norm(max(0, p_n - q_n))`` after a rejection at ``n``,
    from ``p_{d+1}`` when all are accepted.
    """
    d = drafts.shape[0]
    x = drafts.view(d, 1)
    px = target_probs[:d].gather(1, x).squeeze(1)  # [d]
    qx = draft_probs.gather(1, x).squeeze(1)  # [d]
    u = torch.rand(d, generator=gen, device=qx.device, dtype=qx.dtype)
    ok = (qx > 0) & (u * qx < px)  # q > 0 because x was sampled from q
    n = ok.long().cumprod(0).sum().view(1)  # accepted drafts
    residual = (target_probs[:d] - draft_probs).clamp_min(0.0)  # [d, V]
    total = residual.sum(-1, keepdim=True)
    # total == 0 only if p == q, where rejection has probability 0; guard rounding
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), target_probs[:d])
    rows = torch.cat([residual, target_probs[d:]])  # [d + 1, V]: row n is the next law
    return torch.cat([n, sample(rows.index_select(0, n), gen)])


def verify_rows(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    q: Any,
    params: SamplingParams,
    gen: torch.Generator | None,
    accept: int | None = None,
) -> torch.Tensor:
    """The backend's ``verify`` after the full-model pass: ``(n_accepted, next_token)`` as a
    ``[2]`` long tensor on the device.

    Args:
        logits: float32 full-model logits ``[d + 1, V]`` of ``[last, *drafts]`` on the
            device (``[1, V]`` when ``d == 0``).
        drafts: ``[d]`` long drafted ids on the device.
        q: the draft distributions ``[d, V]`` (a tensor on the device, or numpy), when
            sampling with ``d > 0`` and ``accept`` is None.
        params: greedy or sampling.
        gen: the device's generator (sampling only).
        accept: simulated acceptance (timing only): take exactly ``min(accept, d)`` drafts
            and the next token from the target's row there.
    """
    d = drafts.shape[0]
    if accept is not None or d == 0:
        n = 0 if d == 0 else min(max(int(accept or 0), 0), d)
        nxt = select(logits[n : n + 1], params, gen)  # [1]
        return torch.cat([torch.full((1,), n, dtype=torch.long, device=nxt.device), nxt])
    if params.greedy:
        return greedy_verify(drafts, logits)
    if gen is None or q is None:
        raise KnapSpecError(
            "internal: rejection sampling on the device needs the draft distributions and a "
            "torch.Generator")
    q = torch.as_tensor(q, dtype=torch.float32, device=logits.device)
    return rejection_verify(drafts, q, probabilities(logits, params), gen)
