"""Reduced-vocabulary draft heads: token rankings, the ``knapspec vocab`` command, the
torch backends' reduced heads (lossless greedy, exact sampling, the compiled and prepacked
path), their prices in the profile, and the errors when a head is not offered.

Tiny random models (``test_torch_backend``) carry a hand-made ranking; the ``slow`` tests
use SmolLM2 and the ranking shipped for its tokenizer.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from knapspec.cli import main
from knapspec.costmodels import LinearCostModel, TableCostModel
from knapspec.costmodels.io import cost_model_from_json, cost_model_to_json, load_cost_model
from knapspec.draft_vocab import (
    VocabRanking,
    count_tokens,
    coverage,
    default_sizes,
    measure_ranking,
    rank_ids,
    read_heldout,
    save_ranking,
    shipped_rankings,
    tokenizer_digest,
)
from knapspec.errors import KnapSpecError
from knapspec.sampling import SamplingParams, probabilities

# drafting pays under this model (cheap verification): forced plans are what they say
DRAFT_FRIENDLY = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4,
                                 head_s=2e-3, overhead_s=1e-3)


class CharTokenizer:
    """A character-level tokenizer with a vocabulary: ids 0..25 for 'a'..'z', 26 for
    anything else; enough of the ``transformers`` call interface for ``measure_ranking``."""

    def get_vocab(self) -> dict[str, int]:
        return {**{chr(97 + i): i for i in range(26)}, "?": 26}

    def _ids(self, text: str) -> list[int]:
        return [ord(c) - 97 if "a" <= c <= "z" else 26 for c in text]

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True
                 ) -> dict[str, list[int]]:
        assert add_special_tokens is False and verbose is False
        return {"input_ids": self._ids(text)}


# ----------------------------------------------------------------------------- rankings


def test_ids_rank_by_count_then_id_and_unseen_ids_come_last():
    counts = np.array([0, 5, 2, 5, 0, 1])
    assert rank_ids(counts).tolist() == [1, 3, 2, 5, 0, 4]
    assert default_sizes(49152) == [3072, 6144, 12288, 24576]
    assert default_sizes(1024) == [64, 128, 256, 512]
    assert default_sizes(100) == [6, 12, 25, 50]


def test_coverage_is_the_share_of_predictions_in_the_top_k():
    ids = np.array([3, 1, 0, 2])
    cov = coverage(ids, np.array([3, 3, 1, 2]), [1, 2, 3])
    assert cov == {1: 0.5, 2: 0.75, 3: 0.75}
    with pytest.raises(KnapSpecError, match="no held-out predictions"):
        coverage(ids, np.array([], dtype=int), [1])


def test_measure_ranking_counts_text_and_scores_heldout_predictions(tmp_path):
    tok = CharTokenizer()
    counts = count_tokens(tok, ["aaab\n\nbc", "zz a"], 27)
    assert counts[0] == 4 and counts[1] == 2 and counts[25] == 2 and counts[26] == 3
    seen = []

    def predict(ids):  # the "model" predicts each token itself, teacher-forced
        seen.append(list(ids))
        return np.array(ids)

    r = measure_ranking(tok, 27, ["aaab\n\nbc", "zz a"], ["abcq", "x"], predict, sizes=[1, 3],
                        max_len=3, meta={"command": "test"})
    assert seen == [[0, 1, 2]]  # cut to max_len; a one-token document is not scored
    assert r.ids[:5].tolist() == [0, 26, 1, 25, 2]  # a x4, ? x3, b x2, z x2 (by id), c
    # predictions scored: the first two (the last one is past the document): a, b
    assert r.coverage == {1: 0.5, 3: 1.0}
    assert r.tokenizer == tokenizer_digest(tok)
    assert r.meta["tokens_counted"] == 12 and r.meta["heldout_predictions"] == 2
    assert r.meta["command"] == "test" and r.meta["heldout_documents"] == 1
    path = save_ranking(r, tmp_path / "r.json")
    again = VocabRanking.from_json(json.loads(path.read_text()), "r.json")
    assert again == r and again.meta == r.meta
    with pytest.raises(KnapSpecError, match=r"sizes must lie in 1\.\.26"):
        measure_ranking(tok, 27, ["ab"], ["ab"], predict, sizes=[27])
    with pytest.raises(KnapSpecError, match="no tokens to count"):
        measure_ranking(tok, 27, [""], ["ab"], predict)
    with pytest.raises(KnapSpecError, match="outside the model's 20 ids"):
        measure_ranking(tok, 20, ["zz"], ["ab"], predict, sizes=[2])


def test_bad_rankings_are_refused():
    ids = np.arange(8)
    with pytest.raises(KnapSpecError, match="every token id"):
        VocabRanking(np.array([0, 1, 1, 3]), {}, "t")
    with pytest.raises(KnapSpecError, match="every token id"):
        VocabRanking(np.array([1, 2, 3]), {}, "t")
    with pytest.raises(KnapSpecError, match="bad coverage entry 8"):
        VocabRanking(ids, {8: 0.5}, "t")
    with pytest.raises(KnapSpecError, match="bad coverage entry 2"):
        VocabRanking(ids, {2: 1.5}, "t")
    with pytest.raises(KnapSpecError, match="not a knapspec vocabulary ranking"):
        VocabRanking.from_json({"ids": [0]}, "x.json")
    with pytest.raises(KnapSpecError, match=r"draft_vocab must lie in 1\.\.8"):
        VocabRanking(ids, {4: 0.5}, "t").top(9)


def test_heldout_documents_from_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one document\n\nstill one")
    (tmp_path / "b.jsonl").write_text(
        '{"turns": ["first", "second"]}\n\n{"text": "third"}\n{"turns": "fourth"}\n')
    assert read_heldout(tmp_path / "a.txt") == ["one document\n\nstill one"]
    assert read_heldout(tmp_path / "b.jsonl") == ["first\n\nsecond", "third", "fourth"]
    (tmp_path / "c.jsonl").write_text('{"turns": ["ok"]}\n{"turns": [1]}\n')
    with pytest.raises(KnapSpecError, match=r"c.jsonl:2: expected an object with 'turns'"):
        read_heldout(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text("{oops\n")
    with pytest.raises(KnapSpecError, match=r"d.jsonl:1: not JSON"):
        read_heldout(tmp_path / "d.jsonl")


# ----------------------------------------------------------------------------- the command


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sizes", "64,x"], "--sizes: not an integer: 'x'"),
        (["--sizes", "0"], "--sizes: head sizes must be >= 1"),
        (["--max-len", "1"], "--max-len must be >= 2"),
        (["--heldout", "/nonexistent/h.txt"], "no such file: /nonexistent/h.txt"),
    ],
)
def test_vocab_command_bad_input_is_one_line(tmp_path, capsys, extra, message):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    args = ["vocab", "--text", str(text), "--heldout", str(text), "--out",
            str(tmp_path / "r.json"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.json").exists()


def test_vocab_command_refuses_an_unwritable_output_before_loading(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert main(["vocab", "--text", str(text), "--heldout", str(text), "--out",
                 str(tmp_path / "no" / "r.json")]) == 2
    assert "output directory does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_vocab_command_on_a_tiny_text(smollm2, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It was a dark and stormy night; the rain fell in torrents.\n\n" * 3)
    held = tmp_path / "h.jsonl"
    held.write_text('{"turns": ["The rain fell all night, and the wind was dark."]}\n'
                    '{"turns": ["It was a night of rain."]}\n')
    out = tmp_path / "r.json"
    assert main(["vocab", "--text", str(text), "--heldout", str(held), "--sizes", "64,128",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "coverage" in printed and str(out) in printed
    r = VocabRanking.from_json(json.loads(out.read_text()), str(out))
    assert r.tokenizer == tokenizer_digest(smollm2.tokenizer)
    assert set(r.coverage) == {64, 128} and r.coverage[64] <= r.coverage[128]
    assert 0 < r.coverage[128] < 1  # some predictions lie in the text's ids, not all
    meta = r.meta
    assert meta["command"].startswith("knapspec vocab --text ")
    assert meta["text_files"][0]["path"] == str(text) and meta["heldout_documents"] == 2
    assert meta["tokens_counted"] > 30 and meta["heldout_predictions"] > 10
    seen = set(smollm2.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    assert set(r.ids[: meta["ids_seen"]].tolist()) == seen  # seen ids first, unseen after
    assert np.all(np.diff(r.ids[meta["ids_seen"]:]) > 0)  # unseen ids by id


# ----------------------------------------------------------------------------- cost models


def test_draft_heads_round_trip_through_cost_model_json(tmp_path):
    m = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4, head_s=2e-3,
                        overhead_s=1e-3)
    assert m.draft_head(0) == m.draft_head(64) == 2e-3  # V unknown: no saving predicted
    m.vocab_size = 256
    assert m.draft_head(64) == pytest.approx(5e-4)  # unmeasured: head(1) * K / V
    m.draft_heads = {64: 3e-4, 128: 1e-3}
    obj = cost_model_to_json(m)
    assert obj["draft_heads"] == {"64": 3e-4, "128": 1e-3} and obj["vocab_size"] == 256
    back = cost_model_from_json(json.loads(json.dumps(obj)))
    assert back.draft_heads == {64: 3e-4, 128: 1e-3} and back.vocab_size == 256
    assert back.draft_head(64) == 3e-4 and back.draft_head(0) == 2e-3
    for bad, message in (({"draft_heads": {"x": 1.0}}, "draft_heads: bad entry 'x'"),
                         ({"draft_heads": {"64": -1}}, "draft_heads: bad entry '64'"),
                         ({"draft_heads": [1]}, "'draft_heads' must be an object"),
                         ({"vocab_size": 0}, "vocab_size must be a positive integer")):
        with pytest.raises(KnapSpecError, match=message):
            cost_model_from_json({**obj, **bad})


# ----------------------------------------------------------------------------- torch heads

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_torch_backend import VOCAB, make_ids, skip_mask, tiny_model  # noqa: E402

from knapspec.backends.torch.eager import TorchEagerBackend  # noqa: E402


def with_ranking(be, ids, sizes=(32, 64)):
    """``be`` with a hand-made ranking ``ids`` ``[V]`` offering heads of ``sizes``."""
    be.vocab_ranking = VocabRanking(np.asarray(ids), {k: 0.5 for k in sizes}, "test")
    be._heads.clear()
    return be


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3")


@pytest.fixture
def backend(qwen3):
    ids = np.random.default_rng(0).permutation(VOCAB)
    return with_ranking(TorchEagerBackend.from_hf(qwen3), ids)


def test_a_reduced_draft_picks_the_best_of_its_ids(backend):
    sp, rng = SamplingParams(), np.random.default_rng(0)
    backend.prefill(make_ids(12, seed=4))
    p0, last, mask = backend.length, 7, skip_mask(2, 5)
    logits = backend.forward([last], mask, all_logits=False)[-1]  # [V], the draft's
    backend.rollback(p0)
    top = backend.vocab_ranking.top(32)
    drafts, q = backend.draft(last, mask, 1, sp, rng, frozenset(), vocab=32)
    assert q is None and drafts == [int(top[np.argmax(logits[top])])]
    assert backend.draft_vocab_sizes() == {32: 0.5, 64: 0.5}
    head = backend._heads[32]
    assert head.w.shape == (32, backend.dim) and head.ids.tolist() == top.tolist()
    torch.testing.assert_close(head.w, backend.out_w[head.ids])
    backend.rollback(p0)
    # sampled: the draft distribution lives on the head's ids, zero elsewhere
    drafts, q = backend.draft(last, mask, 3, SamplingParams(1.0), rng, frozenset(), vocab=32)
    q = q.numpy()
    outside = np.setdiff1d(np.arange(VOCAB), top)
    assert q.shape == (3, VOCAB) and np.all(q[:, outside] == 0)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
    assert set(drafts) <= set(top.tolist())


def test_a_head_that_is_not_offered_is_an_error_naming_it(qwen3, backend):
    sp, rng = SamplingParams(), np.random.default_rng(0)
    backend.prefill(make_ids(5))
    with pytest.raises(KnapSpecError, match=r"draft_vocab 48: this backend's reduced heads "
                                            r"are \[32, 64\]"):
        backend.draft(1, skip_mask(2), 2, sp, rng, frozenset(), vocab=48)
    plain = TorchEagerBackend.from_hf(qwen3)  # no tokenizer: no ranking
    assert plain.vocab_ranking is None and plain.draft_vocab_sizes() == {}
    plain.prefill(make_ids(5))
    with pytest.raises(KnapSpecError, match=r"draft_vocab 32: .* none \(no token ranking"):
        plain.draft(1, skip_mask(2), 2, sp, rng, frozenset(), vocab=32)


def test_the_generic_draft_runs_the_full_head_only():
    from fake_backend import FakeBackend

    be = FakeBackend()
    be.prefill([1, 2, 3])
    assert be.draft_vocab_sizes() == {}
    with pytest.raises(KnapSpecError, match=r"drafts with the full head only \(draft_vocab 64"):
        be.draft(1, None, 2, SamplingParams(), np.random.default_rng(0), frozenset(), vocab=64)


def test_sampling_with_a_reduced_head_keeps_the_target_law(backend):
    """The first token a round emits follows the target's distribution although the draft
    can only propose the head's ids and the target's second most likely token is not one
    of them: chi-square over seeded rounds (d = 2, under a mask)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    sp = SamplingParams(1.0)
    backend.prefill(make_ids(16, seed=9))
    p0, last, mask = backend.length, 11, skip_mask(2, 5)
    target = probabilities(backend.forward([last], all_logits=False)[0], sp)  # [V]
    backend.rollback(p0)
    order = np.argsort(-target)
    ranking = np.concatenate([order[:1], order[2:], order[1:2]])  # 2nd likeliest ranked last
    with_ranking(backend, ranking)
    outside = ranking[32:]
    assert target[outside].sum() > 0.05  # the head misses real target mass
    rng = np.random.default_rng(5)
    n_trials = 1500
    counts = np.zeros(VOCAB)
    accepted = np.zeros(3, dtype=int)
    for _ in range(n_trials):
        drafts, q = backend.draft(last, mask, 2, sp, rng, frozenset(), vocab=32)
        assert set(drafts) <= set(ranking[:32].tolist())
        backend.rollback(p0)
        n, nxt = backend.verify(last, drafts, q, sp, rng)
        backend.rollback(p0)
        counts[drafts[0] if n >= 1 else nxt] += 1
        accepted[n] += 1
    assert accepted[0] > 0 and accepted[1:].sum() > 0  # rejections and acceptances
    assert counts[outside].sum() > 0 and counts[order[1]] > 0  # recovered off the head
    expected = target * n_trials
    big = expected >= 5  # the others merged into one cell
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert scipy_stats.chisquare(obs, exp).pvalue > 1e-3


def test_profiles_price_the_reduced_heads_and_top_up_old_caches(backend, tmp_path):
    from knapspec.backends.profiling import cached_profile, draft_head_seconds

    t = backend.time_draft_head(32, 3)
    assert t > 0 and backend.time_draft_head(0, 3) > 0
    heads = draft_head_seconds(backend, 1e-3, repeats=3)
    assert set(heads) == {32, 64} and all(v > 0 for v in heads.values())
    assert backend._heads == {}  # heads made only to be timed are not kept
    # a cached profile of before reduced heads: measured now and saved into the file
    old = TableCostModel([64], [1], np.full((1, 1), 1e-4), np.full(1, 2e-4),
                         np.full(1, 1e-3), np.full(1, 1e-4))
    path = tmp_path / "profile.json"
    from knapspec.costmodels.io import save_cost_model

    save_cost_model(old, path)
    assert "draft_heads" not in json.loads(path.read_text())
    model = cached_profile(backend, path=path)
    assert set(model.draft_heads) == {32, 64} and model.vocab_size == VOCAB
    assert load_cost_model(path).draft_heads == model.draft_heads
    # a fresh profile measures them with the blocks
    fresh = backend.profile(contexts=[8, 16], token_counts=(1, 2), repeats=2, progress=False)
    assert set(fresh.draft_heads) == {32, 64} and fresh.vocab_size == VOCAB


# ----------------------------------------------------------------------------- torch-compile


def test_compiled_reduced_heads_run_the_packed_linear_and_never_recompile(monkeypatch):
    from test_torch_device import GREEDY, autoregressive

    from knapspec.backends.torch import prepack
    from knapspec.backends.torch.compile import TorchCompileBackend, cached_graphs

    if not prepack.available():
        pytest.skip("no oneDNN in this torch")
    be = TorchCompileBackend.from_hf(tiny_model("qwen3", seed=3), prepack="on")
    with_ranking(be, np.random.default_rng(1).permutation(VOCAB))
    be.warmup()  # with a ranking: the head graph dynamic in K is compiled here
    graphs = cached_graphs()
    registered = set(prepack._PACKED)
    assert be.time_draft_head(32, 2) > 0  # a head made only to be timed is not kept
    assert be._heads == {} and set(prepack._PACKED) == registered
    calls = []
    kernel = prepack._packed_linear
    monkeypatch.setattr(prepack, "_packed_linear", lambda *a: calls.append(a[1]) or kernel(*a))
    prompt = make_ids(20, seed=6)
    ref = autoregressive(be, prompt, 24)
    rng = np.random.default_rng(0)
    for vocab in (32, 64):
        last, out = int(np.argmax(be.prefill(prompt))), []
        while len(out) < 23:
            p0 = be.length
            drafts, _ = be.draft(last, skip_mask(2, 5), 3, GREEDY, rng, frozenset(), vocab=vocab)
            be.rollback(p0)
            n, nxt = be.verify(last, drafts, None, GREEDY, rng)
            be.rollback(p0 + n + 1)
            out += [*drafts[:n], nxt]
            last = nxt
        assert [ref[0], *out][:24] == ref
        head = be._heads[vocab]
        assert prepack._PACKED[head.w.data_ptr()].weight is head.w  # registered, packed
        packed = prepack._PACKED[head.w.data_ptr()].packed
        assert any(p is packed for p in calls)  # and the draft step ran through it
        calls.clear()
        assert be.time_draft_head(vocab, 2) > 0  # the profile times that same path
        assert any(p is packed for p in calls)
    for n in (1, 2, 4, 8):  # the profile's head timings run the compiled head too
        assert be.time_head(n, 2) > 0
    assert be.recompilations() == 0 and cached_graphs() == graphs


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol(smollm2):
    return TorchEagerBackend(smollm2)


@pytest.mark.slow
def test_the_shipped_ranking_belongs_to_the_default_tokenizer(smol, smollm2):
    shipped = dict(shipped_rankings())
    assert "smollm2-135m.json" in shipped
    r = VocabRanking.from_json(shipped["smollm2-135m.json"], "smollm2-135m.json")
    assert r.tokenizer == tokenizer_digest(smollm2.tokenizer)
    assert r.ids.size == smol.vocab_size and len(np.unique(r.ids)) == r.ids.size
    ks = sorted(r.coverage)
    assert ks == default_sizes(smol.vocab_size)
    cov = [r.coverage[k] for k in ks]
    assert all(a < b for a, b in itertools.pairwise(cov)) and 0.5 < cov[0] < cov[-1] < 1
    assert smol.vocab_ranking == r and smol.draft_vocab_sizes() == r.coverage
    assert r.meta["command"].startswith("knapspec vocab ")
    assert r.meta["heldout_predictions"] > 10000 and r.meta["tokens_counted"] > 100000


@pytest.mark.slow
def test_greedy_with_a_forced_reduced_head_equals_autoregressive(smol):
    from eval_text import specbench_prompts

    from knapspec.decoding import GenerationConfig, SpeculativeDecoder
    from knapspec.planner import StaticPlanner, default_block_scores
    from knapspec.planner.factory import make_planner
    from knapspec.planner.knobs import DraftHead, make_knobs

    k = min(smol.draft_vocab_sizes())  # the smallest head: the most tokens it cannot draft
    scores = np.where(smol.layout.skippable, default_block_scores(30), np.inf)
    mask = smol.layout.mask_from_blocks(np.argsort(scores)[:10])
    used, drafts = [], []
    reduced, draft = smol._reduced_head, smol.draft
    smol._reduced_head = lambda v: used.append(v) or reduced(v)
    smol.draft = lambda *a, **kw: drafts.append(kw.get("vocab", 0)) or draft(*a, **kw)
    try:
        for prompt in specbench_prompts(2):
            ids = smol.encode(prompt)
            ar = make_planner("ar", smol.layout, DRAFT_FRIENDLY)
            ref = SpeculativeDecoder(smol, ar).generate(ids, GenerationConfig(64))
            planner = StaticPlanner(smol.layout, DRAFT_FRIENDLY, mask, alpha=0.5,
                                    draft_length=4)
            planner.knobs = make_knobs([DraftHead(k, None, 0.9)], draft_vocab=k)
            used.clear()
            drafts.clear()
            res = SpeculativeDecoder(smol, planner).generate(ids, GenerationConfig(64))
            assert res.tokens == ref.tokens
            assert res.drafted > 0 and 0 < res.accepted <= res.drafted
            assert drafts and set(drafts) == {k} and used  # every round drafted with it
    finally:
        del smol._reduced_head, smol.draft
    assert k in smol._heads and smol._heads[k].size == k


def test_the_sweep_forces_plans_with_a_reduced_head_too(backend, monkeypatch):
    """``sweep(draft_vocab=K)``: every forced (mask, d) again with the head of K ids, its
    acceptance scaled by the head's coverage, predicted with that head's price; a head the
    backend lacks is refused by name."""
    from knapspec.benchmarking import Prompt, sweep
    from knapspec.costmodels import LinearCostModel
    from knapspec.errors import KnapSpecError

    cost = LinearCostModel(mlp_s=1e-3, attn_per_token_s=1e-7, attn_base_s=5e-4, head_s=2e-3,
                           overhead_s=1e-3)
    cost.draft_heads[32] = 1e-4
    monkeypatch.setattr(backend, "decode", lambda ids: "")  # no tokenizer: no text
    prompt = Prompt("p", 16, make_ids(16, seed=2))
    points = sweep(backend, cost, prompt, 6, skip_counts=(2,), draft_lengths=(2,),
                   draft_vocab=32)
    assert [(p["draft_length"], p["draft_vocab"]) for p in points] == [(0, 0), (2, 0), (2, 32)]
    full, reduced = points[1], points[2]
    assert reduced["predicted_alpha"] == pytest.approx(0.5 * full["predicted_alpha"])
    assert 32 in backend._heads  # drafting ran with the reduced head
    with pytest.raises(KnapSpecError, match="draft_vocab 48"):
        sweep(backend, cost, prompt, 6, skip_counts=(2,), draft_lengths=(2,), draft_vocab=48)
