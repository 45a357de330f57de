"""Built-in architectures with seeded random weights: ``--model random:<spec>``.

Real weights of an 8B model can never be on the machines knapspec is developed on, but the
time a step takes depends only on the shapes, the dtype and the device.  ``random:<spec>``
(any ``knapspec.costmodels.MODEL_SPECS`` name, e.g. ``random:llama-3.1-8b``) builds that
architecture as a ``transformers`` Llama / Qwen2 / Qwen3 model from the spec's shapes
(``costmodels.specs.hf_config_dict``: layers, hidden size, heads, KV heads, head dim, MLP
width, vocabulary, RoPE base, tied embeddings) with weights drawn from a seeded generator,
directly on the target device in the target dtype: no download, no float32 copy in host
memory.  Everything it produces is flagged timing-only (``ModelSource.timing_only_reason``,
which the backend reports as ``Backend.timing_only_reason``): its timings are true, its
tokens and acceptance are noise.

Tokenizer: a model built here has none, so ``ByteTokenizer`` stands in: a prompt is encoded
as its UTF-8 bytes (ids 0..255, one token per byte, no chat template); ids 256 and above
decode as ``<id>``.  No end-of-sequence id exists, so a generation runs to its length.

Weights: every matrix (and bias) is drawn from ``N(0, std^2)`` (``std = 0.02``, the
initializer range of these models' configs), every norm weight is 1.  The draw uses a
``torch.Generator`` on the target device seeded with ``seed``, parameters in
``named_parameters()`` order (tied embeddings drawn once), so the same seed, spec, dtype
and device give the same weights; CPU and CUDA generators give different streams.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from ...costmodels.specs import DecoderSpec, hf_config_dict
from ...errors import KnapSpecError

__all__ = ["INIT_STD", "ByteTokenizer", "build_random_model", "random_hf_config"]

log = logging.getLogger(__name__)

#: standard deviation of the random weights (the configs' ``initializer_range``)
INIT_STD = 0.02

_BYTES = 256


class ByteTokenizer:
    """A stand-in tokenizer for models without one: UTF-8 bytes in, bytes (or ``<id>``) out.

    Implements what the torch backends call: ``encode``, ``decode``, ``get_vocab``,
    ``eos_token_id`` (``None``), ``chat_template`` (``None``: prompts are encoded raw) and
    ``all_special_tokens`` (empty).
    """

    chat_template = None
    eos_token_id = None
    all_special_tokens: tuple[str, ...] = ()

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < _BYTES:
            raise KnapSpecError(f"ByteTokenizer needs a vocabulary of at least {_BYTES} ids, "
                                f"got {vocab_size}")
        self.vocab_size = int(vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids ``[n_bytes]``: the UTF-8 bytes of ``text``."""
        return list(str(text).encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: runs of byte ids as UTF-8 (invalid bytes replaced), others ``<id>``."""
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < _BYTES:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", "replace"))
                run.clear()
            out.append(f"<{i}>")
        if run:
            out.append(run.decode("utf-8", "replace"))
        return "".join(out)

    def get_vocab(self) -> dict[str, int]:
        """No named tokens (the backends look end-of-turn tokens up here)."""
        return {}


def random_hf_config(spec: DecoderSpec) -> Any:
    """The ``transformers`` config of ``spec``'s architecture (``hf_config_dict``)."""
    from transformers import AutoConfig

    data = hf_config_dict(spec)
    data["sliding_window"] = None  # full attention at every position, as the specs state
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as exc:
        raise KnapSpecError(f"transformers cannot build a {model_type!r} config for "
                            f"{spec.name}: {exc}") from None


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``from_config``'s dtype keyword (``torch_dtype`` before transformers 4.56)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


@torch.no_grad()
def _seeded_init(model: Any, seed: int, device: torch.device) -> None:
    """Draw every parameter from a generator on ``device`` seeded with ``seed`` (in place):
    norm weights 1, everything else ``N(0, INIT_STD^2)``."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    for name, p in model.named_parameters():  # tied parameters appear once
        if p.ndim == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, INIT_STD, generator=gen)


def build_random_model(
    spec: DecoderSpec, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> Any:
    """``spec``'s architecture as a ``transformers`` causal LM with seeded random weights.

    Args:
        spec: the shapes (a built-in ``MODEL_SPECS`` entry, or any ``DecoderSpec``; its
            name picks the architecture details in ``costmodels.specs.ARCHITECTURES``,
            plain llama when absent).
        dtype: parameter dtype; parameters are created in it (no float32 copy).
        device: where the parameters are created (``"cpu"``, ``"cuda:0"``...).
        seed: seed of the weights.

    Returns:
        the model in eval mode, every parameter on ``device`` in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    t0 = time.perf_counter()
    config = random_hf_config(spec)
    params = spec.n_layers * (spec.attention_params + spec.mlp_params) + spec.head_params * (
        1 if spec.tied_embeddings else 2)
    log.info("building random:%s (%s, %.2fB parameters) on %s in %s, seed %d", spec.name,
             config.model_type, params / 1e9, device, str(dtype).removeprefix("torch."), seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(dtype))
    _seeded_init(model, seed, device)
    model.eval()
    log.info("random:%s ready in %.1f s", spec.name, time.perf_counter() - t0)
    return model
