"""A thin runner over llama-cpp-python's C bindings: one model, one context, our own batch.

The high-level ``llama_cpp.Llama`` either keeps no logits (``logits_all=False``) or
preallocates ``n_ctx x V`` floats for all of them, and offers no sequence-state
transplants, so the backend drives the C API directly: ``llama_decode`` over a batch
whose rows ask for logits only where the loop needs them, ``llama_memory_seq_rm`` to roll
back, and the sequence-state functions (through scratch sequence 1) to copy KV between
contexts.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as L
import numpy as np

from ...errors import KnapSpecError

log = logging.getLogger(__name__)

SCRATCH_SEQ = 1  # sequence used to move a range of positions in and out of a context


def _quiet_llama_logs() -> None:
    """Route llama.cpp's own log lines away from stderr (they are not errors of ours)."""
    try:
        from llama_cpp import _logger

        _logger.set_verbose(False)
    except (ImportError, AttributeError):  # older/newer bindings: keep their default
        pass


_quiet_llama_logs()
L.llama_backend_init()


class LlamaRunner:
    """A llama.cpp model and context; sequence 0 holds the tokens in ``ids``.

    Args:
        path: GGUF file.
        n_ctx: KV cache size in tokens.
        threads: CPU threads for single-token and batch decoding.
        n_batch: most tokens per ``llama_decode`` call (longer inputs are chunked).
        flash_attn: llama.cpp's flash-attention setting (``None``: its default, "auto").
    """

    def __init__(self, path: Path, n_ctx: int, threads: int, n_batch: int = 512,
                 flash_attn: bool | None = None) -> None:
        self.path = path
        self.model = self.ctx = None
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise KnapSpecError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = 2  # sequence 1: scratch for KV range transplants
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if flash_attn is not None:
            cp.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise KnapSpecError(f"llama.cpp could not create a {n_ctx}-token context for {path}")
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = int(L.llama_n_ctx(self.ctx))
        self.n_batch = n_batch
        self._batch = L.llama_batch_init(n_batch, 0, 2)
        self.ids: list[int] = []  # token at each position of sequence 0
        self.checked = 0  # leading positions known to equal the backend's token history
        self.target_kv_until = 0  # (drafts) positions below hold KV copied from the target

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if self.ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # pragma: no cover - depends on garbage collection timing
        try:
            self.close()
        except Exception:  # interpreter shutdown: the C library may be gone
            pass

    # ------------------------------------------------------------------ compute
    def eval(self, tokens: Sequence[int], n_logits: int) -> np.ndarray:
        """Append ``tokens`` to sequence 0 at positions ``len(ids)...``; logits of the last
        ``n_logits`` of them as float32 ``[n_logits, V]`` (``n_logits`` may be 0)."""
        tokens = [int(t) for t in tokens]
        if len(self.ids) + len(tokens) > self.n_ctx:
            raise KnapSpecError(
                f"context full: {len(self.ids)} + {len(tokens)} tokens > {self.n_ctx}"
            )
        first_logit = len(tokens) - n_logits
        out = []
        b = self._batch
        for a in range(0, len(tokens), self.n_batch):
            chunk = tokens[a : a + self.n_batch]
            pos = len(self.ids)
            n_out = 0
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                want = a + i >= first_logit
                b.logits[i] = want
                n_out += want
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise KnapSpecError(f"llama_decode failed with status {rc}")
            self.ids.extend(chunk)
            if n_out:
                ptr = L.llama_get_logits(self.ctx)
                rows = np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,))
                out.append(rows.reshape(n_out, self.n_vocab).copy())
        if not out:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def rollback(self, n: int) -> None:
        """Keep the first ``n`` positions of sequence 0."""
        if n < len(self.ids):
            if not L.llama_memory_seq_rm(self.mem, 0, n, -1):
                raise KnapSpecError(f"llama.cpp could not truncate its KV cache to {n}")
            del self.ids[n:]
        self.checked = min(self.checked, n)
        self.target_kv_until = min(self.target_kv_until, n)

    def clear(self) -> None:
        L.llama_memory_clear(self.mem, True)
        self.ids = []
        self.checked = self.target_kv_until = 0

    # ------------------------------------------------------------------ KV state
    def get_range(self, start: int, end: int) -> ctypes.Array:
        """Serialised KV of positions ``[start, end)`` of sequence 0 (through the scratch
        sequence, so only those cells are written)."""
        L.llama_memory_seq_cp(self.mem, 0, SCRATCH_SEQ, start, end)
        try:
            size = L.llama_state_seq_get_size(self.ctx, SCRATCH_SEQ)
            buf = (ctypes.c_uint8 * size)()
            n = L.llama_state_seq_get_data(self.ctx, buf, size, SCRATCH_SEQ)
            if n != size:
                raise KnapSpecError(f"llama.cpp wrote {n} of {size} state bytes")
        finally:
            L.llama_memory_seq_rm(self.mem, SCRATCH_SEQ, -1, -1)
        return buf

    def set_range(self, blob: bytes, start: int, tokens: Sequence[int]) -> None:
        """Replace positions ``start...`` of sequence 0 by a serialised KV range holding
        ``tokens`` (setting a state wipes its whole sequence, hence the scratch one)."""
        self.rollback(start)
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        try:
            n = L.llama_state_seq_set_data(self.ctx, buf, len(blob), SCRATCH_SEQ)
            if n != len(blob):
                raise KnapSpecError(
                    "llama.cpp refused a KV transplant (state layouts of target and draft "
                    "differ, e.g. in flash attention or KV cache type)"
                )
            L.llama_memory_seq_cp(self.mem, SCRATCH_SEQ, 0, -1, -1)
        finally:
            L.llama_memory_seq_rm(self.mem, SCRATCH_SEQ, -1, -1)
        self.ids.extend(int(t) for t in tokens)

    # ------------------------------------------------------------------ tokenizer
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special,
                                 parse_special)
        return list(buf[:n])

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        arr = (L.llama_token * max(1, len(ids)))(*ids)
        cap = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = L.llama_detokenize(self.vocab, arr, len(ids), buf, cap, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n + 16

    def token_text(self, token: int) -> str:
        """The text of one token, special tokens included (``""`` for an invalid id)."""
        if not 0 <= token < self.n_vocab:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")
