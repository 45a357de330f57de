"""knapspec as a Hugging Face ``custom_generate``: ``model.generate(..., custom_generate=...)``.

``generate`` decodes one sequence of the caller's already-loaded causal LM (Llama, Qwen2,
Qwen3, Mistral; CPU or CUDA) with knapspec's self-speculative loop: the model is wrapped as
the torch backend (``TorchEagerBackend.from_hf``: views of its weights, nothing copied), a
planner chooses the layer-skip drafts, and ``decoding.SpeculativeDecoder`` drafts and verifies
them, so greedy output is the model's own greedy output.

Two ways in, one function:

- as a callable, ``model.generate(**inputs, custom_generate=generate, max_new_tokens=64)``:
  transformers prepares the generation config, the logits processors and the stopping
  criteria, then calls ``generate(model, input_ids, logits_processor=..., ...)``;
- the Hub convention, ``model.generate(custom_generate="<folder>", trust_remote_code=True)``
  on a folder holding ``custom_generate/generate.py`` (``examples/custom_generate``):
  transformers hands every argument of ``generate()`` over unprepared, as
  ``generate(model=model, inputs=..., streamer=..., tokenizer=..., **kwargs)``; this path
  takes the stop strings and the tokenizer out and re-enters transformers' ``generate``
  with itself as the callable.

transformers (5.x) gives a callable neither the ``streamer`` nor the ``tokenizer`` (only the
callable's own new keywords), after it has ``put()`` the prompt into the streamer; the
streamer is read from the calling ``generate`` frame so that it still gets the new tokens
and its ``end()``.  Stop strings need a tokenizer, which only the folder path passes on (on
the callable path transformers itself refuses stop strings without one).  The ids returned
end before a stop string (knapspec's rule, ``knapspec.stop_strings``), where transformers
keeps the token that completes it.

knapspec's own options arrive as keywords transformers passes through untouched:
``knapspec_config`` (a ``KnapSpecConfig``, a dict in the TOML's shape, or a TOML path; its
``[planner]`` and ``[costmodel]`` sections apply, the model is the caller's) and
``knapspec_planner`` (a ``Planner`` instance, which then replaces the config's strategy).
Anything knapspec cannot honour exactly (batch > 1, beams, processors other than temperature
and top-p, padding, extra outputs, ...) raises ``TransformersSettingError`` naming it.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation import (
    EosTokenCriteria,
    LogitNormalization,
    MaxLengthCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from ..backends.torch.eager import TorchEagerBackend
from ..config import KnapSpecConfig
from ..decoding import GenerationResult, SpeculativeDecoder
from ..errors import KnapSpecError
from ..planner.planners import Planner
from ..runtime import config_cost_model, config_planner

log = logging.getLogger(__name__)

__all__ = ["KnapSpecGenerateOutput", "TransformersSettingError", "generate"]

STATE_ATTR = "_knapspec_state"  # attribute of the caller's model holding the cached backend
MIN_CONTEXT = 2048  # smallest KV cache (tokens) a wrapped model gets, so short calls share one

# logits processors / warpers transformers adds, by class name -> the setting that adds them
_PROCESSOR_SETTINGS = {
    "TopKLogitsWarper": "top_k (transformers' default is 50 when sampling: pass top_k=0)",
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "MinLengthLogitsProcessor": "min_length or min_new_tokens",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "MinPLogitsWarper": "min_p",
    "TopHLogitsWarper": "top_h",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
}
_CRITERIA_SETTINGS = {"MaxTimeCriteria": "max_time", "StopStringCriteria": "stop_strings"}
# generation-config fields that select another decoding mode: name -> value that means "off"
_MODE_SETTINGS = {"num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None,
                  "dola_layers": None, "prompt_lookup_num_tokens": None,
                  "output_scores": False, "output_logits": False,
                  "output_attentions": False, "output_hidden_states": False}
# model keyword arguments transformers prepares for every call (read or safely ignored here)
_MODEL_KWARGS = {"attention_mask", "cache", "past_key_values", "position_ids", "use_cache",
                 "logits_to_keep", "cache_position", "return_dict"}


class TransformersSettingError(KnapSpecError):
    """A ``generate()`` setting knapspec cannot honour; the message names it."""


@dataclass
class KnapSpecGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` with ``sequences`` ``[1, prompt + new]`` and the
    generation's statistics (``knapspec.drafted``, ``.accepted``, ``.plan_history``, times in
    seconds)."""

    knapspec: GenerationResult | None = None  # knapspec's statistics of this generation


class _HFBackend(TorchEagerBackend):
    """The torch backend over a caller's model; without a tokenizer texts are empty (the
    caller decodes the returned ids)."""

    def decode(self, ids: Any) -> str:
        return "" if self.tokenizer is None else super().decode(ids)


@dataclass
class _State:
    """What one wrapped model keeps between calls (an attribute of the model object)."""

    backend: _HFBackend  # the model wrapped as the torch backend
    key: tuple[Any, ...]  # weights' (address, device, dtype): the backend is valid while equal
    eos: frozenset[int]  # the backend's own end-of-sequence ids (the model's and tokenizer's)
    planners: dict[str, Planner] = field(default_factory=dict)  # built planners by config


def _weights_key(model: Any) -> tuple[Any, ...]:
    """Address, device and dtype of every parameter: changes when the weights are replaced
    or moved (``model.to``), not when they are updated in place."""
    return tuple((p.data_ptr(), str(p.device), p.dtype) for p in model.parameters())


def _backend(model: Any, tokenizer: Any, needed: int) -> _State:
    """The cached backend of ``model`` with room for ``needed`` tokens (built or rebuilt when
    missing, stale or too small)."""
    state = model.__dict__.get(STATE_ATTR)
    key = _weights_key(model)
    if state is None or state.key != key or state.backend.max_context < needed:
        limit = int(getattr(model.config, "max_position_embeddings", 0) or needed)
        if needed > limit:
            raise TransformersSettingError(
                f"max_new_tokens: prompt and new tokens need {needed} positions, the model's "
                f"max_position_embeddings is {limit}")
        size = min(limit, max(MIN_CONTEXT, 1 << (needed - 1).bit_length()))
        backend = _HFBackend.from_hf(model, tokenizer, max_context=size)
        state = _State(backend, key, backend.eos_token_ids)
        model.__dict__[STATE_ATTR] = state  # not a Module attribute: no state_dict entry
        log.info("knapspec: wrapped %s as the torch backend (KV cache %d tokens)",
                 backend.model_name, size)
    if tokenizer is not None:
        state.backend.tokenizer = tokenizer
    return state


def _config(value: Any) -> KnapSpecConfig:
    """``knapspec_config`` as a validated ``KnapSpecConfig`` (``KnapSpecConfig.coerce``)."""
    try:
        return KnapSpecConfig.coerce(value, source="knapspec_config")
    except TransformersSettingError:
        raise
    except KnapSpecError as e:
        raise TransformersSettingError(str(e)) from None


def _planner(state: _State, config: KnapSpecConfig, planner: Planner | None) -> Planner:
    """``planner`` if given (its layout must fit the model), else the config's, built once
    per configuration and model."""
    layout = state.backend.layout
    if planner is not None:
        if not isinstance(planner, Planner):
            raise TransformersSettingError(
                f"knapspec_planner: expected a knapspec Planner, got {type(planner).__name__}")
        n = getattr(getattr(planner, "layout", None), "n_layers", layout.n_layers)
        if n != layout.n_layers:
            raise TransformersSettingError(
                f"knapspec_planner: planned for {n} layers, the model has {layout.n_layers}")
        return planner
    key = repr(sorted(config.to_dict()["planner"].items())) + repr(config.to_dict()["costmodel"])
    if key not in state.planners:
        cost = config_cost_model(config, state.backend, progress=False, notice=log.info)
        state.planners[key] = config_planner(config, layout, cost, backend=state.backend)
    return state.planners[key]


# ------------------------------------------------------------------ checking the settings
def _refuse(setting: str, why: str = "knapspec does not support it") -> TransformersSettingError:
    return TransformersSettingError(f"{setting}: {why} (knapspec decodes one sequence, greedy "
                                    "or with temperature/top_p)")


def _check_settings(model: Any, input_ids: Any, gc: Any, processors: Any, criteria: Any,
                    model_kwargs: dict[str, Any]) -> None:
    """Raise ``TransformersSettingError`` naming the first setting knapspec cannot honour."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise _refuse("model", "encoder-decoder models are not supported")
    for name, off in _MODE_SETTINGS.items():
        value = getattr(gc, name, off)
        if value not in (off, None) and not (off is None and value == 0):
            raise _refuse(f"{name}={value!r}")
    if gc.do_sample and not gc.temperature:
        raise _refuse(f"temperature={gc.temperature!r}", "sampling needs a temperature > 0")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise _refuse("input_ids", "expected a [1, prompt] tensor of token ids")
    if input_ids.shape[0] != 1:
        raise _refuse(f"batch size {input_ids.shape[0]}", "only one sequence at a time")
    if input_ids.shape[1] == 0:
        raise _refuse("input_ids", "the prompt is empty")
    for key in model_kwargs:
        if key not in _MODEL_KWARGS:
            raise _refuse(key)
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise _refuse("attention_mask", "padding (zeros in the mask) is not supported")
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length():
            raise _refuse(name, "a filled cache is not supported (knapspec keeps its own)")
    allowed = (TemperatureLogitsWarper, TopPLogitsWarper, LogitNormalization)
    for p in processors or ():
        if not isinstance(p, allowed):
            cls = type(p).__name__
            raise _refuse(_PROCESSOR_SETTINGS.get(cls, f"logits processor {cls}"))
    for c in criteria or ():
        if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria)):
            cls = type(c).__name__
            raise _refuse(_CRITERIA_SETTINGS.get(cls, f"stopping criterion {cls}"))


def _caller_locals(model: Any) -> dict[str, Any]:
    """Locals of the transformers ``generate`` call that called us (empty if not found).

    transformers 5.x passes a ``custom_generate`` callable neither the streamer nor the
    assistant model; they are read from the frame of the ``generate(self=model)`` that is
    running us.
    """
    frame = sys._getframe(1)
    try:
        for _ in range(8):
            frame = frame.f_back
            if frame is None:
                return {}
            local = frame.f_locals
            if (frame.f_code.co_name == "generate" and local.get("self") is model
                    and "custom_generate" in local):
                return dict(local)
        return {}
    finally:
        del frame


# ------------------------------------------------------------------ the decoding method
def _eos(gc: Any) -> frozenset[int]:
    """The generation config's end-of-sequence ids (none: generation runs to the length)."""
    value = getattr(gc, "_eos_token_tensor", None)
    if value is None:
        value = gc.eos_token_id
        if value is None:
            return frozenset()
        return frozenset(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return frozenset(int(v) for v in torch.as_tensor(value).reshape(-1).tolist())


def _decode(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool | None = False,
    streamer: Any = None,
    *,
    tokenizer: Any = None,
    stop_strings: tuple[str, ...] = (),
    knapspec_config: Any = None,
    knapspec_planner: Planner | None = None,
    prompt_streamed: bool = True,
    assistant_model: Any = None,
    **model_kwargs: Any,
) -> torch.Tensor | KnapSpecGenerateOutput:
    """One prepared generation: ``input_ids`` ``[1, P]`` -> ids ``[1, P + new]`` (or a
    ``KnapSpecGenerateOutput`` with ``return_dict_in_generate``)."""
    gc = generation_config if generation_config is not None else model.generation_config
    if synced_gpus:
        raise _refuse("synced_gpus=True")
    if assistant_model is not None:
        raise _refuse("assistant_model", "knapspec drafts with the model's own layers")
    _check_settings(model, input_ids, gc, logits_processor, stopping_criteria, model_kwargs)
    prompt = [int(t) for t in input_ids[0].tolist()]
    max_new = int(gc.max_length) - len(prompt)
    if max_new < 1:
        raise _refuse(f"max_length={gc.max_length}",
                      f"leaves no room for new tokens after a {len(prompt)}-token prompt")
    if stop_strings and tokenizer is None:
        raise _refuse("stop_strings", "they need the tokenizer: pass tokenizer=")
    config = _config(knapspec_config)
    state = _backend(model, tokenizer, len(prompt) + max_new + 1)
    planner = _planner(state, config, knapspec_planner)
    eos = _eos(gc)
    sampling = bool(gc.do_sample)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if sampling else None  # torch's RNG
    run = config.generation_config(
        max_new_tokens=max_new,
        temperature=float(gc.temperature) if sampling else 0.0,
        top_p=float(gc.top_p if gc.top_p is not None else 1.0) if sampling else 1.0,
        seed=seed, stop=tuple(stop_strings), stop_at_eos=bool(eos))
    if streamer is not None and not prompt_streamed:
        streamer.put(input_ids.cpu())
    on_token = None
    if streamer is not None:
        def on_token(ids: list[int]) -> None:
            streamer.put(torch.tensor(ids, dtype=torch.long))
    backend = state.backend
    backend.eos_token_ids = eos if eos else state.eos
    try:
        result = SpeculativeDecoder(backend, planner).generate(prompt, run, on_token=on_token)
    finally:
        backend.eos_token_ids = state.eos
    if streamer is not None:
        streamer.end()
    new = torch.tensor([result.tokens], dtype=input_ids.dtype, device=input_ids.device)
    sequences = torch.cat([input_ids, new], dim=1)  # [1, P + new]
    if getattr(gc, "return_dict_in_generate", False):
        return KnapSpecGenerateOutput(sequences=sequences, knapspec=result)
    return sequences


# ------------------------------------------------------------------ the public callable
def generate(
    model: Any,
    input_ids: torch.Tensor | None = None,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool | None = None,
    streamer: Any = None,
    knapspec_config: Any = None,
    knapspec_planner: Planner | None = None,
    **kwargs: Any,
) -> torch.Tensor | KnapSpecGenerateOutput:
    """Generate with knapspec's self-speculative loop on the caller's transformers model.

    Use as ``model.generate(**inputs, custom_generate=generate, max_new_tokens=64)`` (add
    ``do_sample=True, temperature=..., top_p=..., top_k=0`` to sample; seed with
    ``torch.manual_seed``), or through a Hub-style folder (``examples/custom_generate``).

    Args:
        model: a loaded causal LM (Llama, Qwen2, Qwen3 or Mistral family), on its device.
        input_ids: ``[1, P]`` prompt token ids (one sequence; no padding).
        knapspec_config: a ``KnapSpecConfig``, a dict in ``knapspec.toml``'s shape or a TOML
            path; its ``[planner]`` and ``[costmodel]`` sections choose the plans
            (``costmodel.source = "profile"``, the default, profiles the model once and
            caches the profile, as ``knapspec generate`` does).
        knapspec_planner: a ``Planner`` over the model's layers, used instead of the config's.

    Returns:
        ids ``[1, P + new]`` on ``input_ids``' device, or with ``return_dict_in_generate=True``
        a ``KnapSpecGenerateOutput`` (``.sequences``; ``.knapspec``: drafted, accepted,
        plan history).  The backend built for ``model`` is kept on it between calls.

    Raises:
        TransformersSettingError: a setting knapspec cannot honour, named.
    """
    prepared = "inputs" not in kwargs and generation_config is not None and (
        stopping_criteria is not None)
    if prepared:  # called by transformers as a decoding method
        caller = _caller_locals(model)
        return _decode(model, input_ids, logits_processor, stopping_criteria, generation_config,
                       synced_gpus, streamer if streamer is not None else caller.get("streamer"),
                       knapspec_config=knapspec_config, knapspec_planner=knapspec_planner,
                       assistant_model=caller.get("assistant_model"), **kwargs)
    return _enter_transformers(model, input_ids, logits_processor, stopping_criteria,
                               generation_config, synced_gpus, streamer, knapspec_config,
                               knapspec_planner, kwargs)


def _enter_transformers(
    model: Any, input_ids: Any, logits_processor: Any, stopping_criteria: Any,
    generation_config: Any, synced_gpus: bool | None, streamer: Any, knapspec_config: Any,
    knapspec_planner: Planner | None, kwargs: dict[str, Any],
) -> torch.Tensor | KnapSpecGenerateOutput:
    """The unprepared (Hub folder / direct) call: let transformers prepare the inputs, with
    the stop strings, tokenizer and streamer handed to ``_decode`` directly."""
    kwargs = dict(kwargs)
    tokenizer = kwargs.pop("tokenizer", None)
    if kwargs.get("assistant_model") is not None:
        raise _refuse("assistant_model", "knapspec drafts with the model's own layers")
    kwargs.pop("assistant_model", None)
    stop = kwargs.pop("stop_strings", None)
    base = generation_config if generation_config is not None else model.generation_config
    if getattr(base, "stop_strings", None):
        stop = stop or base.stop_strings
        generation_config = copy.deepcopy(base)
        generation_config.stop_strings = None  # ours to handle, not transformers'
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    method = functools.partial(
        _decode, tokenizer=tokenizer, stop_strings=stop, knapspec_config=knapspec_config,
        knapspec_planner=knapspec_planner, streamer=streamer, prompt_streamed=False)
    return GenerationMixin.generate(
        model, generation_config=generation_config, logits_processor=logits_processor,
        stopping_criteria=stopping_criteria, synced_gpus=synced_gpus,
        custom_generate=method, **kwargs)
