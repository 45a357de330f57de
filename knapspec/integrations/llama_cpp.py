"""llama-cpp-python's speculative hook: ``Llama(path, draft_model=KnapSpecDraftModel(path))``.

Example (``knapspec.toml`` as for the CLI; a dict or a ``KnapSpecConfig`` works too)::

    from llama_cpp import Llama
    from knapspec.integrations.llama_cpp import KnapSpecDraftModel

    draft = KnapSpecDraftModel("model.gguf", knapspec_config="knapspec.toml")
    llm = Llama("model.gguf", draft_model=draft, logits_all=True, flash_attn=True)
    print(llm("Q: Name three rivers. A:", max_tokens=64, temperature=0)["choices"][0]["text"])
    print(draft.stats.drafted, draft.stats.accepted, draft.stats.plans)

How llama-cpp-python (0.3.x) uses a ``LlamaDraftModel``: in ``Llama.generate`` it calls the
draft model with the ids of every token so far (the prompt, then each verified token; the
newest one, which it has sampled but not evaluated yet, last), evaluates that token and the
returned drafts in one batch, samples a token at every position, keeps the drafts its
samples agree with and drops the rest of its KV cache.  It never says what it kept; the
next call does: its ids extend the previous call's by the accepted drafts and one token of
the target's own (the correction, or the bonus token after a fully accepted draft).

``KnapSpecDraftModel`` runs the llama.cpp backend (``knapspec.backends.llamacpp``) on the
same GGUF in contexts of its own: the target's, and the pooled layer-skip drafts the planner
picks.  At each call it

1. infers how many drafts of the previous call were accepted (the common prefix of the
   previous ids plus drafts with the new ids) and reports the round to the planner
   (``Planner.observe(plan, drafted, accepted)``) and to ``stats``;
2. brings the backend's token history to the new ids (rolled back to the common prefix,
   the rest appended; its target evaluates them when the draft next needs their KV, which
   it copies into the draft: drafts attend to the target's KV of every verified position);
3. every ``planner.replan_interval`` calls, or at once when ``observe`` asks for it (a
   calibrating planner whose observed acceptance parted from the plan's), asks the planner
   for a plan (context = tokens llama-cpp-python holds in its KV cache);
4. drafts ``draft_length`` tokens greedily under the plan's skip mask (none when the plan is
   autoregressive: drafting does not pay), stopping at an end-of-generation id.

Drafts are greedy whatever llama-cpp-python samples with: its verification samples every
position from the target and keeps a draft only where the sample equals it, so the output
follows the target's distribution whichever drafts it is shown.  Greedy output therefore
equals plain greedy decoding up to llama.cpp's batched-vs-single-token rounding on near-ties
(its attention is not batch-invariant; docs/backends.md).  Such flips are rarer with
``flash_attn=True`` on ``Llama``: teacher-forced agreement with one-token greedy measured
99.2% (3 Spec-Bench questions and an 838-token summary prompt, 64 tokens each, d = 4) with
it, 96.3% without it, every disagreement a top-2 gap below 0.25.

Pass ``logits_all=True`` to ``Llama`` with a draft model: llama-cpp-python 0.3.x forces it on
for a draft model but sizes its logits buffer from the argument (``n_batch`` rows), so a
sequence longer than ``n_batch`` tokens fails with a numpy broadcast error without it.

A round's outcome is known only if the next call continues the same generation (ids = the
previous ids + the accepted drafts + one token); otherwise (the generation stopped, or the
next call starts another) it is counted in ``stats.unreported`` and the planner starts
afresh (``Planner.reset``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel

from ..backends import create_backend
from ..config import KnapSpecConfig
from ..costmodels.base import CostModel
from ..costmodels.io import load_cost_model
from ..decoding import _plan_record
from ..errors import KnapSpecError
from ..planner.plan import DraftPlan
from ..planner.planners import PlanContext, Planner
from ..runtime import config_cost_model, config_planner
from ..sampling import SamplingParams

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(0.0, 1.0)


def as_knapspec_config(value: KnapSpecConfig | Mapping[str, Any] | str | os.PathLike[str]
                       | None) -> KnapSpecConfig:
    """``KnapSpecConfig.coerce``: a config, a dict shaped like ``knapspec.toml``, a TOML
    path or ``None`` (kept as this module's name for it)."""
    return KnapSpecConfig.coerce(value, source="knapspec_config")


@dataclass
class DraftStats:
    """What a ``KnapSpecDraftModel`` proposed and what llama-cpp-python kept (tokens)."""

    calls: int = 0  # times llama-cpp-python asked for drafts
    rounds: int = 0  # calls that returned at least one draft
    drafted: int = 0  # drafts returned, over all rounds
    accepted: int = 0  # drafts llama-cpp-python kept (inferred from the next call's ids)
    reported: int = 0  # drafts of rounds whose outcome is known (accepted <= reported)
    unreported: int = 0  # drafting rounds whose outcome was never seen (generation ended)
    generations: int = 0  # generations seen (a call that does not continue the last starts one)
    # one record per plan change, as the decoder's plan_history (DraftPlan.to_dict(), then
    # rounds, drafted, accepted, rejected, observed_alpha while it was in use, and
    # predicted_alpha as last calibrated) plus "call" (index of the call that planned) and
    # "generation" (its index)
    plans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / reported drafts (0 when no round's outcome is known)."""
        return self.accepted / self.reported if self.reported else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "rounds": self.rounds, "drafted": self.drafted,
                "accepted": self.accepted, "reported": self.reported,
                "unreported": self.unreported, "generations": self.generations,
                "acceptance_rate": self.acceptance_rate, "plans": list(self.plans)}


@dataclass
class _Round:
    """The last call: what it was shown and what it returned."""

    ids: list[int]  # the input ids of that call
    drafts: list[int]  # the drafts returned (empty: a plain step)
    plan: DraftPlan  # the plan they were drafted under
    record: dict[str, Any]  # that plan's entry in stats.plans


class KnapSpecDraftModel(LlamaDraftModel):
    """A llama-cpp-python draft model that drafts with knapspec's planned layer-skip drafts of
    the target GGUF itself (self-speculative decoding; no second model).

    Args:
        model_path: the GGUF file ``Llama`` runs (default: ``model.path`` of the config, else
            the default SmolLM2 GGUF).  It must be the same file, or the drafts predict
            another model's tokens (still lossless: llama-cpp-python verifies every one).
        knapspec_config: a ``KnapSpecConfig``, a dict shaped like ``knapspec.toml`` or the
            path of one: the strategy and its options (``[planner]``), the cost model
            (``[costmodel]``; the default ``profile`` measures this machine once, minutes,
            cached), ``[backend]``/``[backend.llamacpp]`` options, and
            ``generation.max_new_tokens`` as the expected length of a generation (the
            planner amortises a switch of drafts over it; llama-cpp-python does not say).
        planner: a ``Planner`` to use instead of the configured strategy, e.g.
            ``StaticPlanner(BlockLayout(n_layers), cost_model, mask, alpha, draft_length=4)``
            to force a plan (no cost model is loaded then).
        cost_model: a ``CostModel`` or cost-model JSON path instead of ``[costmodel]``.
        backend_options: llama.cpp backend options over the config's (``threads``,
            ``max_context``, ``flash_attn``, ``draft_pool``, ``draft_cache_mb``).

    Attributes:
        backend: the ``LlamaCppBackend`` that drafts.
        planner: the planner; it receives ``observe`` after every round whose outcome is known.
        stats: a ``DraftStats``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        knapspec_config: KnapSpecConfig | Mapping[str, Any] | str | os.PathLike[str] | None
        = None,
        *,
        planner: Planner | None = None,
        cost_model: CostModel | str | os.PathLike[str] | None = None,
        **backend_options: Any,
    ) -> None:
        config = as_knapspec_config(knapspec_config).for_backend("llamacpp")
        if planner is not None and not isinstance(planner, Planner):
            raise KnapSpecError(
                f"planner must be a knapspec Planner, got {type(planner).__name__}")
        model = config.model.path if model_path is None else model_path
        options = {**config.backend.options_for("llamacpp"), **backend_options}
        self.backend = create_backend("llamacpp", model=model, **options)
        try:
            layout = self.backend.layout
            if planner is None:
                if isinstance(cost_model, CostModel):
                    cm = cost_model
                elif cost_model is not None:
                    cm = load_cost_model(Path(cost_model))
                else:
                    cm = config_cost_model(config, self.backend, progress=False,
                                           notice=log.warning)
                planner = config_planner(config, layout, cm, backend=self.backend)
            else:
                n_blocks = getattr(getattr(planner, "layout", None), "n_blocks", None)
                if n_blocks is not None and n_blocks != layout.n_blocks:
                    raise KnapSpecError(
                        f"the planner plans {n_blocks} blocks, {self.backend.model_path.name}"
                        f" has {layout.n_blocks} ({layout.n_layers} layers)")
        except Exception:
            self.backend.close()
            raise
        self.planner = planner
        self.config = config
        self.replan_interval = int(config.planner.replan_interval)  # calls between plans
        self.expected_tokens = int(config.generation.max_new_tokens)  # tokens per generation
        self.stats = DraftStats()
        self._last: _Round | None = None  # the previous call
        self._plan: DraftPlan | None = None  # the plan in use
        self._record: dict[str, Any] = {}  # its entry in stats.plans
        self._since_plan = 0  # calls since the last plan
        self._replan_now = False  # the planner asked for a plan (observe returned True)
        self._generated = 0  # tokens generated in the current generation

    # ------------------------------------------------------------------ the hook
    def __call__(self, input_ids: Any, /, **kwargs: Any) -> np.ndarray:
        """Drafts for the tokens after ``input_ids``.

        Args:
            input_ids: ``[n]`` token ids: everything llama-cpp-python holds plus its newest
                token (not yet evaluated by it), as ``Llama.generate`` passes them.

        Returns:
            ``[k]`` int32 (``np.intc``) draft ids, ``k <= plan.draft_length``; empty when
            the plan drafts nothing or the context is full.
        """
        ids = _token_list(input_ids)
        be = self.backend
        self.stats.calls += 1
        self._settle(ids)
        self._sync(ids[:-1])
        if self._plan is None or self._since_plan >= self.replan_interval or self._replan_now:
            self._replan(len(ids) - 1)
        self._since_plan += 1
        plan = self._plan
        d = min(plan.draft_length, be.max_context - len(ids) + 1)
        drafts: list[int] = []
        if d > 0:
            drafts, _ = be.draft(ids[-1], plan.mask, d, _GREEDY, np.random.default_rng(0),
                                 be.eos_token_ids)
            self.stats.rounds += 1
            self.stats.drafted += len(drafts)
        self._last = _Round(ids, drafts, plan, self._record)
        return np.asarray(drafts, dtype=np.intc)

    def _settle(self, ids: list[int]) -> None:
        """Account for the previous call from these ids: report its round if they continue
        it, else start a new generation."""
        last = self._last
        if last is not None:
            n = len(last.ids)
            j = 0
            if len(ids) > n and ids[:n] == last.ids:
                new = ids[n:]
                while j < min(len(new), len(last.drafts)) and new[j] == last.drafts[j]:
                    j += 1
                if len(new) == j + 1:  # the accepted drafts, then one token of the target's
                    self._generated += j + 1
                    if last.drafts:
                        self._observe(last, j)
                    return
            if last.drafts:
                self.stats.unreported += 1
        self.stats.generations += 1
        self.planner.reset()
        self._plan = None
        self._replan_now = False
        self._generated = 0

    def _observe(self, last: _Round, accepted: int) -> None:
        """Report a round whose drafts were seen accepted up to ``accepted``."""
        drafted = len(last.drafts)
        self.stats.accepted += accepted
        self.stats.reported += drafted
        rec = last.record
        rec["rounds"] += 1
        rec["drafted"] += drafted
        rec["accepted"] += accepted
        rec["rejected"] += int(accepted < drafted)
        rec["observed_alpha"] = rec["accepted"] / (rec["accepted"] + rec["rejected"])
        self._replan_now |= bool(self.planner.observe(last.plan, drafted, accepted))
        rec["predicted_alpha"] = float(self.planner.acceptance(last.plan))

    def _sync(self, history: list[int]) -> None:
        """Make ``history`` the backend's sequence: keep the common prefix, append the rest
        (evaluated lazily, when a draft needs its KV)."""
        be = self.backend
        if len(history) >= be.max_context:
            raise KnapSpecError(
                f"context full: {len(history) + 1} tokens, the draft model's context holds "
                f"{be.max_context} (raise backend option max_context)")
        cached = be.cached_tokens() or []
        k = len(cached)
        if k > len(history) or cached != history[:k]:  # the usual case (an extension) in C
            k = 0
            for a, b in zip(cached, history, strict=False):
                if a != b:
                    break
                k += 1
        be.rollback(k)
        be.extend_history(history[k:])

    def _replan(self, context: int) -> None:
        """Ask the planner at ``context`` tokens; record a changed plan in ``stats.plans``."""
        be, current = self.backend, self._plan
        ctx = PlanContext(
            context=context,
            remaining_tokens=max(1, self.expected_tokens - self._generated),
            current_mask=None if current is None else current.mask,
            switch_price=be.switch_seconds,
            oracle=None,  # llama.cpp offers no block oracle
            generated=self._generated,
        )
        t0 = time.perf_counter()
        plan = self.planner.plan(ctx)
        seconds = time.perf_counter() - t0
        self._since_plan, self._replan_now = 0, False
        if current is None or plan.draft_length != current.draft_length or not np.array_equal(
            plan.mask, current.mask
        ):
            rec = _plan_record(plan, seconds)
            rec["call"] = self.stats.calls - 1
            rec["generation"] = self.stats.generations - 1
            self.stats.plans.append(rec)
            self._record = rec
            log.info("plan at %d: d=%d skip %s", context, plan.draft_length, plan.describe())
        self._plan = plan

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the backend's llama.cpp contexts and models (idempotent)."""
        self.backend.close()

    def __enter__(self) -> KnapSpecDraftModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _token_list(input_ids: Any) -> list[int]:
    """``input_ids`` as a list of ints; a ``KnapSpecError`` for anything but ``[n >= 1]``."""
    arr = np.asarray(input_ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise KnapSpecError(
            f"input_ids must be a non-empty 1-D array of token ids, got shape {arr.shape} "
            f"of {arr.dtype}")
    return arr.tolist()  # Python ints, converted in C (a 2K-token history per call)


__all__ = ["DraftStats", "KnapSpecDraftModel", "as_knapspec_config"]
