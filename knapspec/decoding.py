"""The draft/verify loop, written once for every backend.

One round at draft length ``d`` under skip mask ``m`` (``last`` = newest token, not yet in
the KV cache, at position ``p0 = backend.length``)::

    draft:  for j in 1..d: run one token under m           -> x_1..x_d   (and q_1..q_d)
    verify: roll back to p0; run [last, x_1..x_d] in full  -> p_1..p_{d+1}
    accept: greedy match or rejection sampling            -> n accepted + 1 next token
    keep:   roll back to p0 + n + 1 (last and the accepted drafts are now cached)

Drafting and verification are the backend's ``draft`` and ``verify`` (so a backend on an
accelerator keeps token selection on its device); the loop owns the cache positions, the
rollbacks and everything else.  ``d = 0`` is a plain autoregressive step.  Every
``replan_interval`` rounds the planner is asked again, with the context length, the tokens
left and (for model-in-the-loop planners) the backend's block oracle over the last verified
tokens.  Each drafting round is reported to the planner (``Planner.observe``); when it
answers that what it saw parted from its prediction, the next round is planned afresh (a
model-in-the-loop planner then gets its oracle window recomputed, as below).
Planning time is part of ``decode_seconds``; the time of the caller's streaming callback is
not part of any timing.

Hidden-state capture for the oracle is paid only where a plan reads it: the full-model
forwards of the last ``capture window`` rounds before a plan (the backend's
``capture_tokens``; each round caches at least one token, so those rounds cover the window),
and only when ``Planner.wants_oracle`` says that plan may use the oracle.  Should the answer
change inside the window, the window's tokens are recomputed once with capture, so the
oracle always sees the same tokens: the last ``capture_tokens`` cached ones.

With an ``AcceptanceSimulator`` (``knapspec.simulate``) the number of drafts each round keeps
is drawn from the plan's acceptance instead of decided by the target (timing only: the
results say so); without one, the loop is lossless and pays nothing for the option.
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
from .sampling import SamplingParams, select
from .simulate import AcceptanceSimulator, RoundDraws
from .stop_strings import StopStringScanner

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
        if not isinstance(self.stop, (tuple, list)) or any(not isinstance(s, str) or not s
                                                           for s in self.stop):
            raise KnapSpecError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))  # frozen: hashable and immutable

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
    decode_seconds: float = 0.0  # after prefill: draft, verify, plan, switch (not the callback)
    draft_seconds: float = 0.0  # draft steps
    verify_seconds: float = 0.0  # verification steps (and autoregressive steps)
    plan_seconds: float = 0.0  # planner calls
    rounds: int = 0  # draft/verify rounds with d >= 1
    ar_steps: int = 0  # plain autoregressive steps (d = 0)
    drafted: int = 0  # drafted tokens
    accepted: int = 0  # drafted tokens accepted
    stop_reason: str = ""  # "eos", "length", "stop" or "context"
    plan_history: list[dict[str, Any]] = field(default_factory=list)  # one entry per plan
    # why nothing was drafted, e.g. "no draft pays at context 46 on the measured profile";
    # None when something was drafted
    plain_reason: str | None = None
    # the tokens are not a real model's output (simulated acceptance, random weights): the
    # timings hold, the text and the acceptance statistics say nothing about a model
    timing_only: bool = False
    timing_only_reason: str | None = None  # why, when timing_only
    simulated_acceptance: str | None = None  # the simulator's spec, e.g. "0.9xpredicted"

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
            "plain_reason": self.plain_reason,
            "timing_only": self.timing_only,
            "timing_only_reason": self.timing_only_reason,
            "simulated_acceptance": self.simulated_acceptance,
        }


def _plan_record(plan: DraftPlan, seconds: float) -> dict[str, Any]:
    """``plan_history`` entry: the plan, then what happened while it was in use (counts
    over its rounds until the next entry; ``observed_alpha``: per-token acceptance
    ``accepted / (accepted + rounds with a rejection)``, None until it drafts) and
    ``predicted_alpha``, the planner's estimate as last calibrated (``plan_alpha``: the
    one the plan was made with; ``proxy_alpha``: the inner planner's own prediction)."""
    rec = plan.to_dict()
    rec.update(plan_seconds=seconds, plan_alpha=float(plan.alpha),
               proxy_alpha=float(plan.extra.get("proxy_alpha", plan.alpha)), rounds=0,
               drafted=0, accepted=0, rejected=0, observed_alpha=None)
    return rec


@dataclass
class _Loop:
    """State of one generation's loop."""

    prompt: list[int]  # prompt token ids (the cache starts with them)
    scan: StopStringScanner | None  # incremental text for stop strings (None: no stops)
    has_oracle: bool  # the backend offers a block oracle (else nothing is ever captured)
    # the backend's capture_tokens: every round caches >= 1 token, so this many captured
    # rounds in a row (or a captured prefill) hold the oracle's whole window
    window: int
    lead: int  # rounds before each plan that capture: min(window, replan_interval)
    capture_streak: int = 0  # rounds in a row, up to now, run with capture
    held: int = 0  # positions the backend's window holds, ending at the newest cached token
    capture_next: bool = False  # the rounds before the next plan capture
    stop_ids: frozenset[int] = frozenset()  # drafted ids that end drafting (EOS if it stops)
    sim_draws: RoundDraws | None = None  # the simulator's per-generation draws (None: lossless)
    plan: DraftPlan | None = None  # the plan in use
    record: dict[str, Any] | None = None  # its plan_history entry (the latest one)
    replan: bool = False  # the planner asked for a plan before the next round (observe)
    drafting_plan: bool = False  # some round ran under a plan with draft length >= 1
    sent: int = 0  # tokens passed to the streaming callback
    paused: float = 0.0  # seconds spent in the streaming callback

    def captured(self, capture: bool, verified: int, kept: int) -> None:
        """Account for a round that ran ``verified`` tokens through the full model (with
        ``capture`` or not) and kept ``kept`` of them.

        The backend's window keeps the last ``window`` captured positions when they are
        stored, before the rollback drops the rejected ones; ``held`` follows that, so a
        plan knows when rejections left the window empty.
        """
        self.capture_streak = self.capture_streak + 1 if capture else 0
        if not capture:
            self.held = 0  # what is captured no longer ends at the newest token
        else:
            self.held = max(0, min(self.held + verified, self.window) - (verified - kept))


class SpeculativeDecoder:
    """Runs generations on a backend under a planner.

    Components are injected: the backend (model runner), the planner, a ``clock``
    (seconds; tests may inject a fake one) and optionally a ``simulator`` that draws each
    round's accepted drafts (timing only, see ``knapspec.simulate``).
    """

    def __init__(
        self,
        backend: Backend,
        planner: Planner,
        clock: Callable[[], float] = time.perf_counter,
        simulator: AcceptanceSimulator | None = None,
    ) -> None:
        self.backend = backend
        self.planner = planner
        self.clock = clock
        self.simulator = simulator

    # ---------------------------------------------------------------- one round
    def _round(
        self,
        last: int,
        loop: _Loop,
        budget: int,
        sp: SamplingParams,
        rng: np.random.Generator,
        res: GenerationResult,
        capture: bool,
    ) -> list[int]:
        """One draft/verify round (or autoregressive step) under ``loop.plan``; returns the
        new tokens.

        ``budget``: tokens the generation may still add (>= 1); ``capture``: keep the verify
        forward's hidden states for the block oracle.
        """
        be, plan = self.backend, loop.plan
        p0 = be.length
        d = min(plan.draft_length, budget - 1)
        t0 = self.clock()
        knobs = {}  # passed only when set: a backend without them still runs plain plans
        if plan.draft_vocab:
            knobs["vocab"] = plan.draft_vocab
        if plan.stop_confidence > 0.0:
            knobs["stop_confidence"] = plan.stop_confidence
        drafts, q = (be.draft(last, plan.mask, d, sp, rng, loop.stop_ids, **knobs) if d > 0
                     else ([], None))
        t1 = self.clock()
        be.rollback(p0)
        accept = None
        if loop.sim_draws is not None and drafts:
            accept = self.simulator.draw(plan.alpha, len(drafts), loop.sim_draws)
        n, nxt = be.verify(last, drafts, q, sp, rng, capture=capture, accept=accept)
        be.rollback(p0 + n + 1)
        res.draft_seconds += t1 - t0
        res.verify_seconds += self.clock() - t1
        if drafts:
            res.rounds += 1
            res.drafted += len(drafts)
            res.accepted += n
            self._observe(loop, plan, len(drafts), n)
        else:
            res.ar_steps += 1
        return [*drafts[:n], nxt]

    def _observe(self, loop: _Loop, plan: DraftPlan, drafted: int, accepted: int) -> None:
        """Report a drafting round to the planner (``Planner.observe``) and to the plan's
        history entry.  Under simulated acceptance the planner is not told: the draws come
        from the plan's own alpha, and learning from them would only echo it."""
        rec = loop.record
        if rec is not None:
            rec["rounds"] += 1
            rec["drafted"] += drafted
            rec["accepted"] += accepted
            rec["rejected"] += int(accepted < drafted)
            rec["observed_alpha"] = rec["accepted"] / (rec["accepted"] + rec["rejected"])
        if loop.sim_draws is not None:
            return
        loop.replan = bool(self.planner.observe(plan, drafted, accepted)) or loop.replan
        if rec is not None:
            rec["predicted_alpha"] = float(self.planner.acceptance(plan))

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
            on_token: streaming callback, called with each batch of new token ids.  With stop
                strings a token is passed on only once no stop string can drop it (the rule
                is in ``knapspec.stop_strings``), so the batches add up to ``result.tokens``.
                Time spent in the callback counts in none of the result's timings.
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
        self._flag_timing_only(res)
        self.planner.reset()
        loop = self._start_loop(prompt, cfg)

        t_start = self.clock()
        capture = loop.has_oracle and self.planner.wants_oracle(len(prompt))
        last_logits = be.prefill(prompt, capture=capture)  # [V]
        loop.capture_streak = loop.window if capture else 0  # the prefill covers the window
        loop.held = min(len(prompt), loop.window) if capture else 0
        t_prefill = self.clock()
        res.prefill_seconds = t_prefill - t_start
        last = select(last_logits, sp, rng)
        new = [last]
        rounds_since_plan = cfg.replan_interval  # plan before the first round
        while True:
            start = len(res.tokens)
            res.tokens.extend(new)
            done = self._stopped(res, cfg, start, loop.scan)
            self._stream(res, loop, on_token, done)
            if done:
                break
            if rounds_since_plan >= cfg.replan_interval or loop.replan:
                loop.plan = self._plan(loop, cfg, res)
                rounds_since_plan, loop.replan = 0, False
            capture = self._capture_round(loop, cfg.replan_interval - rounds_since_plan)
            budget = min(cfg.max_new_tokens - len(res.tokens), be.max_context - be.length - 1)
            loop.drafting_plan |= loop.plan.draft_length > 0
            drafted = res.drafted
            new = self._round(last, loop, budget, sp, rng, res, capture)
            loop.captured(capture, res.drafted - drafted + 1, len(new))
            rounds_since_plan += 1
            last = new[-1]
        res.decode_seconds = self.clock() - t_prefill - loop.paused
        res.plain_reason = self._plain_reason(res, loop)
        return res

    def _start_loop(self, prompt: list[int], cfg: GenerationConfig) -> _Loop:
        be = self.backend
        has_oracle = type(be).block_oracle is not Backend.block_oracle
        window = int(getattr(be, "capture_tokens", cfg.replan_interval))
        scan = StopStringScanner(be.decode, cfg.stop) if cfg.stop else None
        loop = _Loop(prompt, scan, has_oracle, window, min(window, cfg.replan_interval))
        loop.stop_ids = be.eos_token_ids if cfg.stop_at_eos else frozenset()
        loop.sim_draws = None if self.simulator is None else self.simulator.start()
        return loop

    def _flag_timing_only(self, res: GenerationResult) -> None:
        """Flag a result whose tokens are not a real model's: simulated acceptance, or a
        backend that says so (``Backend.timing_only_reason``, e.g. random weights)."""
        reasons = [getattr(self.backend, "timing_only_reason", None)]
        if self.simulator is not None:
            res.simulated_acceptance = self.simulator.spec
            reasons.append(self.simulator.reason)
        reasons = [r for r in reasons if r]
        if reasons:
            res.timing_only = True
            res.timing_only_reason = "; ".join(reasons)

    def _capture_round(self, loop: _Loop, rounds_left: int) -> bool:
        """Whether the next round captures hidden states; ``rounds_left``: rounds until the
        next plan, this one included.  Only the last ``loop.lead`` rounds can be read by the
        next plan's oracle, and only if the planner says it may want the oracle then."""
        if not loop.has_oracle or rounds_left > loop.lead:
            return False
        if rounds_left == loop.lead:  # the window opens: ask once per plan
            loop.capture_next = self.planner.wants_oracle(self.backend.length)
        return loop.capture_next

    def _stream(
        self,
        res: GenerationResult,
        loop: _Loop,
        on_token: Callable[[list[int]], None] | None,
        done: bool,
    ) -> None:
        """Pass on the tokens no stop string can drop any more (all of them once done),
        keeping the callback's time out of the timings."""
        if on_token is None:
            return
        upto = len(res.tokens) if done or loop.scan is None else loop.scan.safe_tokens()
        if upto > loop.sent:
            t0 = self.clock()
            on_token(res.tokens[loop.sent : upto])
            loop.paused += self.clock() - t0
            loop.sent = upto

    def _plan(self, loop: _Loop, cfg: GenerationConfig, res: GenerationResult) -> DraftPlan:
        t0 = self.clock()
        be = self.backend
        current = loop.plan
        oracle = None
        if loop.has_oracle:
            short = loop.capture_streak < loop.window or loop.held == 0
            if short and self.planner.wants_oracle(be.length):
                # the planner changed its mind inside the window, or rejected drafts emptied
                # it: compute what it reads now
                self._recapture(loop.window, loop.prompt, res.tokens)
                loop.capture_streak, loop.held = loop.window, min(loop.window, be.length)
            if loop.capture_streak >= loop.window and loop.held > 0:
                oracle = be.block_oracle()
        ctx = PlanContext(
            context=be.length,
            remaining_tokens=cfg.max_new_tokens - len(res.tokens),
            current_mask=None if current is None else current.mask,
            switch_price=be.switch_seconds,
            oracle=oracle,
            generated=len(res.tokens),
        )
        plan = self.planner.plan(ctx)
        dt = self.clock() - t0
        res.plan_seconds += dt
        if current is None or plan.draft_length != current.draft_length or not np.array_equal(
            plan.mask, current.mask
        ):
            loop.record = _plan_record(plan, dt)
            res.plan_history.append(loop.record)
            log.info("plan at %d: d=%d skip %s", ctx.context, plan.draft_length, plan.describe())
        return plan

    def _recapture(self, n: int, prompt: list[int], tokens: list[int]) -> None:
        """Run the last ``n`` cached tokens again with the full model, capturing their states
        (the cache holds the prompt and every generated token but the newest)."""
        be = self.backend
        cached = [*prompt, *tokens[:-1]]
        if len(cached) != be.length:
            raise KnapSpecError(
                f"internal: the cache holds {be.length} tokens, the loop expected {len(cached)}"
            )
        k = min(n, be.length)
        be.rollback(be.length - k)
        be.forward(cached[len(cached) - k :], None, capture=True, all_logits=False)

    def _plain_reason(self, res: GenerationResult, loop: _Loop) -> str | None:
        """Why nothing was drafted (None when something was)."""
        if res.drafted:
            return None
        if self.planner.name == "ar":
            why = "the strategy is ar"
        elif loop.drafting_plan or (loop.plan is None and res.stop_reason == "length"):
            why = "the token budget left no room to draft"
        elif loop.plan is not None:
            why = loop.plan.reason or f"no draft pays at context {loop.plan.cost.context:.0f}"
        else:
            why = f"the first token ended the generation ({res.stop_reason})"
        return f"plain decoding: {why}"

    def _stopped(
        self,
        res: GenerationResult,
        cfg: GenerationConfig,
        start: int,
        scan: StopStringScanner | None,
    ) -> bool:
        """Trim ``res.tokens`` at a stop condition, set ``text`` and ``stop_reason``; True if
        done.

        ``start``: index of the first token added this round (earlier ones were checked).  A
        stop string keeps the tokens that cover the text before it, and ``text`` ends just
        before it (the rule is in ``knapspec.stop_strings``).
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
        if scan is not None:
            k = scan.extend(res.tokens)
            if k is not None:
                del res.tokens[scan.tokens_before(k) :]
                res.text = scan.text[:k]
                res.stop_reason = "stop"
                return True
        if not res.stop_reason and be.length + 1 >= be.max_context:
            res.stop_reason = "context"
        if res.stop_reason:
            res.text = be.decode(res.tokens)
            return True
        return False
