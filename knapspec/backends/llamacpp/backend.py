"""``LlamaCppBackend``: the loop's primitives on llama.cpp, drafts as per-mask GGUF models.

One llama.cpp context runs the target (the GGUF file as given).  A skip mask is run by a
*draft model*: a GGUF written from the target's own tensors without the skipped blocks
(``gguf_draft``), loaded into its own context and kept in a small LRU pool keyed by the
mask.  Draft files are content-addressed on disk, so a mask is written once per machine.

KV semantics match the torch backend (drafting attends to the target's KV of every
verified position): before the first draft step of a round the draft's cache is brought
up to the verified history by copying the target's KV rows of its kept attention layers
(``kvstate``); the round's later steps attend to the draft's own KV of its drafted
positions, which are rolled back afterwards.  A fresh draft is seeded the same way
(the whole context in one copy, ~100x cheaper than re-prefilling it).

Costs the method adds are measured and exposed: ``switch_seconds(mask)`` (write + load +
seed a draft, or catch up a pooled one) for the planner; the per-round KV copy is part of
the draft time that the loop reports, and ``profile`` adds it to the verify cost.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...blocks import BlockLayout
from ...errors import KnapSpecError
from ...sampling import SamplingParams, draft_token
from ..base import Backend
from .gguf_draft import (
    DRAFTABLE,
    NEOX_ROPE,
    DraftFiles,
    GgufSource,
    draft_layers,
    kv_layer_map,
)
from .kvstate import KVBlob
from .runner import LlamaRunner

log = logging.getLogger(__name__)

# Priors for switch-cost estimates until this process has measured its own (seconds,
# measured on the 2-core development machine with the default model, see
# docs/notes/llamacpp-deci-feasibility.md).
_PRIOR_WRITE_S = 0.35
_PRIOR_LOAD_S = 0.30
_PRIOR_COPY_FIXED_S = 1.5e-3
_PRIOR_COPY_PER_TOKEN_S = 3.0e-5


def default_threads() -> int:
    """CPU threads: the cores this process may use (ggml spins at barriers, so more
    threads than idle cores collapses throughput)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LlamaCppBackend(Backend):
    """Self-speculative decoding on llama.cpp (llama-cpp-python), one sequence.

    Args:
        model: ``None`` (the default SmolLM2 GGUF) or a path to a GGUF file of a Llama
            (Llama 2/3, Mistral, SmolLM) or Qwen2 architecture model.
        threads: CPU threads (default: the cores this process may use).
        max_context: context size in tokens (default: the model's training context).
        flash_attn: llama.cpp's flash attention for the target and every draft (on by
            default, as llama.cpp's "auto" resolves on a CPU; ``llama_cpp.Llama`` defaults
            to off).  Its batched and single-token results differ less often.
        draft_pool: draft models kept loaded at once (least recently used is freed).
        draft_cache_mb: size bound of the on-disk draft cache in MiB.
    """

    name = "llamacpp"

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        max_context: int | None = None,
        flash_attn: bool = True,
        draft_pool: int = 4,
        draft_cache_mb: int = 2048,
    ) -> None:
        from ..._io import cache_dir
        from ..sources import gguf_architecture, resolve_model

        source = resolve_model(model)
        if source.kind == "random":
            raise KnapSpecError(
                f"the llamacpp backend runs GGUF files; {source.path.name} (random weights) "
                "runs on the torch backends: use --backend torch or torch-compile"
            )
        if source.kind != "gguf":
            raise KnapSpecError(
                f"the llamacpp backend needs a GGUF file, got a Hugging Face directory "
                f"{source.path} (convert it with llama.cpp's convert_hf_to_gguf.py, or use "
                "--backend torch)"
            )
        arch = gguf_architecture(source.path)
        if arch not in DRAFTABLE:
            raise KnapSpecError(
                f"unsupported architecture {arch!r} for the llamacpp backend (it drafts "
                f"{', '.join(DRAFTABLE)} GGUF models); use --backend torch"
            )
        for opt, value in (("threads", threads), ("max_context", max_context),
                           ("draft_pool", draft_pool), ("draft_cache_mb", draft_cache_mb)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise KnapSpecError(f"{opt} must be a positive integer, got {value!r}")
        self.model_path = source.path
        self.threads = int(threads or default_threads())
        self.flash_attn = bool(flash_attn)
        t0 = time.perf_counter()
        folder = cache_dir() / "llamacpp"
        self.source = GgufSource(self.model_path, index_dir=folder)
        self._files = DraftFiles(self.source, folder / f"drafts-{self.source.key}",
                                 int(draft_cache_mb) << 20)
        self.layout = BlockLayout(self.source.n_layer)
        # NEOX-RoPE models run as their no-skip deci rewrite (same maths, one K layout)
        self.target_path = (self._files.get(self.layout.empty_mask()) if arch in NEOX_ROPE
                            else self.model_path)
        self._files.pinned.add(self.target_path)
        self._target = LlamaRunner(self.target_path, int(max_context or 0), self.threads,
                                   flash_attn=self.flash_attn)
        self.load_seconds = time.perf_counter() - t0
        self.max_context = self._target.n_ctx
        self.vocab_size = self._target.n_vocab
        self.eos_token_ids = frozenset(
            t for t in range(self.vocab_size)
            if _is_eog(self._target, t)
        )
        self._template = self._target.meta("tokenizer.chat_template")
        self._pool_size = int(draft_pool)
        self._pool: OrderedDict[bytes, tuple[LlamaRunner, list[int | str | None]]] = (
            OrderedDict())
        self._ids: list[int] = []  # token at each position of the (logical) sequence
        self._load_s: list[float] = []  # measured draft loads
        self._copies: list[tuple[int, float]] = []  # measured KV copies: (tokens, seconds)
        self.copy_seconds = 0.0  # total seconds spent copying KV into drafts

    # ------------------------------------------------------------------ tokenizer
    def encode(self, text: str, chat: bool = True) -> list[int]:
        if chat and self._template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            t = self._target
            eos = t.token_text(_vocab_id(t, "eos"))
            bos = t.token_text(_vocab_id(t, "bos"))
            fmt = Jinja2ChatFormatter(self._template, eos_token=eos, bos_token=bos)
            prompt = fmt(messages=[{"role": "user", "content": text}]).prompt
            return self._target.tokenize(prompt, add_special=False, parse_special=True)
        return self._target.tokenize(text, add_special=not chat, parse_special=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._target.detokenize(ids)

    # ------------------------------------------------------------------ KV cache
    @property
    def length(self) -> int:
        return len(self._ids)

    def reset(self) -> None:
        self._ids = []
        self._target.clear()
        for runner, _ in self._pool.values():
            runner.clear()

    def rollback(self, length: int) -> None:
        if not 0 <= length <= len(self._ids):
            raise KnapSpecError(f"cannot roll back to {length} (cache holds {len(self._ids)})")
        del self._ids[length:]
        # the instances catch up lazily; they only forget what they know to be equal
        for runner in self._runners():
            runner.checked = min(runner.checked, length)

    def cached_tokens(self) -> list[int | None] | None:
        return list(self._ids)

    def extend_history(self, tokens: Sequence[int]) -> None:
        """Append verified ``tokens`` to the sequence without running them now: the target
        evaluates them (no logits) when a later ``forward`` or draft needs their KV.

        For loops that verify elsewhere (``knapspec.integrations.llama_cpp``): they show
        this backend the verified history and only ask it to draft.
        """
        tokens = [int(t) for t in tokens]
        self._check_new(tokens)
        self._ids.extend(tokens)

    def _check_new(self, tokens: list[int]) -> None:
        """Raise ``KnapSpecError`` if ``tokens`` would overflow the context or hold an id
        outside the vocabulary."""
        if len(self._ids) + len(tokens) > self.max_context:
            raise KnapSpecError(
                f"context full: {len(self._ids)} + {len(tokens)} tokens > {self.max_context}"
            )
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise KnapSpecError(f"token id {bad[0]} out of range (vocabulary {self.vocab_size})")

    def _runners(self) -> list[LlamaRunner]:
        return [self._target, *(r for r, _ in self._pool.values())]

    # ------------------------------------------------------------------ compute
    def forward(
        self,
        tokens: Sequence[int],
        mask: np.ndarray | None = None,
        *,
        capture: bool = False,
        all_logits: bool = True,
    ) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise KnapSpecError("forward needs at least one token")
        self._check_new(tokens)
        skip = None if mask is None else self.layout.validate_mask(mask, allow_pinned=True)
        p = len(self._ids)
        n_logits = len(tokens) if all_logits else 1
        if skip is None or not skip.any():
            missing = self._catch_up_target(p)
            logits = self._target.eval(missing + tokens, n_logits)
            self._target.checked = len(self._target.ids)
        else:
            runner = self._draft(skip)
            self._catch_up_draft(runner, p)
            logits = runner[0].eval(tokens, n_logits)
            runner[0].checked = len(runner[0].ids)
        self._ids.extend(tokens)
        return logits

    def draft(
        self,
        last: int,
        mask: np.ndarray,
        n: int,
        sampling: SamplingParams,
        rng: np.random.Generator,
        stop_ids: frozenset[int],
        *,
        vocab: int = 0,
        stop_confidence: float = 0.0,
    ) -> tuple[list[int], Any]:
        """``Backend.draft`` with one KV sync per round: the first step gives the draft the
        target's KV of the whole verified history; the later steps attend to the draft's own
        KV of ``last`` and this round's drafted tokens (as on the torch backends), which the
        next round's sync replaces once they are verified.  (Through ``forward`` every step
        would first run the target on the previous drafted token and copy its KV.)

        The full head only (llama.cpp cannot shrink its output layer without remapping
        token ids); ``stop_confidence`` as ``Backend.draft``."""
        skip = self.layout.validate_mask(mask, allow_pinned=True)
        if n < 1 or not skip.any() or vocab:
            return super().draft(last, mask, n, sampling, rng, stop_ids, vocab=vocab,
                                 stop_confidence=stop_confidence)
        first = self.forward([last], skip, all_logits=False)[-1]  # syncs, then one step
        runner = self._draft(skip)[0]
        n = min(n, self.max_context - len(self._ids) + 1)  # the last draft is never run
        tokens: list[int] = []
        probs = []
        logits = first
        for i in range(n):
            tok, q, top = draft_token(logits, sampling, rng, stop_confidence > 0)
            if q is not None:
                probs.append(q)
            tokens.append(tok)
            if tok in stop_ids or i == n - 1 or top < stop_confidence:
                break  # a stop id ends the generation (nothing after it is kept), or unsure
            logits = runner.eval([tok], 1)[-1]  # [V], no sync: the draft's own KV
            self._ids.append(tok)
            runner.checked = len(runner.ids)
        return tokens, (np.stack(probs) if probs else None)

    def _matched(self, runner: LlamaRunner, p: int) -> int:
        """Length of the common prefix of ``runner.ids`` and the history's first ``p``."""
        k, lim = runner.checked, min(len(runner.ids), p)
        ids, hist = runner.ids, self._ids
        while k < lim and ids[k] == hist[k]:
            k += 1
        return k

    def _catch_up_target(self, p: int) -> list[int]:
        """Roll the target back to what it shares with the history; the history tokens it
        lacks (up to ``p``) are returned, to be evaluated with the next call."""
        t = self._target
        k = self._matched(t, p)
        t.rollback(k)
        t.checked = k
        return self._ids[k:p]

    def _catch_up_draft(self, entry: tuple[LlamaRunner, list[int | str | None]], p: int) -> None:
        """Give the draft the target's KV for the history's first ``p`` positions."""
        runner, layer_map = entry
        k = min(self._matched(runner, p), runner.target_kv_until)
        runner.rollback(k)
        if k < p:
            missing = self._catch_up_target(p)
            if missing:  # the target has not seen part of the history yet (no logits)
                self._target.eval(missing, 0)
                self._target.checked = len(self._target.ids)
            t0 = time.perf_counter()
            blob = KVBlob.parse(self._target.get_range(k, p))
            runner.set_range(blob.build(layer_map, self.source.head_dim), k, self._ids[k:p])
            dt = time.perf_counter() - t0
            self._copies.append((p - k, dt))
            del self._copies[:-64]
            self.copy_seconds += dt
        runner.target_kv_until = p
        runner.checked = p

    def _draft(self, mask: np.ndarray) -> tuple[LlamaRunner, list[int | str | None]]:
        """The pooled draft for ``mask``, loaded (and written) if needed."""
        key = np.packbits(mask).tobytes()
        entry = self._pool.get(key)
        if entry is not None:
            self._pool.move_to_end(key)
            return entry
        path = self._files.get(mask)
        t0 = time.perf_counter()
        runner = LlamaRunner(path, self.max_context, self.threads, flash_attn=self.flash_attn)
        self._load_s.append(time.perf_counter() - t0)
        entry = (runner, kv_layer_map(draft_layers(self.source.n_layer, mask)))
        self._pool[key] = entry
        while len(self._pool) > self._pool_size:
            _, (old, _) = self._pool.popitem(last=False)
            old.close()
        return entry

    # ------------------------------------------------------------------ planning support
    def copy_estimate(self, tokens: int) -> float:
        """Predicted seconds to copy ``tokens`` positions of KV into a draft."""
        small = [s for n, s in self._copies if n <= 16]
        large = [(n, s) for n, s in self._copies if n > 256]
        fixed = statistics.median(small) if small else _PRIOR_COPY_FIXED_S
        per = (statistics.median(s / n for n, s in large) if large
               else _PRIOR_COPY_PER_TOKEN_S)
        return fixed + per * tokens if tokens > 0 else 0.0

    def switch_seconds(self, mask: np.ndarray) -> float:
        """Seconds to start drafting with ``mask`` now: nothing for the full model; for a
        pooled draft, copying the KV it lacks; else writing its GGUF (if not cached),
        loading it and copying the whole context's KV."""
        skip = np.asarray(mask, dtype=bool)
        if not skip.any():
            return 0.0
        entry = self._pool.get(np.packbits(skip).tobytes())
        if entry is not None:
            runner = entry[0]
            have = min(self._matched(runner, len(self._ids)), runner.target_kv_until)
            return self.copy_estimate(len(self._ids) - have)
        write = 0.0
        if not self._files.path(skip).is_file():
            ws = self._files.write_seconds
            write = statistics.median(ws) if ws else _PRIOR_WRITE_S
        load = statistics.median(self._load_s) if self._load_s else _PRIOR_LOAD_S
        return write + load + self.copy_estimate(len(self._ids))

    def profile(self, **kwargs: Any) -> Any:
        from .profile import profile_llamacpp

        return profile_llamacpp(self, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_path.name,
            "model_key": self.source.key,
            "dtype": "gguf",
            "threads": self.threads,
            "flash_attn": self.flash_attn,
            "max_context": self.max_context,
            "llama_cpp_python": _bindings_version(),
        }

    def close(self) -> None:
        """Free every llama.cpp context and model of this backend."""
        for runner in self._runners():
            runner.close()
        self._pool.clear()


def _is_eog(runner: LlamaRunner, token: int) -> bool:
    import llama_cpp as L

    return bool(L.llama_vocab_is_eog(runner.vocab, token))


def _vocab_id(runner: LlamaRunner, which: str) -> int:
    import llama_cpp as L

    return int(getattr(L, f"llama_vocab_{which}")(runner.vocab))


def _bindings_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "?"))


__all__ = ["LlamaCppBackend", "default_threads"]
