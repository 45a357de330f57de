"""What self-speculative decoding buys on the device this runs on: one command, one folder.

For ``random:smollm2-135m``, ``random:qwen2.5-1.5b`` and ``random:llama-3.1-8b`` (the
built-in shapes with seeded random weights, built on the device: no download) in bfloat16,
at contexts 1K, 8K and 32K, it measures:

* AR tokens/s: plain greedy decoding (``ar``), eager and, when the ``torch-compile``
  backend works on the device, compiled (a second phase, after every eager figure, so a
  slow compilation costs only the compiled column);
* verification cost: one full-model forward of ``k = 1..9`` tokens at the context (device
  timer: CUDA events after a synchronize), relative to ``k = 1``;
* the profile (``knapspec.backends.profiling.profile_backend``), saved as
  ``profile-<model>.json``;
* a forced-plan sweep with simulated acceptance (``knapspec.benchmarking.sweep``; every
  round's accepted drafts drawn at ``--sweep-acceptance``, fixed by default because the
  agreement of random weights means nothing) and the Pearson r of predicted against
  measured tokens/s;
* knapspec's chosen plan (the ``knapspec plan`` API, ``AdditivePlanner.for_model_spec``, on
  the measured profile): its predicted speedup and the speedup measured with simulated
  acceptance at the plan's predicted acceptance and at 0.9x it;
* beside it the roofline projection (the same API on ``RooflineCostModel`` of the
  hardware: ``--hardware``, else guessed from the device name).

Writes ``DIR/device_check.json`` (every key present; a skipped part is ``null`` with its
reason in ``skipped``) and ``DIR/device_check.md``.  Everything is timing-only: the weights
are random.  A global budget (``--budget-s``, default 450 s) skips what would not fit (each
model's eager parts get an equal share of 65% of it, the compiled column the rest), so the
run stays within 8 minutes on one H100/H200.  ``--quick`` runs the same code with tiny
shapes and contexts on the CPU (a few minutes on 2 cores; the test suite runs it).

Runs from a plain checkout with only torch, transformers, numpy and numba installed::

    PYTHONPATH=. python benchmarks/device_check.py --out results/h200
    PYTHONPATH=. python benchmarks/device_check.py --quick --out /tmp/dc --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a plain checkout: no install needed
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from knapspec.backends.profiling import profile_backend  # noqa: E402
from knapspec.backends.sources import random_source  # noqa: E402
from knapspec.backends.timing import median_seconds, timer_for  # noqa: E402
from knapspec.benchmarking import Prompt, pearson, sweep  # noqa: E402
from knapspec.config import KnapSpecConfig  # noqa: E402
from knapspec.costmodels import (  # noqa: E402
    RooflineCostModel,
    get_hardware_spec,
    get_model_spec,
    save_cost_model,
)
from knapspec.costmodels.specs import DecoderSpec  # noqa: E402
from knapspec.decoding import GenerationConfig, SpeculativeDecoder  # noqa: E402
from knapspec.errors import KnapSpecError  # noqa: E402
from knapspec.planner import AdditivePlanner, PlanContext  # noqa: E402
from knapspec.planner.factory import make_planner  # noqa: E402
from knapspec.planner.plan import select_plan  # noqa: E402
from knapspec.planner.planners import StaticPlanner  # noqa: E402
from knapspec.simulate import parse_simulate_acceptance  # noqa: E402

log = logging.getLogger("device_check")

MODELS = ("smollm2-135m", "qwen2.5-1.5b", "llama-3.1-8b")
CONTEXTS = (1024, 8192, 32768)
VERIFY_KS = tuple(range(1, 10))
#: what --quick shrinks every spec to (the spec's name keeps its architecture details)
QUICK_SHAPE = dict(n_layers=4, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                   ffn_size=128, vocab_size=512, max_context=1024)
QUICK_CONTEXTS = (64, 128, 256)
#: plans of a sweep: autoregressive + 6 skip counts x 4 draft lengths
SWEEP_PLANS = 25
#: keys every (model, context) entry of the JSON has
CONTEXT_KEYS = ("context", "ar_tok_s_eager", "ar_tok_s_compiled", "verify_ms_k1",
                "verify_cost_rel", "sweep", "chosen_plan", "roofline")
#: keys of the whole report
TOP_KEYS = ("device", "device_name", "dtype", "torch", "transformers", "quick",
            "timing_only", "timing_only_reason", "hardware", "new_tokens", "contexts",
            "sweep_acceptance", "compile_mode", "models", "skipped", "elapsed_s", "budget_s")


class Budget:
    """Seconds left of ``total``; ``allows(need)`` says whether a part of ``need`` fits."""

    def __init__(self, total: float) -> None:
        self.start, self.total = time.perf_counter(), float(total)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, need: float) -> bool:
        return self.total - self.elapsed() >= need


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON and table")
    p.add_argument("--quick", action="store_true", help="tiny shapes and contexts (CPU test)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--models", default=None, help=f"comma-separated specs (default: "
                   f"{','.join(MODELS)})")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens per timed generation (default 32; --quick: 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (5; 2)")
    p.add_argument("--sweep-acceptance", default="0.8",
                   help="simulated acceptance of the sweep (a value, predicted, 0.9xpredicted)")
    p.add_argument("--hardware", default=None,
                   help="hardware spec of the roofline projection (default: from the device)")
    p.add_argument("--compile-mode", default=None,
                   help="torch-compile mode (default: reduce-overhead on CUDA, else default)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled AR column")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds of measurement after which parts are skipped (default 450; "
                   "--quick: 3600, so that every part runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 32
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.quick else 450.0
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA device 0 when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KnapSpecError(f"unknown device {name!r} (expected auto, cpu or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KnapSpecError(f"{name} requested but CUDA is not available")
    return dev


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def guess_hardware(device: torch.device) -> str:
    """The built-in hardware spec closest to ``device`` (for the roofline projection)."""
    name = device_label(device).lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return key
    return "h100" if device.type == "cuda" else "cpu-small"


def specs(args: argparse.Namespace) -> list[DecoderSpec]:
    names = args.models.split(",") if args.models else list(MODELS)
    out = [get_model_spec(n.strip()) for n in names if n.strip()]
    if args.quick:
        out = [dataclasses.replace(s, **QUICK_SHAPE) for s in out]
    return out


def contexts_for(args: argparse.Namespace) -> list[int]:
    if args.contexts:
        return sorted(int(c) for c in args.contexts.split(","))
    return list(QUICK_CONTEXTS if args.quick else CONTEXTS)


# ----------------------------------------------------------------------------- building


def build(spec: DecoderSpec, args: argparse.Namespace, device: torch.device,
          max_context: int, compiled: bool = False) -> Any:
    """The eager (or compiled) torch backend over ``random:<spec>`` on ``device``."""
    from knapspec.backends.torch.loading import load_torch_model

    src = random_source(spec, seed=args.seed)
    loaded = load_torch_model(src, dtype=args.dtype, device=device)
    if not compiled:
        from knapspec.backends.torch.eager import TorchEagerBackend

        return TorchEagerBackend(loaded, dtype=args.dtype, max_context=max_context,
                                 device=device)
    from knapspec.backends.torch.compile import TorchCompileBackend

    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    # the fixed-shape steps a GPU captures as CUDA graphs; --quick runs them on the CPU
    # too (uncaptured), so the quick run takes the GPU's code path
    static = "on" if args.quick or device.type == "cuda" else "auto"
    return TorchCompileBackend(loaded, dtype=args.dtype, max_context=max_context,
                               compile_mode=mode, device=device, static_steps=static)


def release() -> None:
    """Free the device memory of backends the caller has dropped (``del``), before the next
    one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt_of(backend: Any, context: int, seed: int) -> Prompt:
    """``context`` random token ids (seeded): the timing does not depend on which."""
    rng = np.random.default_rng(seed + context)
    return Prompt(f"random-{context}", context,
                  rng.integers(0, backend.vocab_size, context).tolist())


# ----------------------------------------------------------------------------- measurements


def ar_tokens_per_second(backend: Any, cost_model: Any, prompt: Prompt, n_new: int) -> float:
    """Decode tokens/s of plain greedy decoding after ``prompt`` (wall clock; an untimed
    warm-up generation first, whose prefill the timed one reuses)."""
    dec = SpeculativeDecoder(backend, make_planner("ar", backend.layout, cost_model))
    config = GenerationConfig(max_new_tokens=n_new, stop_at_eos=False)
    dec.generate(prompt.ids, dataclasses.replace(config, max_new_tokens=2))
    return dec.generate(prompt.ids, config).tokens_per_second


def verify_costs(backend: Any, prompt: Prompt, repeats: int) -> tuple[float, dict[int, float]]:
    """Seconds of a full-model forward of 1 token at the prompt's context, and the cost of
    ``k = 1..9`` tokens relative to it (device timer, median of ``repeats``)."""
    backend.prefill(prompt.ids)
    c = len(prompt.ids) - 1  # the last prompt token is re-run, as the loop would
    timer = timer_for(backend)
    rng = np.random.default_rng(c)
    secs = {}
    for k in VERIFY_KS:
        ids = rng.integers(0, backend.vocab_size, k).tolist()

        def call(ids: list[int] = ids) -> None:
            backend.rollback(c)
            backend.forward(ids, None, all_logits=True)

        secs[k] = median_seconds(timer, call, repeats, warmup=1)
    backend.rollback(c)
    return secs[1], {k: secs[k] / secs[1] for k in VERIFY_KS}


def profile_contexts(contexts: list[int], quick: bool) -> list[int]:
    extra = (32,) if quick else (256, 4096, 16384)
    return sorted({*contexts, *(c for c in extra if c < max(contexts))})


def measure_profile(backend: Any, spec: DecoderSpec, contexts: list[int],
                    args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, Any]]:
    """Profile the backend at the contexts (and a few between), save it, summarise it."""
    t0 = time.perf_counter()
    model = profile_backend(backend, contexts=profile_contexts(contexts, args.quick),
                            repeats=args.repeats, progress=False, settle_seconds=0.2)
    path = out / f"profile-{spec.name}.json"
    save_cost_model(model, path)
    n_layers = backend.layout.n_layers
    summary = {
        "file": path.name,
        "seconds": round(time.perf_counter() - t0, 1),
        "timer": model.meta.get("timer"),
        "trusted": (model.meta.get("trust") or {}).get("trusted"),
        "full_step_max_rel_error": model.meta.get("full_step_max_rel_error"),
        "full_step_ms": {int(c): round(1e3 * model.full_step_seconds(n_layers, c, 1), 4)
                         for c in contexts},
    }
    return model, summary


def profile_estimate(backend: Any, contexts: list[int], args: argparse.Namespace) -> float:
    """Rough seconds the profile will take (``estimate_profile_seconds``; 0 if it fails)."""
    from knapspec.backends.profiling import estimate_profile_seconds

    try:
        return estimate_profile_seconds(backend, profile_contexts(contexts, args.quick),
                                        repeats=args.repeats)
    except Exception:  # an estimate only: the profile itself reports real failures
        log.exception("could not estimate the profile's duration")
        return 0.0


def plan_record(plan: Any) -> dict[str, Any]:
    return {"attn_skipped": plan.attn_skipped, "mlp_skipped": plan.mlp_skipped,
            "draft_length": plan.draft_length, "predicted_alpha": round(plan.alpha, 4),
            "predicted_speedup": round(plan.speedup, 4)}


def additive_planner(spec: DecoderSpec, cost_model: Any, layout: Any = None) -> AdditivePlanner:
    """The planner ``knapspec plan`` runs, with its defaults."""
    defaults = KnapSpecConfig().planner
    return AdditivePlanner.for_model_spec(
        spec, cost_model, layout=layout, max_draft_length=defaults.max_draft_length,
        resolution=512, method=defaults.method or "exact")


def chosen_plan(backend: Any, spec: DecoderSpec, cost_model: Any, prompt: Prompt,
                n_new: int, ar_tps: float) -> dict[str, Any]:
    """knapspec's plan on the measured profile; its speedup predicted and measured with
    simulated acceptance at the predicted acceptance and at 0.9x it."""
    ctx = len(prompt.ids)
    plan = additive_planner(spec, cost_model, backend.layout).plan(PlanContext(context=ctx))
    rec = plan_record(plan)
    if plan.draft_length == 0:
        rec.update(measured_speedup=1.0, predicted_speedup_0_9=1.0, measured_speedup_0_9=1.0,
                   note=plan.reason or "autoregressive")
        return rec
    config = GenerationConfig(max_new_tokens=n_new, stop_at_eos=False)
    for scale, suffix in ((1.0, ""), (0.9, "_0_9")):
        sim = parse_simulate_acceptance("predicted" if scale == 1.0 else "0.9xpredicted")
        alpha = sim.alpha_for(plan.alpha)
        pred = select_plan(plan.mask[None], [alpha], cost_model, ctx, [plan.draft_length],
                           force=True)
        planner = StaticPlanner(backend.layout, cost_model, plan.mask, alpha=plan.alpha,
                                draft_length=plan.draft_length)
        dec = SpeculativeDecoder(backend, planner, simulator=sim)
        dec.generate(prompt.ids, dataclasses.replace(config, max_new_tokens=4))  # warm-up
        res = dec.generate(prompt.ids, config)
        rec[f"predicted_speedup{suffix}"] = round(pred.speedup, 4)
        rec[f"measured_speedup{suffix}"] = round(res.tokens_per_second / ar_tps, 4)
        rec[f"measured_acceptance{suffix}"] = round(res.acceptance_rate, 4)
    return rec


def roofline_plan(spec: DecoderSpec, hardware: str, context: int) -> dict[str, Any]:
    """The ``knapspec plan --model-spec <spec> --hardware <hw>`` plan at ``context``."""
    cm = RooflineCostModel(spec, get_hardware_spec(hardware))
    plan = additive_planner(spec, cm).plan(PlanContext(context=min(context, spec.max_context)))
    return {"hardware": hardware, **plan_record(plan)}


def sweep_record(backend: Any, cost_model: Any, prompt: Prompt, args: argparse.Namespace,
                 ) -> dict[str, Any]:
    """Forced plans with simulated acceptance: how well the profile predicts tokens/s."""
    skippable = int(np.sum(backend.layout.skippable))
    counts = sorted({max(1, round(f * skippable)) for f in (0.125, 0.25, 0.375, 0.5, 0.625,
                                                           0.75)})
    sim = parse_simulate_acceptance(args.sweep_acceptance, seed=args.seed)
    points = sweep(backend, cost_model, prompt, args.new_tokens, skip_counts=counts,
                   draft_lengths=(1, 2, 3, 4), simulator=sim)
    keep = ("attn_skipped", "mlp_skipped", "draft_length", "simulated_alpha",
            "predicted_tps", "measured_tps")
    return {"acceptance": sim.spec, "n_points": len(points), "pearson": round(pearson(points), 4),
            "points": [{k: p.get(k) for k in keep} for p in points]}


# ----------------------------------------------------------------------------- driver


class Run:
    """The report being filled in, the budget, and where parts were skipped."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        import transformers

        self.args, self.device = args, device
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)  # profiles are written as they come
        self.budget = Budget(args.budget_s)
        self.contexts = contexts_for(args)
        self.report: dict[str, Any] = {
            "device": str(device), "device_name": device_label(device), "dtype": args.dtype,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "quick": bool(args.quick), "timing_only": True,
            "timing_only_reason": "random weights (random:<spec>): the timings are real, "
            "the tokens are not; acceptance is simulated",
            "hardware": args.hardware or guess_hardware(device),
            "new_tokens": args.new_tokens, "contexts": self.contexts,
            "sweep_acceptance": args.sweep_acceptance,
            "compile_mode": None if args.no_compile else (
                args.compile_mode or ("reduce-overhead" if device.type == "cuda"
                                      else "default")),
            "models": {}, "skipped": [], "elapsed_s": 0.0, "budget_s": args.budget_s,
        }

    def skip(self, what: str, why: str) -> None:
        log.warning("skipped %s: %s", what, why)
        self.report["skipped"].append(f"{what}: {why}")

    def part(self, what: str, deadline: float, fn: Any) -> Any:
        """``fn()``, or ``None`` (recorded) past ``deadline`` or when it raises."""
        if time.perf_counter() > deadline:
            self.skip(what, "time budget")
            return None
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # a part that fails is reported, the rest still runs
            log.exception("%s failed", what)
            self.skip(what, f"{type(exc).__name__}: {exc}")
            return None
        log.info("%s: %.1f s", what, time.perf_counter() - t0)
        return value

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "device_check.json").write_text(json.dumps(self.report, indent=1) + "\n")
        (self.out / "device_check.md").write_text(markdown(self.report) + "\n")


def max_context_for(contexts: list[int]) -> int:
    return max(contexts) + 64  # room for the verified and drafted tokens


def eager_model(run: Run, spec: DecoderSpec, deadline: float) -> None:
    """Every eager measurement of one model, within ``deadline`` (perf_counter seconds)."""
    args, name = run.args, spec.name
    rec: dict[str, Any] = {"spec": name, "parameters": spec.n_layers * (
        spec.attention_params + spec.mlp_params) + spec.head_params * (
        1 if spec.tied_embeddings else 2), "build_seconds": None, "peak_memory_gib": None,
        "profile": None, "contexts": [dict.fromkeys(CONTEXT_KEYS) for _ in run.contexts]}
    run.report["models"][name] = rec
    for entry, c in zip(rec["contexts"], run.contexts, strict=True):
        entry.update(context=c, roofline=roofline_plan(spec, run.report["hardware"], c))
    t0 = time.perf_counter()
    be = run.part(f"{name}: build", deadline,
                  lambda: build(spec, args, run.device, max_context_for(run.contexts)))
    if be is None:
        return
    rec["build_seconds"] = round(time.perf_counter() - t0, 1)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    measure_eager(run, spec, be, rec, deadline)
    if run.device.type == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    del be
    release()


def measure_eager(run: Run, spec: DecoderSpec, be: Any, rec: dict[str, Any],
                  deadline: float) -> None:
    """The eager parts of ``eager_model`` on its backend ``be``, filling ``rec``."""
    args, name = run.args, spec.name
    ref = RooflineCostModel(spec, get_hardware_spec(run.report["hardware"]))  # AR needs one
    prompts = {c: prompt_of(be, c, args.seed) for c in run.contexts}
    for entry, c in zip(rec["contexts"], run.contexts, strict=True):
        entry["ar_tok_s_eager"] = run.part(f"{name} @ {c}: AR eager", deadline, lambda c=c:
                                           ar_tokens_per_second(be, ref, prompts[c],
                                                                args.new_tokens))
        v = run.part(f"{name} @ {c}: verify costs", deadline,
                     lambda c=c: verify_costs(be, prompts[c], args.repeats))
        if v is not None:
            entry["verify_ms_k1"] = round(1e3 * v[0], 4)
            entry["verify_cost_rel"] = {str(k): round(r, 4) for k, r in v[1].items()}
    prof = run.part(f"{name}: profile", deadline - profile_estimate(be, run.contexts, args),
                    lambda: measure_profile(be, spec, run.contexts, args, run.out))
    if prof is not None:
        cost_model, rec["profile"] = prof
        for entry, c in zip(rec["contexts"], run.contexts, strict=True):
            ar = entry["ar_tok_s_eager"]
            if ar:  # two timed generations and their warm-ups, some slack
                need = 2 * (args.new_tokens + 6) / ar * 1.5
                entry["chosen_plan"] = run.part(
                    f"{name} @ {c}: chosen plan", deadline - need,
                    lambda c=c, ar=ar: chosen_plan(be, spec, cost_model, prompts[c],
                                                   args.new_tokens, ar))
        for entry, c in zip(rec["contexts"], run.contexts, strict=True):
            ar = entry["ar_tok_s_eager"] or 1.0
            need = SWEEP_PLANS * (args.new_tokens + 8) / ar * 1.2  # drafting is rarely slower
            entry["sweep"] = run.part(f"{name} @ {c}: sweep", deadline - need,
                                      lambda c=c: sweep_record(be, cost_model, prompts[c], args))


def compiled_model(run: Run, spec: DecoderSpec, deadline: float) -> None:
    """AR tokens/s of the ``torch-compile`` backend at every context (compile time apart)."""
    rec, name = run.report["models"][spec.name], spec.name
    t0 = time.perf_counter()
    be = run.part(f"{name}: compiled build", deadline, lambda: build(
        spec, run.args, run.device, max_context_for(run.contexts), compiled=True))
    if be is None:
        return
    rec["compile_seconds"] = round(time.perf_counter() - t0, 1)
    rec["compile_warmup_seconds"] = getattr(be, "warmup_seconds", None)
    measure_compiled(run, spec, be, rec, deadline)
    del be
    release()


def measure_compiled(run: Run, spec: DecoderSpec, be: Any, rec: dict[str, Any],
                     deadline: float) -> None:
    """``compiled_model``'s AR figures on its backend ``be``, filling ``rec``."""
    ref = RooflineCostModel(spec, get_hardware_spec(run.report["hardware"]))
    for entry, c in zip(rec["contexts"], run.contexts, strict=True):
        entry["ar_tok_s_compiled"] = run.part(
            f"{spec.name} @ {c}: AR compiled", deadline, lambda c=c: ar_tokens_per_second(
                be, ref, prompt_of(be, c, run.args.seed), run.args.new_tokens))
    recompiles = getattr(be, "recompilations", None)
    rec["compile_recompilations"] = recompiles() if callable(recompiles) else None
    # what the compiled steps ran as: CUDA graphs (fixed-shape steps over the whole
    # preallocated cache of ``static_cache_tokens``: attention at a short context reads that
    # much, so the 1K row is pessimistic for graphs) and CPU prepacked weights
    info = be.describe() if hasattr(be, "describe") else {}
    rec["compiled_steps"] = {k: info.get(k) for k in (
        "inductor_mode", "static_steps", "cuda_graphs_held", "cuda_graphs_captured",
        "cuda_graph_mib", "cuda_graph_limit", "prepack", "prepacked_weights", "prepacked_mib")}
    rec["compiled_steps"]["static_cache_tokens"] = max_context_for(run.contexts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("knapspec", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run = Run(args, resolve_device(args.device))
        get_hardware_spec(run.report["hardware"])  # a bad --hardware fails here, in one line
        models = specs(args)
    except KnapSpecError as exc:
        sys.stderr.write(f"device_check: error: {exc}\n")
        return 2
    share = 0.65 if not args.no_compile else 1.0  # of the budget for the eager figures
    for i, spec in enumerate(models):
        left = run.budget.total * share - run.budget.elapsed()
        eager_model(run, spec, time.perf_counter() + left / (len(models) - i))
        run.save()
    for spec in models:
        if args.no_compile:
            run.skip(f"{spec.name}: AR compiled", "--no-compile")
            continue
        end = run.budget.start + run.budget.total
        compiled_model(run, spec, end if run.budget.allows(30) else time.perf_counter() - 1)
        run.save()
    run.save()
    log.info("wrote %s and %s in %.0f s", run.out / "device_check.json",
             run.out / "device_check.md", run.budget.elapsed())
    return 0


# ----------------------------------------------------------------------------- table


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _plan(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    return f"{p['attn_skipped']}/{p['mlp_skipped']}/{p['draft_length']}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one row per (model, context), then the verification costs."""
    hw = report["hardware"]
    lines = [
        f"Device check on {report['device_name']} ({report['device']}), {report['dtype']}, "
        f"torch {report['torch']}, transformers {report['transformers']}"
        + (", QUICK (tiny shapes)" if report["quick"] else "") + ".",
        f"TIMING ONLY: {report['timing_only_reason']}. {report['new_tokens']} new tokens per "
        f"generation; sweep at simulated acceptance {report['sweep_acceptance']}; "
        f"{report['elapsed_s']} s.",
        "",
        "| model | context | AR tok/s eager | AR tok/s compiled | verify 1 tok ms | 2/1 | 5/1 "
        "| 9/1 | sweep r (plans) | plan attn/mlp/d | alpha | speedup pred / meas | at 0.9 "
        f"alpha pred / meas | roofline {hw} attn/mlp/d | roofline speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for name, rec in report["models"].items():
        for e in rec["contexts"]:
            v, s, p, r = (e["verify_cost_rel"] or {}), e["sweep"], e["chosen_plan"], e[
                "roofline"]
            lines.append(
                f"| {name} | {e['context']} | {_f(e['ar_tok_s_eager'], '{:.1f}')} | "
                f"{_f(e['ar_tok_s_compiled'], '{:.1f}')} | {_f(e['verify_ms_k1'], '{:.3f}')} "
                f"| {_f(v.get('2'))} | {_f(v.get('5'))} | {_f(v.get('9'))} | "
                f"{_f(s and s['pearson'], '{:.3f}')} ({s['n_points'] if s else 0}) | "
                f"{_plan(p)} | {_f(p and p['predicted_alpha'])} | "
                f"{_f(p and p['predicted_speedup'])} / {_f(p and p.get('measured_speedup'))} | "
                f"{_f(p and p.get('predicted_speedup_0_9'))} / "
                f"{_f(p and p.get('measured_speedup_0_9'))} | {_plan(r)} | "
                f"{_f(r and r['predicted_speedup'])} |")
    lines += ["", "Verification of k tokens relative to one (full model, device timer):", "",
              "| model | context | " + " | ".join(f"k={k}" for k in VERIFY_KS) + " |",
              "|---|---:|" + "---:|" * len(VERIFY_KS)]
    for name, rec in report["models"].items():
        for e in rec["contexts"]:
            v = e["verify_cost_rel"] or {}
            lines.append(f"| {name} | {e['context']} | "
                         + " | ".join(_f(v.get(str(k))) for k in VERIFY_KS) + " |")
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(report["skipped"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
