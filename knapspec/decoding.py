"""The draft/verify loop, written once for every backend.

One round at draft length ``d`` under skip mask ``m`` (``last`` = newest token, not yet in
the KV cache, at position ``p0 = backend.length``)::

    draft:  for j in 1..d: run one token under m           -> x_1..x_d   (and q_1..q_d)
    verify: roll back to p0; run [last, x_1..x_d] in full  -> p_1..p_{d+1}
    accept: greedy match or rejection sampling            -> n accepted + 1 next token
    keep:   roll back to p0 + n + 1 (last and the accepted drafts are now cached)

``d = 0`` is a plain autoregressive step.  Every ``replan_interval`` rounds the planner is
asked again, with the context length, the tokens left and (for model-in-the-loop
planners) the backend's block oracle over the last verified tokens.  Planning time is part
of ``decode_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends.base import Backend
from .errors import KnapSpecError
from .planner.plan import DraftPlan
from .planner.planners import PlanContext, Planner
from .sampling import (
    SamplingParams,
    greedy_verify,
    probabilities,
    rejection_verify,
    sample,
    select,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how; validated on construction."""

    max_new_tokens: int = 128  # upper bound on generated tokens
    temperature: float = 0.0  # 0 = greedy; > 0 = sampling (rejection-verified)
    top_p: float = 1.0  # nucleus threshold in (0, 1]
    seed: int | None = None  # RNG seed for sampling (None: fresh entropy)
    stop: tuple[str, ...] = ()  # stop strings; generation ends after the first match
    replan_interval: int = 8  # verify rounds between plans
    stop_at_eos: bool = True  # end at the model's end-of-sequence tokens

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens <= 0:
            raise KnapSpecError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not isinstance(self.replan_interval, (int, np.integer)) or self.replan_interval <= 0:
            raise KnapSpecError(
                f"replan_interval must be a positive integer, got {self.replan_interval!r}"
            )
        SamplingParams(self.temperature, self.top_p)  # validates both

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p)


@dataclass
class GenerationResult:
    """Tokens, text and statistics of one generation (times in seconds)."""

    tokens: list[int]  # new token ids (prompt excluded)
    text: str  # decoded new tokens (cut before a matched stop string)
    prompt_tokens: int  # tokens in the prompt
    prefill_seconds: float = 0.0  # target prefill of the prompt (autoregressive pays it too)
    decode_seconds: float = 0.0  # everything after prefill: draft, verify, plan, switch
    draft_seconds: float = 0.0  # draft steps
    verify_seconds: float = 0.0  # verification steps (and autoregressive steps)
    plan_seconds: float = 0.0  # planner calls
    rounds: int = 0  # draft/verify rounds with d >= 1
    ar_steps: int = 0  # plain autoregressive steps (d = 0)
    drafted: int = 0  # drafted tokens
    accepted: int = 0  # drafted tokens accepted
    stop_reason: str = ""  # "eos", "length", "stop" or "context"
    plan_history: list[dict[str, Any]] = field(default_factory=list)  # one entry per plan

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """New tokens per decode second (prefill excluded)."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per target forward (draft rounds and autoregressive steps)."""
        steps = self.rounds + self.ar_steps
        return (self.accepted + steps) / steps if steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": list(map(int, self.tokens)),
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "plan_seconds": self.plan_seconds,
            "rounds": self.rounds,
            "ar_steps": self.ar_steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "stop_reason": self.stop_reason,
            "plan_history": self.plan_history,
        }


def _plan_record(plan: DraftPlan, seconds: float) -> dict[str, Any]:
    rec = plan.to_dict()
    rec["plan_seconds"] = seconds
    return rec


class SpeculativeDecoder:
    """Runs generations on a backend under a planner.

    Components are injected: the backend (model runner), the planner, and a ``clock``
    (seconds; tests may inject a fake one).
    """

    def __init__(
        self,
        backend: Backend,
        planner: Planner,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.backend = backend
        self.planner = planner
        self.clock = clock

    # ---------------------------------------------------------------- one round
    def _draft(
        self, last: int, plan: DraftPlan, n: int, sp: SamplingParams, rng: np.random.Generator
    ) -> tuple[list[int], np.ndarray | None]:
        """``n`` drafted ids and, when sampling, their distributions ``[n, V]``."""
        tokens, probs = [], []
        tok = last
        for _ in range(n):
            logits = self.backend.forward([tok], plan.mask, all_logits=False)[-1]  # [V]
            if sp.greedy:
                tok = int(np.argmax(logits))
            else:
                q = probabilities(logits, sp)
                probs.append(q)
                tok = sample(q, rng)
            tokens.append(tok)
            if tok in self.backend.eos_token_ids:
                break  # nothing after an end-of-sequence token can be accepted usefully
        return tokens, (np.stack(probs) if probs else None)

    def _round(
        self,
        last: int,
        plan: DraftPlan,
        budget: int,
        sp: SamplingParams,
        rng: np.random.Generator,
        res: GenerationResult,
        capture: bool,
    ) -> list[int]:
        """One draft/verify round (or autoregressive step); returns the new tokens."""
        p0 = self.backend.length
        d = min(plan.draft_length, budget - 1)
        t0 = self.clock()
        drafts, q = self._draft(last, plan, d, sp, rng) if d > 0 else ([], None)
        t1 = self.clock()
        self.backend.rollback(p0)
        logits = self.backend.forward([last, *drafts], None, capture=capture)  # [k+1, V]
        if sp.greedy:
            n, nxt = greedy_verify(np.asarray(drafts, dtype=np.int64), logits)
        else:
            p = probabilities(logits, sp)  # [k+1, V]
            n, nxt = (rejection_verify(np.asarray(drafts), q, p, rng) if drafts
                      else (0, select(logits[0], sp, rng)))
        self.backend.rollback(p0 + n + 1)
        res.draft_seconds += t1 - t0
        res.verify_seconds += self.clock() - t1
        if drafts:
            res.rounds += 1
            res.drafted += len(drafts)
            res.accepted += n
        else:
            res.ar_steps += 1
        return [*drafts[:n], nxt]

    # ---------------------------------------------------------------- the loop
    def generate(
        self,
        prompt: Sequence[int],
        config: GenerationConfig | None = None,
        on_token: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate from prompt token ids.

        Args:
            prompt: ``[P]`` token ids (already through the chat template if wanted).
            config: generation settings (default ``GenerationConfig()``).
            on_token: streaming callback, called with each batch of new token ids.
        """
        cfg = config or GenerationConfig()
        be = self.backend
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise KnapSpecError("the prompt is empty: give at least one token")
        if len(prompt) >= be.max_context:
            raise KnapSpecError(
                f"the prompt has {len(prompt)} tokens; the model's context holds {be.max_context}"
            )
        sp = cfg.sampling
        rng = np.random.default_rng(cfg.seed)
        res = GenerationResult(tokens=[], text="", prompt_tokens=len(prompt))
        self.planner.reset()

        t_start = self.clock()
        last_logits = be.prefill(prompt, capture=self.planner.needs_oracle)  # [V]
        t_prefill = self.clock()
        res.prefill_seconds = t_prefill - t_start
        last = select(last_logits, sp, rng)
        new = [last]
        plan: DraftPlan | None = None
        rounds_since_plan = cfg.replan_interval  # plan before the first round
        while True:
            start = len(res.tokens)
            res.tokens.extend(new)
            if self._stopped(res, cfg, start):
                if on_token and len(res.tokens) > start:
                    on_token(res.tokens[start:])
                break
            if on_token:
                on_token(new)
            if rounds_since_plan >= cfg.replan_interval:
                plan = self._plan(plan, cfg, res)
                rounds_since_plan = 0
            budget = min(cfg.max_new_tokens - len(res.tokens), be.max_context - be.length - 1)
            capture = self.planner.needs_oracle  # ~140 KB per token: keep the window contiguous
            new = self._round(last, plan, budget, sp, rng, res, capture)
            rounds_since_plan += 1
            last = new[-1]
        res.decode_seconds = self.clock() - t_prefill
        return res

    def _plan(
        self, current: DraftPlan | None, cfg: GenerationConfig, res: GenerationResult
    ) -> DraftPlan:
        t0 = self.clock()
        ctx = PlanContext(
            context=self.backend.length,
            remaining_tokens=cfg.max_new_tokens - len(res.tokens),
            current_mask=None if current is None else current.mask,
            switch_seconds=self.backend.switch_seconds,
            oracle=self.backend.block_oracle() if self.planner.needs_oracle else None,
            generated=len(res.tokens),
        )
        plan = self.planner.plan(ctx)
        dt = self.clock() - t0
        res.plan_seconds += dt
        if current is None or plan.draft_length != current.draft_length or not np.array_equal(
            plan.mask, current.mask
        ):
            res.plan_history.append(_plan_record(plan, dt))
            log.info("plan at %d: d=%d skip %s", ctx.context, plan.draft_length, plan.describe())
        return plan

    def _stopped(self, res: GenerationResult, cfg: GenerationConfig, start: int) -> bool:
        """Trim ``res.tokens`` at a stop condition and set ``stop_reason``; True if done.

        ``start``: index of the first token added this round (earlier ones were checked).
        """
        be = self.backend
        if cfg.stop_at_eos:
            for i in range(start, len(res.tokens)):
                if res.tokens[i] in be.eos_token_ids:
                    del res.tokens[i + 1 :]
                    res.stop_reason = "eos"
                    break
        if len(res.tokens) >= cfg.max_new_tokens:
            del res.tokens[cfg.max_new_tokens :]
            res.stop_reason = res.stop_reason or "length"
        text = be.decode(res.tokens) if (cfg.stop or res.stop_reason) else ""
        for s in cfg.stop:
            k = text.find(s)
            if k >= 0:
                res.text = text[:k]
                res.stop_reason = "stop"
                return True
        if res.stop_reason:
            res.text = text
            return True
        if be.length + 1 >= be.max_context:
            res.text = be.decode(res.tokens)
            res.stop_reason = "context"
            return True
        return False
