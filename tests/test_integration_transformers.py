"""``knapspec.integrations.transformers.generate`` inside Hugging Face ``model.generate``.

Greedy output must equal the same model's ``model.generate(do_sample=False)`` token for
token with drafting forced (a fixed skip plan, ``drafted > 0`` checked), on tiny random
Llama / Qwen2 / Qwen3 / Mistral models (4 layers, D = 64, weights re-drawn from a seed at a
scale that makes logits O(10)) and on the real SmolLM2 (``slow``).  Also: seeded sampling,
streamers, the Hub-style folder ``examples/custom_generate``, the backend kept on the model,
and the errors for settings knapspec cannot honour.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fake_backend import fake_cost_model  # noqa: E402

from knapspec.blocks import BlockLayout  # noqa: E402
from knapspec.costmodels.io import save_cost_model  # noqa: E402
from knapspec.errors import KnapSpecError  # noqa: E402
from knapspec.integrations import transformers as kt  # noqa: E402
from knapspec.planner.planners import StaticPlanner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "examples" / "custom_generate"
VOCAB = 128
N_LAYERS = 4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
            num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512)
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
         "mistral": ("MistralConfig", "MistralForCausalLM")}
NO_EOS = dict(eos_token_id=None, pad_token_id=0)  # random models: run to max_new_tokens


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM: matrices N(0, 0.3^2), norms 1 + N(0, 0.2^2), biases small."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**TINY))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.3 * noise if p.dim() > 1 else (1 + 0.2 * noise if "norm" in name
                                                     else 0.1 * noise))
    return model.eval()


def forced(model, skipped=(2, 3), d: int = 3) -> StaticPlanner:
    """A plan that always drafts ``d`` tokens skipping blocks ``skipped``."""
    layout = BlockLayout(model.config.num_hidden_layers)
    return StaticPlanner(layout, fake_cost_model(), layout.mask_from_blocks(skipped), 0.5,
                         draft_length=d)


def prompt_ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    """``[1, n]`` random ids, never the pad id 0 (a pad id in the prompt means padding)."""
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


class Collect(transformers.generation.BaseStreamer):
    """Every ``put`` (as a list of ids) and how often ``end`` was called."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value) -> None:
        self.puts.append([int(i) for i in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.ended += 1


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_equals_hf_generate_with_drafting(arch):
    model = tiny(arch, seed=3)
    ids = prompt_ids(16, seed=1)
    ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=40, **NO_EOS)
    out = model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=40,
                         knapspec_planner=forced(model), return_dict_in_generate=True, **NO_EOS)
    assert isinstance(out, transformers.generation.utils.GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (1, 16 + 40) and out.sequences.dtype == ids.dtype
    assert out.sequences.tolist() == ref.tolist()
    stats = out.knapspec
    assert stats.drafted > 0 and stats.tokens == ref[0, 16:].tolist()
    assert stats.plan_history and stats.plan_history[0]["draft_length"] == 3


def test_eos_and_max_length_follow_the_generation_config():
    model = tiny("llama", seed=3)
    ids = prompt_ids(16, seed=1)
    free = model.generate(input_ids=ids, do_sample=False, max_new_tokens=30, **NO_EOS)
    eos = int(free[0, 16 + 9])  # the 10th new token ends generation when it is the EOS
    ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=30, eos_token_id=eos,
                         pad_token_id=0)
    out = model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=30,
                         eos_token_id=eos, pad_token_id=0, knapspec_planner=forced(model))
    assert out.tolist() == ref.tolist()
    assert out.shape[1] <= 16 + 10 and int(out[0, -1]) == eos
    short = model.generate(input_ids=ids, custom_generate=kt.generate, max_length=20,
                           knapspec_planner=forced(model), **NO_EOS)
    assert short.tolist() == free[:, :20].tolist()


def test_seeded_sampling_is_reproducible():
    model = tiny("qwen3", seed=5)
    ids = prompt_ids(10, seed=2)
    kw = dict(custom_generate=kt.generate, do_sample=True, temperature=0.9, top_p=0.95,
              top_k=0, max_new_tokens=32, return_dict_in_generate=True,
              knapspec_planner=forced(model), **NO_EOS)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(input_ids=ids, **kw))
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
    assert runs[0].sequences.tolist() != runs[2].sequences.tolist()
    assert all(r.knapspec.drafted > 0 for r in runs)


def test_streamer_gets_the_prompt_then_exactly_the_new_tokens():
    model = tiny("qwen2", seed=4)
    ids = prompt_ids(12, seed=3)
    streamer = Collect()
    out = model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=25,
                         streamer=streamer, knapspec_planner=forced(model), **NO_EOS)
    assert streamer.puts[0] == ids[0].tolist() and streamer.ended == 1
    assert [t for put in streamer.puts[1:] for t in put] == out[0, 12:].tolist()


def test_local_custom_generate_folder(monkeypatch, tmp_path):
    # transformers copies generate.py into its modules cache: keep that in tmp_path
    dmu = transformers.dynamic_module_utils
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model = tiny("llama", seed=6)
    ids = prompt_ids(12, seed=4)
    ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=24, **NO_EOS)
    streamer = Collect()
    out = model.generate(input_ids=ids, custom_generate=str(FOLDER), trust_remote_code=True,
                         max_new_tokens=24, streamer=streamer, knapspec_planner=forced(model),
                         return_dict_in_generate=True, **NO_EOS)
    assert out.sequences.tolist() == ref.tolist() and out.knapspec.drafted > 0
    assert streamer.puts[0] == ids[0].tolist() and streamer.ended == 1
    assert [t for put in streamer.puts[1:] for t in put] == ref[0, 12:].tolist()
    assert (FOLDER / "README.md").is_file()


def test_config_dict_and_toml_drive_the_planner(tmp_path):
    model = tiny("qwen3", seed=2)
    ids = prompt_ids(12, seed=5)
    ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=24, **NO_EOS)
    cost = save_cost_model(fake_cost_model(), tmp_path / "cost.json")
    conf = {"planner": {"strategy": "static", "mask": [2, 3], "draft_length": 2,
                        "calibrate": False},
            "costmodel": {"source": str(cost)}}
    toml = tmp_path / "knapspec.toml"
    toml.write_text('[planner]\nstrategy = "static"\nmask = [2, 3]\ndraft_length = 2\n'
                    f'calibrate = false\n[costmodel]\nsource = "{cost}"\n')
    for given in (conf, toml, str(toml)):
        out = model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=24,
                             knapspec_config=given, return_dict_in_generate=True, **NO_EOS)
        assert out.sequences.tolist() == ref.tolist()
        assert out.knapspec.drafted > 0
        assert {p["draft_length"] for p in out.knapspec.plan_history} == {2}
    with pytest.raises(KnapSpecError, match=r"planner\.strategy"):
        model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=4,
                       knapspec_config={"planner": {"strategy": "nope"}}, **NO_EOS)
    with pytest.raises(KnapSpecError, match="knapspec_config"):
        model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=4,
                       knapspec_config=3, **NO_EOS)


def test_backend_is_kept_on_the_model_and_rebuilt_for_new_weights():
    model = tiny("llama", seed=7)
    ids = prompt_ids(12, seed=6)
    kw = dict(custom_generate=kt.generate, max_new_tokens=16, knapspec_planner=forced(model),
              **NO_EOS)
    model.generate(input_ids=ids, **kw)
    first = model.__dict__[kt.STATE_ATTR].backend
    model.generate(input_ids=ids, **kw)
    assert model.__dict__[kt.STATE_ATTR].backend is first
    assert kt.STATE_ATTR not in model.state_dict()
    with torch.no_grad():  # new tensors (not an in-place update): the views are stale
        model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight * -1.5)
    ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=16, **NO_EOS)
    out = model.generate(input_ids=ids, **kw)
    assert model.__dict__[kt.STATE_ATTR].backend is not first
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(num_beams=2), "num_beams"),
        (dict(num_return_sequences=2, do_sample=True, top_k=0), "num_return_sequences"),
        (dict(repetition_penalty=1.3), "repetition_penalty"),
        (dict(do_sample=True), "top_k"),  # transformers' default top_k=50 when sampling
        (dict(min_new_tokens=5, eos_token_id=5), "min_new_tokens"),
        (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
        (dict(max_time=5.0), "max_time"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
    ],
)
def test_unsupported_settings_are_named(kwargs, named):
    model = tiny("llama", seed=1)
    with pytest.raises(kt.TransformersSettingError, match=named):
        model.generate(input_ids=prompt_ids(8), custom_generate=kt.generate, max_new_tokens=8,
                       knapspec_planner=forced(model), **{**NO_EOS, **kwargs})


def test_batch_padding_and_assistant_are_refused():
    model = tiny("qwen2", seed=1)
    two = torch.cat([prompt_ids(8, 0), prompt_ids(8, 1)])
    with pytest.raises(kt.TransformersSettingError, match="batch size 2"):
        model.generate(input_ids=two, custom_generate=kt.generate, max_new_tokens=4, **NO_EOS)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(kt.TransformersSettingError, match="attention_mask"):
        model.generate(input_ids=prompt_ids(8), attention_mask=mask,
                       custom_generate=kt.generate, max_new_tokens=4, **NO_EOS)
    with pytest.raises(kt.TransformersSettingError, match="assistant_model"):
        model.generate(input_ids=prompt_ids(8), assistant_model=tiny("qwen2", seed=2),
                       custom_generate=kt.generate, max_new_tokens=4, **NO_EOS)
    two_layers = BlockLayout.unpinned(2)
    with pytest.raises(kt.TransformersSettingError, match="knapspec_planner: planned for 2"):
        model.generate(input_ids=prompt_ids(8), custom_generate=kt.generate, max_new_tokens=4,
                       knapspec_planner=StaticPlanner(two_layers, fake_cost_model(),
                                                      two_layers.mask_from_blocks([1])),
                       **NO_EOS)


# ----------------------------------------------------------------------------- SmolLM2
# A fixed plan for SmolLM2's 30 layers: attention and MLP of layers 10-12, 18 and 20
SMOLLM2_PLAN = {"planner": {"strategy": "static", "draft_length": 4,
                            "mask": [20, 21, 22, 23, 24, 25, 36, 37, 40, 41]},
                "costmodel": {"source": "roofline"}}  # no profiling


def _first_difference(model, ids: torch.Tensor, ours: list[int], theirs: list[int]) -> str:
    """Where two greedy continuations part, with the HF logit margin there (for a failure
    message: a near-tie is a different finding from a wrong token)."""
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    with torch.no_grad():
        logits = model(torch.cat([ids, torch.tensor([theirs[:i]])], dim=1)).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return (f"new token {i}: ours {ours[i]}, HF {theirs[i]} (HF logit of ours "
            f"{float(logits[ours[i]]):.4f}, top-2 margin {float(top[0] - top[1]):.4f})")


@pytest.mark.slow
def test_smollm2_2k_token_prompt_greedy_equals_hf(smollm2):
    """The issue's bar: a ~2K-token prompt, float32, drafting forced, 64 new tokens."""
    from eval_text import book_text

    model, tok = smollm2.model, smollm2.tokenizer
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok(book_text(12000), add_special_tokens=False)["input_ids"][:2000]])
    ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=64,
                         pad_token_id=tok.pad_token_id)
    out = model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=64,
                         knapspec_config=SMOLLM2_PLAN, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id)
    assert out.knapspec.drafted > 0 and out.knapspec.accepted > 0
    ours, theirs = out.sequences[0, 2000:].tolist(), ref[0, 2000:].tolist()
    assert ours == theirs, _first_difference(model, ids, ours, theirs)


class CollectText(transformers.TextStreamer):
    """A ``TextStreamer`` that keeps the text instead of printing it."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""
        self.ends = 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self.ends += stream_end


def _chat(tok, text: str) -> torch.Tensor:
    ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return torch.tensor([list(ids)])


@pytest.mark.slow
def test_smollm2_chat_with_a_text_streamer(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = _chat(tok, "Write a short poem about the sea.")
    ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=48,
                         pad_token_id=tok.pad_token_id)
    streamer = CollectText(tok)
    out = model.generate(input_ids=ids, custom_generate=kt.generate, max_new_tokens=48,
                         streamer=streamer, knapspec_config=SMOLLM2_PLAN,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    assert out.sequences.tolist() == ref.tolist() and out.knapspec.drafted > 0
    new = out.sequences[0, ids.shape[1]:].tolist()
    assert streamer.ends == 1 and streamer.text.strip()
    assert streamer.text == tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_stop_strings_through_the_folder(smollm2, monkeypatch, tmp_path):
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model, tok = smollm2.model, smollm2.tokenizer
    ids = _chat(tok, "Name three colours of the sea, one per line.")
    p = ids.shape[1]
    free = model.generate(input_ids=ids, do_sample=False, max_new_tokens=40,
                          pad_token_id=tok.pad_token_id)[0, p:].tolist()
    text = tok.decode(free, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert stop.strip() and text.find(stop) == len(text) // 2  # first occurrence: mid-text
    kw = dict(input_ids=ids, max_new_tokens=40, tokenizer=tok, stop_strings=[stop],
              pad_token_id=tok.pad_token_id)
    theirs = model.generate(do_sample=False, **kw)[0, p:].tolist()
    out = model.generate(custom_generate=str(FOLDER), trust_remote_code=True,
                         knapspec_config=SMOLLM2_PLAN, return_dict_in_generate=True, **kw)
    ours = out.sequences[0, p:].tolist()
    # knapspec ends before the stop string; transformers keeps the token that completes it
    assert out.knapspec.stop_reason == "stop" and out.knapspec.drafted > 0
    assert ours == theirs[: len(ours)] and len(ours) < len(theirs)
    assert stop not in tok.decode(ours, skip_special_tokens=True)
    assert out.knapspec.text == text[: len(text) // 2]
