"""The benchmark harness behind ``knapspec bench`` (whose command line lives in
``knapspec/commands/bench.py``): strategies and Hugging Face peers on real prompts, and the
forced-plan sweep.

Everything that is compared is measured in the same process, on the same backend and
prompts, with warm-up first; figures are medians over repeats.  Speedups are ratios to the
same backend's autoregressive decoding of the same prompt in the same run.  Rows of several
backends (a ``backend`` key per row) are summarised side by side, with each backend's
tokens/s over the first backend's (``cross_backend_ratios``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend
from .costmodels.base import CostModel
from .decoding import GenerationConfig, SpeculativeDecoder
from .errors import KnapSpecError
from .planner.factory import make_planner
from .planner.knobs import FULL_HEAD, DraftHead, DraftKnobs
from .planner.plan import select_plan
from .planner.planners import Planner, StaticPlanner
from .simulate import AcceptanceSimulator

log = logging.getLogger(__name__)

BOOKS = ("pg1342.txt", "pg84.txt")
SWEEP_ALPHA_TOKENS = 32  # prompt tokens whose top-1 agreement predicts a forced plan's alpha


def default_data_dir() -> Path:
    """``../shared/data`` beside the project checkout (where the evaluation text lives)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Prompt:
    """One benchmark prompt, already tokenized."""

    name: str  # where it came from
    context: int  # target context length in tokens (the bucket)
    ids: list[int]  # token ids, chat template applied


def load_specbench(path: Path, n: int, categories: Sequence[str] = ("mt_bench", "qa")) -> list[str]:
    """First-turn prompts of Spec-Bench questions from the given categories."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise KnapSpecError(f"benchmark data not found: {path}") from None
    for line in lines:
        obj = json.loads(line)
        if obj.get("category") in categories:
            out.append(obj["turns"][0])
        if len(out) >= n:
            break
    if not out:
        raise KnapSpecError(f"no prompts of categories {list(categories)} in {path}")
    return out


def make_prompts(
    backend: Backend, contexts: Sequence[int], n_prompts: int, data: Path | None = None
) -> list[Prompt]:
    """Prompts per context bucket: Spec-Bench questions for short contexts (< 500 tokens),
    book slices with a summarisation request filling the context for long ones."""
    data_dir = data.parent if data and data.is_file() else (data or default_data_dir())
    spec_path = data if data and data.is_file() else data_dir / "specbench_dev.jsonl"
    prompts: list[Prompt] = []
    for c in contexts:
        if c < 500:
            for i, q in enumerate(load_specbench(spec_path, n_prompts)):
                prompts.append(Prompt(f"specbench[{i}]", c, backend.encode(q)))
            continue
        for i in range(n_prompts):
            book = BOOKS[i % len(BOOKS)]
            try:
                text = (data_dir / book).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise KnapSpecError(f"benchmark book not found: {data_dir / book}") from None
            start = 30_000 + 50_000 * (i // len(BOOKS))
            body = backend.encode(text[start : start + 8 * c], chat=False)
            # fill the context: the chat-wrapped request costs a few dozen tokens
            overhead = len(backend.encode("Summarize the following text.\n\n", chat=True))
            body_text = backend.decode(body[: max(c - overhead, 16)])
            ids = backend.encode("Summarize the following text.\n\n" + body_text)
            prompts.append(Prompt(f"{book}@{start}", c, ids))
    return prompts


@dataclass
class RunStats:
    """Medians of one (strategy, prompt) cell."""

    strategy: str
    prompt: str
    context: int
    prompt_tokens: int
    tokens_per_second: float
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 1.0
    draft_share: float = 0.0
    verify_share: float = 0.0
    plan_share: float = 0.0
    # drafted tokens the target rejected (drafted - accepted), per generated token
    wasted_per_token: float = 0.0
    new_tokens: int = 0
    identical_to_ar: bool | None = None
    plans: list[dict[str, Any]] = field(default_factory=list)
    timing_only: bool = False  # the tokens are not a real model's (see timing_only_reason)
    timing_only_reason: str | None = None
    simulated_acceptance: str | None = None  # the --simulate-acceptance spec, if any


def strategy_stats(
    strategy: str, prompt: Prompt, results: Sequence[Any], reference: list[int] | None
) -> RunStats:
    """Median statistics of repeated generations of one strategy on one prompt."""
    med = lambda f: statistics.median(f(r) for r in results)  # noqa: E731
    r0 = results[0]
    return RunStats(
        strategy=strategy, prompt=prompt.name, context=prompt.context,
        prompt_tokens=len(prompt.ids),
        tokens_per_second=med(lambda r: r.tokens_per_second),
        acceptance_rate=med(lambda r: r.acceptance_rate),
        mean_accepted_length=med(lambda r: r.mean_accepted_length),
        draft_share=med(lambda r: r.draft_seconds / r.decode_seconds),
        verify_share=med(lambda r: r.verify_seconds / r.decode_seconds),
        plan_share=med(lambda r: r.plan_seconds / r.decode_seconds),
        wasted_per_token=med(lambda r: (r.drafted - r.accepted) / max(r.new_tokens, 1)),
        new_tokens=r0.new_tokens,
        identical_to_ar=None if reference is None else all(r.tokens == reference for r in results),
        plans=r0.plan_history,
        timing_only=r0.timing_only,
        timing_only_reason=r0.timing_only_reason,
        simulated_acceptance=r0.simulated_acceptance,
    )


class _TimingStreamer:
    """A ``generate()`` streamer that timestamps every batch of new tokens."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.events: list[tuple[float, int]] = []  # (seconds, tokens in this batch)
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.events.append((self.clock(), int(value.numel())))

    def end(self) -> None:
        pass

    def decode_rate(self) -> float:
        """New tokens after the first, per second after the first token (prefill excluded)."""
        if len(self.events) < 2:
            return 0.0
        tokens = sum(n for _, n in self.events[1:])
        return tokens / max(self.events[-1][0] - self.events[0][0], 1e-9)


HF_PEERS = ("hf-generate", "hf-prompt-lookup", "hf-early-exit")
LLAMACPP_PEERS = ("llama-cpp-python",)


def peers_for(backend: Any) -> tuple[str, ...]:
    """What a user of this backend's runtime would run instead of knapspec."""
    if backend.name == "llamacpp":
        return LLAMACPP_PEERS
    return HF_PEERS if hasattr(getattr(backend, "model", None), "generate") else ()


def run_llamacpp_peer(
    backend: Any, prompt: Prompt, max_new_tokens: int, repeats: int,
    reference: list[int] | None,
) -> RunStats:
    """``llama_cpp.Llama`` greedy decoding of the same file with the same threads and
    attention settings; tokens/s from the first generated token to the last."""
    from llama_cpp import Llama

    llm = Llama(str(backend.model_path), n_ctx=backend.max_context, n_threads=backend.threads,
                n_threads_batch=backend.threads, flash_attn=backend.flash_attn, verbose=False)
    rates, tokens = [], []
    try:
        for _ in range(repeats):
            llm.reset()
            tokens, stamps = [], []
            for tok in llm.generate(prompt.ids, temp=0.0, top_k=1):
                stamps.append(time.perf_counter())
                tokens.append(int(tok))
                if len(tokens) == max_new_tokens:
                    break
            rates.append((len(tokens) - 1) / max(stamps[-1] - stamps[0], 1e-9))
    finally:
        llm.close()
    same = None if reference is None else tokens == reference[: len(tokens)]
    return RunStats("llama-cpp-python", prompt.name, prompt.context, len(prompt.ids),
                    statistics.median(rates), new_tokens=len(tokens), identical_to_ar=same)


def run_peer(
    backend: Any, peer: str, prompt: Prompt, max_new_tokens: int, repeats: int,
    reference: list[int] | None,
) -> RunStats:
    """A peer on the backend's own model weights: Hugging Face ``generate()`` (greedy,
    prompt lookup, early-exit assisted) on torch, ``llama_cpp.Llama`` on llama.cpp.

    Decode tokens/s is timed from the first generated token to the last with a streamer,
    so prefill is excluded as for knapspec.
    """
    if peer == "llama-cpp-python":
        return run_llamacpp_peer(backend, prompt, max_new_tokens, repeats, reference)
    import torch

    model = getattr(backend, "model", None)
    if model is None or not hasattr(model, "generate"):
        raise KnapSpecError(f"peers need a Hugging Face model; backend {backend.name!r} has none")
    ids = torch.tensor([prompt.ids])
    pad = min(backend.eos_token_ids) if backend.eos_token_ids else 0
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": pad}
    if peer == "hf-prompt-lookup":
        kwargs["prompt_lookup_num_tokens"] = 10
    elif peer == "hf-early-exit":
        kwargs["assistant_early_exit"] = max(backend.layout.n_layers // 2, 1)
    elif peer != "hf-generate":
        raise KnapSpecError(f"unknown peer {peer!r}")
    rates, tokens = [], []
    for _ in range(repeats):
        streamer = _TimingStreamer()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 streamer=streamer, **kwargs)
        tokens = out[0, ids.shape[1]:].tolist()
        rates.append(streamer.decode_rate())
    same = None if reference is None else tokens == reference[: len(tokens)]
    return RunStats(peer, prompt.name, prompt.context, len(prompt.ids),
                    statistics.median(rates), new_tokens=len(tokens), identical_to_ar=same)


def benchmark(
    backend: Backend, cost_model: CostModel, prompts: Sequence[Prompt], strategies: Sequence[str],
    peers: Sequence[str], max_new_tokens: int, repeats: int, max_draft_length: int = 8,
    progress: Callable[[str], None] | None = None, peer_repeats: int = 1,
    planner_factory: Callable[[str], Planner] | None = None,
    generation: GenerationConfig | None = None,
    simulator: AcceptanceSimulator | None = None,
) -> list[dict[str, Any]]:
    """Every strategy and peer on every prompt; rows with speedups over same-prompt AR.

    ``planner_factory(strategy)`` builds the planners (default: ``make_planner`` with the
    backend's layout, ``cost_model`` and ``max_draft_length``); ``generation`` supplies
    sampling and re-plan settings (``max_new_tokens`` and ``stop_at_eos=False`` win).  With
    sampling, ``identical_to_ar`` is ``None``: sampled outputs are not expected to match.
    ``simulator``: draw accepted drafts instead of verifying them (``knapspec.simulate``);
    rows are then ``timing_only`` and ``identical_to_ar`` is ``None``.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
    if generation is not None:
        config = dataclasses.replace(generation, max_new_tokens=max_new_tokens,
                                     stop_at_eos=False)
    if planner_factory is None:
        def planner_factory(s: str) -> Planner:
            return make_planner(s, backend.layout, cost_model, max_draft_length)
    rows: list[dict[str, Any]] = []
    order = ["ar", *[s for s in strategies if s != "ar"]]
    for prompt in prompts:
        decoders = {s: SpeculativeDecoder(backend, planner_factory(s), simulator=simulator)
                    for s in order}
        for dec in decoders.values():  # warm-up: JIT, oracle paths, allocations (untimed)
            dec.generate(prompt.ids, dataclasses.replace(config, max_new_tokens=12))
        results: dict[str, list[Any]] = {s: [] for s in order}
        for r in range(repeats):
            for s, dec in decoders.items():  # interleaved, so drift hits every strategy alike
                if progress:
                    progress(f"{prompt.name} ctx={len(prompt.ids)} repeat {r + 1} {s}")
                results[s].append(dec.generate(prompt.ids, config))
        real = config.sampling.greedy and not results["ar"][0].timing_only
        reference = results["ar"][0].tokens if real else None
        ar_tps = statistics.median(x.tokens_per_second for x in results["ar"])
        for s in order:
            stats = strategy_stats(s, prompt, results[s], reference)
            # speedup: median of per-repeat ratios to the AR run of the same repeat
            ratio = statistics.median(x.tokens_per_second / y.tokens_per_second
                                      for x, y in zip(results[s], results["ar"], strict=True))
            rows.append({**stats.__dict__, "speedup": ratio})
        for peer in peers:
            if progress:
                progress(f"{prompt.name} ctx={len(prompt.ids)} {peer}")
            try:
                stats = run_peer(backend, peer, prompt, max_new_tokens, peer_repeats, reference)
            except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
                log.warning("peer %s failed on %s: %s", peer, prompt.name, e)
                rows.append({"strategy": peer, "prompt": prompt.name, "context": prompt.context,
                             "error": str(e)})
                continue
            rows.append({**stats.__dict__, "speedup": stats.tokens_per_second / ar_tps})
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over prompts per (context bucket, strategy, backend), backends side by side.

    Rows with a ``backend`` key keep it, and gain ``cross_backend_ratio`` (see
    ``cross_backend_ratios``); ``identical_to_ar`` is ``None`` where nothing was compared.
    """
    rows = [r for r in rows if "error" not in r]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    backends = list(dict.fromkeys(r.get("backend") for r in rows))
    keys = sorted({(r["context"], r["strategy"], r.get("backend")) for r in rows},
                  key=lambda k: (k[0], strategies.index(k[1]), backends.index(k[2])))
    out = []
    for ctx, strat, backend in keys:
        sel = [r for r in rows if r["context"] == ctx and r["strategy"] == strat
               and r.get("backend") == backend]
        med = lambda k, sel=sel: statistics.median(r[k] for r in sel)  # noqa: E731
        same = [r["identical_to_ar"] for r in sel if r["identical_to_ar"] is not None]
        entry = {} if backend is None else {"backend": backend}
        entry.update({
            "context": ctx, "strategy": strat, "prompts": len(sel),
            "prompt_tokens": med("prompt_tokens"), "tokens_per_second": med("tokens_per_second"),
            "speedup": med("speedup"), "acceptance_rate": med("acceptance_rate"),
            "mean_accepted_length": med("mean_accepted_length"), "plan_share": med("plan_share"),
            "draft_share": med("draft_share"), "verify_share": med("verify_share"),
            "wasted_per_token": med("wasted_per_token") if "wasted_per_token" in sel[0] else None,
            # the round knobs of the drafting plans used (head ids, confidence stop)
            "draft_vocab": _knob_values(sel, "draft_vocab"),
            "stop_confidence": _knob_values(sel, "stop_confidence"),
            "identical_to_ar": all(same) if same else None,
            "timing_only": any(r.get("timing_only", False) for r in sel),
            "timing_only_reason": "; ".join(dict.fromkeys(
                r["timing_only_reason"] for r in sel if r.get("timing_only_reason"))) or None,
        })
        out.append(entry)
    if backends != [None]:
        cross_backend_ratios(out)
    return out


def _knob_values(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
    """Distinct values of plan key ``key`` over the drafting plans of ``rows``, sorted."""
    return sorted({p[key] for r in rows for p in r.get("plans") or ()
                   if p.get("draft_length", 0) > 0 and key in p})


def cross_backend_ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each summary row's ``cross_backend_ratio``: its tokens/s over the first backend's
    on the same (context, strategy); ``None`` where the first backend has no such row.
    Returns ``summary``."""
    if not summary:
        return summary
    first = next(s["backend"] for s in summary)
    ref = {(s["context"], s["strategy"]): s["tokens_per_second"] for s in summary
           if s["backend"] == first}
    for s in summary:
        base = ref.get((s["context"], s["strategy"]))
        s["cross_backend_ratio"] = s["tokens_per_second"] / base if base else None
    return summary


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a markdown table; a backend column (and tokens/s over the first
    backend's) when the rows name their backend."""
    multi = any("backend" in s for s in summary)
    first = next((s["backend"] for s in summary if "backend" in s), "")
    head = ("| context (prompt tokens) | " + ("backend | " if multi else "") +
            "strategy | tok/s | speedup vs AR | " + (f"tok/s vs {first} | " if multi else "") +
            "acceptance | tokens/step | wasted/token | head K / stop | draft % | verify % | "
            "plan % | same tokens as AR |")
    lines = [head, "|" + "---|" * (14 if multi else 12)]
    for s in summary:
        if s["strategy"].startswith("hf-"):  # peers: generate() reports no loop statistics
            stats = "- | - | - | - | - | - | - |"
        else:
            wasted = s.get("wasted_per_token")
            knobs = "/".join(str(v) for v in s.get("draft_vocab") or ()) or "-"
            knobs += " / " + ("/".join(f"{v:g}" for v in s.get("stop_confidence") or ()) or "-")
            stats = (f"{s['acceptance_rate']:.2f} | {s['mean_accepted_length']:.2f} | "
                     f"{'-' if wasted is None else f'{wasted:.2f}'} | {knobs} | "
                     f"{100 * s['draft_share']:.0f} | {100 * s['verify_share']:.0f} | "
                     f"{100 * s['plan_share']:.1f} |")
        same = {True: "yes", False: "NO", None: "-"}[s["identical_to_ar"]]
        backend = f"{s.get('backend', '-')} | " if multi else ""
        cross = ""
        if multi:
            r = s.get("cross_backend_ratio")
            cross = "- | " if r is None else f"{r:.3f}x | "
        lines.append(
            f"| {s['context']} ({s['prompt_tokens']:.0f}) | {backend}{s['strategy']} | "
            f"{s['tokens_per_second']:.2f} | {s['speedup']:.3f}x | {cross}{stats} {same} |"
        )
    return "\n".join(lines) + timing_only_note(summary)


def timing_only_note(rows: Sequence[dict[str, Any]]) -> str:
    """``""`` when every row (or summary row) is a real model's output; else lines, each
    after a newline, saying the results are timing-only and why (one per distinct reason).
    """
    reasons = dict.fromkeys(r.get("timing_only_reason") or "not a real model's output"
                            for r in rows if r.get("timing_only"))
    if not reasons:
        return ""
    head = ("\ntiming-only: the timings hold; the tokens, acceptance and tokens/step say "
            "nothing about a model's output")
    return head + "".join(f"\ntiming-only: {why}" for why in reasons)


# ---------------------------------------------------------------------------- the sweep
def sweep(
    backend: Backend, cost_model: CostModel, prompt: Prompt, max_new_tokens: int,
    skip_counts: Sequence[int] = (4, 8, 12, 16, 24, 32),
    draft_lengths: Sequence[int] = (1, 2, 3, 4),
    progress: Callable[[str], None] | None = None,
    simulator: AcceptanceSimulator | None = None,
    draft_vocab: int = 0,
) -> list[dict[str, Any]]:
    """Force plans (skip budgets x draft lengths, plus autoregressive) and compare predicted
    with measured tokens/s.

    ``draft_vocab``: also force every (mask, draft length) with the backend's reduced draft
    head of that many ids (``Backend.draft_vocab_sizes``), its acceptance scaled by the
    head's coverage: the points then test the head's price too.

    Masks skip the ``k`` blocks whose single-block skip hurts least, measured with the
    backend's block oracle on the prompt; the predicted acceptance of each mask is its top-1
    agreement with the full model on the prompt's last tokens (what the KnapSpec planner
    uses), and the predicted tokens/s comes from the cost model (``select_plan``).  Without
    a block oracle (llama.cpp) blocks are ranked by the prior fidelity profile and the
    agreement is measured through ``forward`` (``forward_alphas``).  Each point also
    carries ``prior_alpha``, the prior profile's prediction, to compare the two signals.

    With ``simulator`` each round's accepted drafts are drawn at ``simulated_alpha`` (the
    simulator's acceptance for the point's ``predicted_alpha``), and ``predicted_tps`` is
    the cost model's at that acceptance: the points then test the cost model alone.
    """
    from .planner.oracle_planners import mask_alphas, oracle_block_scores

    be = backend
    if hasattr(be, "capture_tokens"):  # a wider window: alphas from 32 tokens, not 8
        be.capture_tokens = max(int(be.capture_tokens), SWEEP_ALPHA_TOKENS)
    be.reset()  # a fresh prefill captures the window
    be.prefill(prompt.ids, capture=True)
    oracle = be.block_oracle()
    if oracle is not None:
        scores = oracle_block_scores(oracle)
    else:  # no block access (llama.cpp): rank blocks by the prior fidelity profile
        from .planner.fidelity import default_block_scores

        scores = default_block_scores(be.layout.n_layers)
    order = [b for b in np.argsort(scores) if be.layout.skippable[b]]
    masks = [be.layout.mask_from_blocks(order[:k]) for k in skip_counts]
    if oracle is not None:
        alphas = [float(a) for a in mask_alphas(oracle, np.array(masks))]
    else:
        alphas = forward_alphas(be, prompt.ids, masks, SWEEP_ALPHA_TOKENS)
    from .planner.fidelity import additive_alpha, default_block_scores

    prior = default_block_scores(be.layout.n_layers)  # what a planner without block access uses
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
    sim_alpha = simulator.alpha_for if simulator is not None else float
    points = []
    heads = [0]
    if draft_vocab:
        cover = be.draft_vocab_sizes()
        if draft_vocab not in cover:
            raise KnapSpecError(f"draft_vocab {draft_vocab}: the backend's reduced heads are "
                                f"{sorted(cover) or 'none'}")
        heads.append(int(draft_vocab))
    plans = [(np.zeros(be.layout.n_blocks, bool), 0, 1.0, 0)]
    plans += [(m, d, a, k) for k in heads for m, a in zip(masks, alphas, strict=True)
              for d in draft_lengths]
    ctx = len(prompt.ids)
    for mask, d, a, k in plans:
        if progress:
            progress(f"sweep ctx={ctx} skip={int(mask.sum())} d={d} K={k or 'full'}")
        if d == 0:
            planner = make_planner("ar", be.layout, cost_model)
            predicted = 1.0 / cost_model.full_step_seconds(be.layout.n_layers, ctx, 1)
        else:
            # the head's coverage scales the mask's acceptance; no confidence stop
            knobs = DraftKnobs((DraftHead(k, None, be.draft_vocab_sizes()[k]) if k
                                else FULL_HEAD,))
            a = a * knobs.heads[0].coverage
            planner = StaticPlanner(be.layout, cost_model, mask, alpha=a, draft_length=d)
            planner.knobs = DraftKnobs((dataclasses.replace(knobs.heads[0], coverage=1.0),))
            predicted = select_plan(mask[None], [sim_alpha(a)], cost_model, ctx, [d],
                                    force=True, knobs=planner.knobs).tokens_per_second
        dec = SpeculativeDecoder(be, planner, simulator=simulator)
        # untimed warm-up: a backend's one-off mask switch (llama.cpp: loading the draft)
        # is not part of the steady-state speed this point predicts
        dec.generate(prompt.ids, dataclasses.replace(config, max_new_tokens=8))
        res = dec.generate(prompt.ids, config)
        points.append({
            "context": ctx, "attn_skipped": int(mask[0::2].sum()),
            "mlp_skipped": int(mask[1::2].sum()), "draft_length": d, "draft_vocab": k,
            "predicted_alpha": a, "measured_alpha": res.acceptance_rate if d else 1.0,
            "prior_alpha": additive_alpha(prior[mask]) if d else 1.0,
            "predicted_tps": predicted, "measured_tps": res.tokens_per_second,
            "simulated_alpha": sim_alpha(a) if d and simulator is not None else None,
            "timing_only": res.timing_only, "timing_only_reason": res.timing_only_reason,
            "simulated_acceptance": res.simulated_acceptance,
        })
    return points


def forward_alphas(
    backend: Backend, ids: Sequence[int], masks: Sequence[np.ndarray], window: int
) -> list[float]:
    """Top-1 agreement of each mask's draft with the full model on the last ``window``
    tokens of ``ids``, measured through ``forward`` alone (any backend): the draft runs over
    the window with the full model's cache of everything before it."""
    start = max(1, len(ids) - window)
    backend.reset()
    backend.prefill(ids)
    backend.rollback(start)
    full = backend.forward(ids[start:], None).argmax(axis=-1)  # [window]
    out = []
    for mask in masks:
        backend.rollback(start)
        draft = backend.forward(ids[start:], mask).argmax(axis=-1)  # [window]
        out.append(float(np.mean(draft == full)))
    backend.rollback(start)
    return out


def pearson(points: Sequence[dict[str, Any]]) -> float:
    x = np.array([p["predicted_tps"] for p in points])
    y = np.array([p["measured_tps"] for p in points])
    return float(np.corrcoef(x, y)[0, 1]) if len(points) > 1 else float("nan")
