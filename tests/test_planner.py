"""TPT objective, plan selection, proxies and the backend-free planners."""

from __future__ import annotations

import numpy as np
import pytest
from fake_backend import linear_cost_model
from hypothesis import given, settings
from hypothesis import strategies as st

from knapspec.blocks import BlockLayout, default_pinned, describe_mask
from knapspec.costmodels import (
    RooflineCostModel,
    get_hardware_spec,
    get_model_spec,
)
from knapspec.errors import KnapSpecError
from knapspec.planner import (
    AdditivePlanner,
    AutoregressivePlanner,
    CosineProxy,
    PlanContext,
    StaticPlanner,
    Top1Proxy,
    TotalVariationProxy,
    default_block_scores,
    expected_tokens,
    load_block_scores,
    make_proxy,
    select_plan,
)
from knapspec.planner.fidelity import default_scores_for_spec

alphas = st.floats(0.0, 1.0, allow_nan=False)
lengths = st.integers(0, 32)


# ------------------------------------------------------------------ objective
@given(alphas, lengths)
def test_expected_tokens_bounds(a, d):
    e = expected_tokens(a, d)
    assert e >= 1.0 - 1e-12
    assert e <= d + 1 + 1e-9


@given(alphas, alphas, lengths)
def test_expected_tokens_increase_with_alpha(a, b, d):
    lo, hi = sorted((a, b))
    assert expected_tokens(lo, d) <= expected_tokens(hi, d) + 1e-12


@given(alphas, lengths)
def test_expected_tokens_increase_with_draft_length(a, d):
    assert expected_tokens(a, d) <= expected_tokens(a, d + 1) + 1e-12


@given(lengths)
def test_expected_tokens_all_accepted(d):
    assert expected_tokens(1.0, d) == d + 1


def test_expected_tokens_closed_form():
    a, d = 0.7, 4
    assert expected_tokens(a, d) == pytest.approx(sum(a**i for i in range(d + 1)))
    assert expected_tokens(0.0, 5) == 1.0
    with pytest.raises(KnapSpecError):
        expected_tokens(1.5, 2)
    with pytest.raises(KnapSpecError):
        expected_tokens(0.5, -1)


# ------------------------------------------------------------------ block model
def test_block_layout_defaults_and_masks():
    lay = BlockLayout(6)
    assert lay.pinned == default_pinned(6) == (0, 1, 10, 11)
    assert lay.n_blocks == 12
    assert lay.skippable.sum() == 8
    mask = lay.mask_from_blocks([2, 5])
    assert describe_mask(mask) == "attn[1] mlp[2]"
    with pytest.raises(KnapSpecError, match="pinned"):
        lay.mask_from_blocks([11])
    with pytest.raises(KnapSpecError, match="shape"):
        lay.validate_mask(np.zeros(5, bool))
    with pytest.raises(KnapSpecError, match="out of range"):
        BlockLayout(3, pinned=(7,))
    assert BlockLayout.unpinned(3).skippable.all()


# ------------------------------------------------------------------ plan selection
masks_strategy = st.lists(st.lists(st.booleans(), min_size=8, max_size=8), min_size=0, max_size=6)


@settings(max_examples=60, deadline=None)
@given(masks_strategy, st.data(), st.integers(1, 8000), st.integers(1, 10))
def test_plan_never_predicted_slower_than_autoregressive(masks, data, ctx, dmax):
    cm = linear_cost_model()
    arr = np.array(masks, dtype=bool).reshape(-1, 8)
    a = data.draw(st.lists(alphas, min_size=len(arr), max_size=len(arr)))
    plan = select_plan(arr, a, cm, ctx, dmax)
    ar = 1.0 / cm.full_step_seconds(4, ctx, 1)
    assert plan.tokens_per_second >= ar * (1 - 1e-12)
    assert plan.speedup >= 1 - 1e-12
    if plan.draft_length:
        # the reported TPT is the objective evaluated at the chosen pair
        d = plan.draft_length
        draft = cm.step_seconds(plan.mask, ctx, 1)
        verify = cm.full_step_seconds(4, ctx, d + 1)
        assert plan.tokens_per_second == pytest.approx(
            expected_tokens(plan.alpha, d) / (d * draft + verify)
        )


def test_plan_prefers_the_better_candidate():
    cm = linear_cost_model()
    lay = BlockLayout(4)
    cheap = lay.mask_from_blocks([2, 3, 4, 5])
    slight = lay.mask_from_blocks([2, 3])
    plan = select_plan([cheap, slight], [0.95, 0.95], cm, 100, 6)
    assert np.array_equal(plan.mask, cheap)
    plan = select_plan([cheap, slight], [0.0, 0.99], cm, 100, 6)
    assert np.array_equal(plan.mask, slight)


def test_zero_acceptance_gives_autoregressive():
    lay = BlockLayout(4)
    plan = select_plan([lay.mask_from_blocks([2, 3])], [0.0], linear_cost_model(), 100, 8)
    assert plan.is_autoregressive and plan.speedup == pytest.approx(1.0)


def test_expensive_verification_makes_drafting_unprofitable():
    # verifying each extra token costs as much as a whole step: never worth drafting
    cm = linear_cost_model(head_per_token_s=5e-3, mlp_per_token_s=1e-3,
                           attn_per_new_token_s=4e-4, overhead_per_token_s=1e-3)
    lay = BlockLayout(4)
    plan = select_plan([lay.mask_from_blocks([2, 3, 4, 5])], [0.9], cm, 100, 8)
    assert plan.is_autoregressive


def test_switch_cost_amortised_over_remaining_tokens():
    cm = linear_cost_model()
    lay = BlockLayout(4)
    mask = lay.mask_from_blocks([2, 3, 4, 5])
    free = select_plan([mask], [0.9], cm, 100, 4, remaining_tokens=10,
                       switch_price=lambda m: 0.0)
    assert not free.is_autoregressive
    costly = select_plan([mask], [0.9], cm, 100, 4, remaining_tokens=10,
                         switch_price=lambda m: 10.0)
    assert costly.is_autoregressive


def test_forced_static_plan():
    cm = linear_cost_model()
    lay = BlockLayout(4)
    mask = lay.mask_from_blocks([2])
    plan = StaticPlanner(lay, cm, mask, alpha=0.0, draft_length=3).plan(PlanContext(100))
    assert plan.draft_length == 3 and np.array_equal(plan.mask, mask)
    assert plan.speedup < 1  # forced even though it loses
    free = StaticPlanner(lay, cm, mask, alpha=0.0).plan(PlanContext(100))
    assert free.is_autoregressive
    assert AutoregressivePlanner(lay, cm).plan(PlanContext(5)).is_autoregressive


# ------------------------------------------------------------------ proxies
def test_cosine_proxy_mapping_is_monotone_and_bounded():
    p = CosineProxy()
    c = np.linspace(-1, 1, 201)
    a = p.alpha_from_cosine(c)
    assert np.all(np.diff(a) >= -1e-12)
    assert a[-1] == 1.0 and 0 <= a[0] < 0.2
    h = np.random.default_rng(0).normal(size=(5, 16))
    assert p.alpha(h, h) == 1.0


def test_cosine_proxy_fit_recovers_parameters():
    true = CosineProxy(kappa=0.4, beta=1.5)
    c = np.linspace(0.5, 0.999, 400)
    fitted = CosineProxy.fit(c, true.alpha_from_cosine(c))
    assert fitted.alpha_from_cosine(0.95) == pytest.approx(true.alpha_from_cosine(0.95), abs=0.02)


def test_top1_and_tv_proxies():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(50, 10))
    assert Top1Proxy().alpha(t, t) == 1.0
    assert TotalVariationProxy().alpha(t, t) == pytest.approx(1.0)
    d = t + rng.normal(size=t.shape) * 3
    tv = TotalVariationProxy().alpha(d, t)
    assert 0 < tv < 1
    # 1 - TV is the exact acceptance of speculative sampling: Monte Carlo check on one row
    p = np.exp(t[0]) / np.exp(t[0]).sum()
    q = np.exp(d[0]) / np.exp(d[0]).sum()
    x = rng.choice(10, size=200_000, p=q)
    accept = rng.random(x.size) < np.minimum(1, p[x] / q[x])
    assert accept.mean() == pytest.approx(TotalVariationProxy().alpha(d[:1], t[:1]), abs=0.01)
    with pytest.raises(KnapSpecError, match="shapes differ"):
        Top1Proxy().alpha(t, t[:3])
    with pytest.raises(KnapSpecError, match="unknown acceptance proxy"):
        make_proxy("nope")


# ------------------------------------------------------------------ additive planner
def test_default_profile_shape_and_resampling():
    s30 = default_block_scores(30)
    assert s30.shape == (60,) and (s30 >= 0).all()
    s32 = default_block_scores(32)
    assert s32.shape == (64,)
    assert s32.sum() == pytest.approx(s30.sum(), rel=0.15)


def test_scores_file_errors(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(KnapSpecError, match="not valid JSON"):
        load_block_scores(bad, 4)
    bad.write_text('{"attention": [1, 2], "mlp": [1]}')
    with pytest.raises(KnapSpecError, match="equal-length"):
        load_block_scores(bad, 4)
    bad.write_text('{"scores": [0.1, -1]}')
    with pytest.raises(KnapSpecError, match="non-negative"):
        load_block_scores(bad, 4)
    with pytest.raises(KnapSpecError, match="not found"):
        load_block_scores(tmp_path / "missing.json", 4)
    good = tmp_path / "g.json"
    good.write_text('{"scores": [0.1, 0.2, 0.3, 0.4]}')
    assert load_block_scores(good, 2).tolist() == [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("method", ["exact", "parallel", "greedy"])
def test_additive_planner_frontier_and_choice(method):
    spec = get_model_spec("llama-3.1-8b")
    cm = RooflineCostModel(spec, get_hardware_spec("h100"))
    lay = BlockLayout(spec.n_layers)
    planner = AdditivePlanner(lay, cm, default_block_scores(spec.n_layers), method=method)
    masks, _ = planner.candidates(4096)
    assert len(masks) > 3
    assert not (masks[:, list(lay.pinned)]).any()
    plan = planner.plan(PlanContext(4096))
    assert plan.speedup >= 1.0
    assert any(np.array_equal(plan.mask, m) for m in masks) or plan.is_autoregressive


def test_long_context_skips_more_attention():
    """The paper's central effect, from a cost model alone."""
    spec = get_model_spec("llama-3.1-8b")
    cm = RooflineCostModel(spec, get_hardware_spec("h100"))
    lay = BlockLayout(spec.n_layers)
    scores, p = default_scores_for_spec(spec.name, spec.n_layers)
    planner = AdditivePlanner(lay, cm, scores, compounding=p)
    short = planner.plan(PlanContext(1024))
    long = planner.plan(PlanContext(131072))
    assert long.attn_skipped > short.attn_skipped
    share = lambda p: p.attn_skipped / max(p.attn_skipped + p.mlp_skipped, 1)  # noqa: E731
    assert share(long) > share(short)
    assert short.speedup >= 1 and long.speedup >= 1


def test_additive_planner_rejects_bad_scores():
    lay = BlockLayout(4)
    with pytest.raises(KnapSpecError, match="shape"):
        AdditivePlanner(lay, linear_cost_model(), np.zeros(3))
    with pytest.raises(KnapSpecError, match="NaN"):
        AdditivePlanner(lay, linear_cost_model(), np.full(8, np.nan))


def _llama_h100_planner(**kw) -> AdditivePlanner:
    spec = get_model_spec("llama-3.1-8b")
    cm = RooflineCostModel(spec, get_hardware_spec("h100"))
    return AdditivePlanner(BlockLayout(spec.n_layers), cm, default_block_scores(spec.n_layers),
                           **kw)


def _quantised_weights(planner: AdditivePlanner, context: int) -> np.ndarray:
    idx = np.flatnonzero(planner.layout.skippable)
    costs = planner.cost_model.block_costs(planner.layout.n_layers, context, 1)[idx]
    return np.rint(costs * (planner.resolution / costs.sum())).astype(np.int64)


def test_additive_planner_solves_once_while_quantised_weights_stay_the_same(monkeypatch):
    import knapspec.planner.planners as planners_module

    calls = []
    real = planners_module.knapsack_frontier

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(planners_module, "knapsack_frontier", counting)
    planner = _llama_h100_planner()
    contexts = [4096, 4097, 4100]
    assert all(np.array_equal(_quantised_weights(planner, c), _quantised_weights(planner, 4096))
               for c in contexts)  # the premise: one set of integer weights
    plans = [planner.plan(PlanContext(c)) for c in contexts]
    assert len(calls) == 1
    assert len({p.mask.tobytes() for p in plans}) == 1
    planner.update_scores(planner.scores * 0.5)  # new scores: a new frontier
    planner.plan(PlanContext(4096))
    assert len(calls) == 2
    far = 131072  # long context: attention weighs more, the weights change
    assert not np.array_equal(_quantised_weights(planner, far), _quantised_weights(planner, 4096))
    planner.plan(PlanContext(far))
    assert len(calls) == 3


_WARM_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import knapspec.runtime as rt
from fake_backend import FakeBackend, fake_cost_model
from knapspec.config import KnapSpecConfig
from knapspec.planner import _kernels
from knapspec.planner.oracle_planners import KnapSpecPlanner

def no_plan(self, ctx):
    raise AssertionError("a plan ran while building the session")

KnapSpecPlanner.plan = no_plan
rt.create_backend = lambda name, model=None, **kw: FakeBackend()
rt.backend_cost_model = lambda be, *args, **kw: fake_cost_model()
kernels = (_kernels.dp_exact, _kernels.frontier_masks)
assert not any(k.signatures for k in kernels), "kernels compiled before the session"
if {entry!r} == "build_session":
    rt.build_session(strategy="knapspec")
else:
    config = KnapSpecConfig.from_dict({{"planner": {{"strategy": "knapspec"}}}})
    rt.build_session_from_config(config)
assert all(k.signatures for k in kernels), [k.signatures for k in kernels]
print("warm")
"""


@pytest.mark.parametrize("entry", ["build_session", "build_session_from_config"])
def test_building_a_session_loads_the_planner_kernels_before_any_plan(entry):
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    script = _WARM_SCRIPT.format(tests=tests, entry=entry)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "warm"


# ------------------------------------------------------------------ docs and CLI agree
def _doc_blocks(relative: str) -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / relative).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _claimed_prints(block: str) -> list[str]:
    """The outputs a block's ``print(...)  # expected`` lines claim, in order."""
    import re

    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", block, re.M)]


def _readme_planner_block() -> str:
    return next(b for b in _doc_blocks("README.md") if "AdditivePlanner" in b)


@pytest.mark.parametrize("where", ["README.md", "docs/planner.md"])
def test_planner_examples_print_what_they_claim(where, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [_readme_planner_block()] if where == "README.md" else _doc_blocks(where)
    claimed = [c for b in blocks for c in _claimed_prints(b)]
    assert claimed, f"{where}: no print with its claimed output"
    for block in blocks:
        exec(compile(block, where, "exec"), {})
    printed = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert printed == claimed


def test_readme_planner_snippet_gives_the_plan_the_cli_prints(capsys):
    from knapspec.cli import main

    exec(compile(_readme_planner_block(), "README.md", "exec"), {})
    d, attn, mlp, speedup = capsys.readouterr().out.split()
    assert main(["plan", "--model-spec", "llama-3.1-8b", "--hardware", "h100",
                 "--context", "32k", "--json"]) == 0
    import json

    (row,) = json.loads(capsys.readouterr().out)
    assert (row["draft_length"], row["attn_skipped"], row["mlp_skipped"]) == (
        int(d), int(attn), int(mlp))
    assert round(row["predicted_speedup"], 2) == float(speedup)
    assert row["draft_length"] > 0  # the snippet must show a plan that drafts


def test_plan_help_names_the_planner_its_json_reports(capsys):
    from knapspec.cli import main

    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert main(["plan", "--model-spec", "llama-3.1-8b", "--context", "4k", "--json"]) == 0
    import json

    (row,) = json.loads(capsys.readouterr().out)
    assert row["strategy"] == "additive"
    assert "the plan of the additive planner" in help_text
    assert "KnapSpec chooses" not in help_text
