"""Draft GGUF files: the target's own weights minus the skipped blocks, as a ``deci`` model.

llama.cpp has no layer-skip switch, but its ``deci`` architecture (written for
Nemotron-NAS) builds a model from per-layer head counts and FFN sizes.  A draft for a skip
mask is therefore a new GGUF file holding the target's tensors (raw bytes, no
requantisation) with per-layer arrays that say which blocks exist.  What the ``deci``
graph does with each per-layer encoding (read in llama.cpp ``src/models/deci.cpp``, and
measured, see ``docs/notes/llamacpp-deci-feasibility.md``)::

    n_head > 0, n_head_kv > 0   normal attention
    n_head = 0                  attention-free layer (input passes through)
    n_head > 0, n_head_kv = 0   "linear attention": x + wo @ norm(x); wo = 0 -> identity
    n_ff = 0                    the layer's attention output is *dropped* (trap): not used
    n_ff > 0                    SwiGLU FFN; an all-zero FFN of size 1 is an exact identity

so the writer encodes, per target layer ``i`` (attention block ``2i``, MLP block ``2i+1``)::

    both kept            copy both
    attention only kept  copy attention, zero FFN of size 1
    MLP only kept        n_head = 0, copy the FFN
    both skipped         drop the layer (layers are renumbered; RoPE is per position)

plus two fix-ups llama.cpp needs: the head size is derived from layer 0, so a first layer
without attention becomes a zero "linear attention"; and a context needs at least one KV
layer, so a draft without any attention gets a 1-head all-zero attention layer.

Parsing a GGUF's metadata with ``gguf.GGUFReader`` takes seconds (tens of thousands of
vocabulary entries); the result is cached as a small JSON index per file, so each later
draft costs only the write (~0.3 s for the 98 MB default model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..._io import atomic_write_text
from ...errors import KnapSpecError

log = logging.getLogger(__name__)

#: bump when the draft encoding changes, so cached drafts of the old encoding are not reused
DRAFT_FORMAT = 1
#: architectures whose layers the ``deci`` graph reproduces exactly
DRAFTABLE = ("llama", "qwen2")
#: architectures whose GGUF uses NEOX RoPE (half-split lanes): their q/k rows are permuted
#: to the interleaved order of ``deci``'s NORM RoPE, and the target is run as a no-skip
#: ``deci`` file too, so that target and drafts share one K layout for transplants
NEOX_ROPE = ("qwen2",)
_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
_ZERO_FF = 1  # rows of the all-zero identity FFN (1 is the smallest that works)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in the source file."""

    name: str
    np_shape: tuple[int, ...]  # numpy shape of the raw data (quantised: [rows, row bytes])
    np_dtype: str  # numpy dtype of the raw data (uint8 for quantised types)
    ggml_type: int  # GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


class GgufSource:
    """A GGUF model's metadata and tensor locations, parsed once and cached as JSON.

    Attributes:
        arch: ``general.architecture``.
        n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim: hyperparameters.
        fields: ``[(key, value, value_type, sub_type)]`` metadata, strings as bytes.
        tensors: name -> ``TensorInfo``.
    """

    def __init__(self, path: str | os.PathLike[str], index_dir: Path | None = None) -> None:
        self.path = Path(path)
        st = self.path.stat()
        self.key = hashlib.sha256(
            f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
        ).hexdigest()[:16]
        index = None
        index_path = None if index_dir is None else index_dir / f"index-{self.key}.json"
        if index_path is not None and index_path.is_file():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                index = None
        if index is None:
            t0 = time.perf_counter()
            index = _read_index(self.path)
            log.info("parsed %s in %.2f s", self.path.name, time.perf_counter() - t0)
            if index_path is not None:
                index_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(index_path, json.dumps(index))
        self.fields = [(k, _decode_value(v, vt, st_), vt, st_) for k, v, vt, st_ in index["fields"]]
        self.tensors = {t["name"]: TensorInfo(
            t["name"], tuple(t["np_shape"]), t["np_dtype"], t["ggml_type"], t["offset"],
            t["nbytes"]) for t in index["tensors"]}
        meta = {k: v for k, v, _, _ in self.fields}
        self.arch = meta["general.architecture"].decode()
        if self.arch not in DRAFTABLE:
            raise KnapSpecError(
                f"the llamacpp backend drafts only {', '.join(DRAFTABLE)} GGUF models; "
                f"{self.path.name} is {self.arch!r} (use the torch backend for it)"
            )

        def hp(name: str) -> int:
            value = meta[f"{self.arch}.{name}"]
            if isinstance(value, list):
                raise KnapSpecError(f"{self.path.name}: per-layer {name} is not supported")
            return int(value)

        self.n_layer = hp("block_count")
        self.n_embd = hp("embedding_length")
        self.n_ff = hp("feed_forward_length")
        self.n_head = hp("attention.head_count")
        self.n_head_kv = hp("attention.head_count_kv")
        self.head_dim = self.n_embd // self.n_head
        self._data: np.memmap | None = None

    def data(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name`` as a numpy view (memory-mapped)."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        t = self.tensors[name]
        raw = self._data[t.offset : t.offset + t.nbytes]
        return raw.view(np.dtype(t.np_dtype)).reshape(t.np_shape)


def _read_index(path: Path) -> dict[str, Any]:
    """Metadata and tensor locations of a GGUF file, as JSON-friendly data."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(path)
    fields = []
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                value: Any = [bytes(f.parts[i]).decode("latin-1") for i in f.data]
            else:
                value = [_scalar(f.parts[i][0]) for i in f.data]
        elif vtype == GGUFValueType.STRING:
            value = bytes(f.parts[f.data[0]]).decode("latin-1")
        else:
            value = _scalar(f.parts[f.data[0]][0])
        fields.append([key, value, int(vtype), None if sub is None else int(sub)])
    tensors = [
        {
            "name": t.name,
            "np_shape": list(t.data.shape),
            "np_dtype": t.data.dtype.str,
            "ggml_type": int(t.tensor_type),
            "offset": int(t.data_offset),
            "nbytes": int(t.n_bytes),
        }
        for t in r.tensors
    ]
    return {"fields": fields, "tensors": tensors}


def _scalar(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _decode_value(value: Any, vtype: int, sub: int | None) -> Any:
    """Strings back to bytes (the index stores them latin-1 decoded, byte for byte)."""
    from gguf import GGUFValueType

    if vtype == GGUFValueType.STRING:
        return value.encode("latin-1")
    if vtype == GGUFValueType.ARRAY and sub == GGUFValueType.STRING:
        return [v.encode("latin-1") for v in value]
    return value


# ----------------------------------------------------------------------------- layer plan


@dataclass(frozen=True)
class DraftLayer:
    """One layer of a draft model and where its weights come from."""

    source: int | None  # target layer index (None: a synthetic identity layer)
    attn: str  # "copy", "none" (n_head 0), "linear0" (wo = 0 identity), "dummy" (zero KV)
    mlp: str  # "copy" or "zero" (all-zero FFN of size 1: exact identity)


def draft_layers(n_layer: int, mask: np.ndarray) -> list[DraftLayer]:
    """The draft's layers for a ``[2L]`` skip mask (True = skipped), in order."""
    plan: list[list[Any]] = []
    for i in range(n_layer):
        attn_kept, mlp_kept = not mask[2 * i], not mask[2 * i + 1]
        if attn_kept or mlp_kept:
            plan.append([i, "copy" if attn_kept else "none", "copy" if mlp_kept else "zero"])
    if not plan:
        plan.append([None, "none", "zero"])
    if not any(a == "copy" for _, a, _ in plan):
        plan[0][1] = "dummy"  # llama.cpp needs one KV layer per context
    elif plan[0][1] == "none":
        plan[0][1] = "linear0"  # the head size is read from layer 0's head count
    return [DraftLayer(s, a, m) for s, a, m in plan]


def kv_layer_map(layers: list[DraftLayer]) -> list[int | str | None]:
    """For each draft layer: the target layer whose KV it holds, ``"zeros"`` (the 1-head
    dummy attention) or ``None`` (no KV)."""
    return [
        layer.source if layer.attn == "copy" else ("zeros" if layer.attn == "dummy" else None)
        for layer in layers
    ]


def write_draft(src: GgufSource, mask: np.ndarray, dst: Path) -> None:
    """Write the ``deci`` draft GGUF for ``mask`` to ``dst`` atomically (temp file + rename).

    One function of ~90 lines on purpose: the metadata, per-layer shapes and tensor copies
    must be written in the GGUF writer's order inside one try/finally that removes the
    temporary file on any failure.
    """
    from gguf import GGUFValueType, GGUFWriter

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (2 * src.n_layer,):
        raise KnapSpecError(f"mask must have {2 * src.n_layer} entries, got {mask.shape}")
    layers = draft_layers(src.n_layer, mask)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        w = GGUFWriter(tmp, "deci")
        prefix = f"{src.arch}."
        for key, value, vtype, sub in src.fields:
            if key == "general.architecture":
                continue
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if rest in _PER_LAYER_KEYS or rest == "block_count":
                    continue
                key = "deci." + rest
            w.add_key_value(key, value, GGUFValueType(vtype),
                            None if sub is None else GGUFValueType(sub))
        hd = src.head_dim
        w.add_uint32("deci.block_count", len(layers))
        w.add_array("deci.attention.head_count", [
            src.n_head if la.attn in ("copy", "linear0") else (1 if la.attn == "dummy" else 0)
            for la in layers])
        w.add_array("deci.attention.head_count_kv", [
            src.n_head_kv if la.attn == "copy" else (1 if la.attn == "dummy" else 0)
            for la in layers])
        w.add_array("deci.feed_forward_length",
                    [src.n_ff if la.mlp == "copy" else _ZERO_FF for la in layers])
        if not any(k == f"{prefix}attention.key_length" for k, *_ in src.fields):
            w.add_uint32("deci.attention.key_length", hd)
            w.add_uint32("deci.attention.value_length", hd)

        order: list[np.ndarray] = []

        neox = src.arch in NEOX_ROPE

        def copy(name: str, new: str) -> None:
            t = src.tensors[name]
            data = src.data(name)
            if neox and name.split(".")[-2] in ("attn_q", "attn_k"):
                data = _neox_to_norm_rows(data, hd)
            w.add_tensor_info(new, data.shape, data.dtype, t.nbytes, _qtype(t.ggml_type))
            order.append(data)

        def synth(new: str, arr: np.ndarray) -> None:
            w.add_tensor_info(new, arr.shape, arr.dtype, arr.nbytes)
            order.append(arr)

        for name in ("token_embd.weight", "output_norm.weight", "output.weight",
                     "rope_freqs.weight"):
            if name in src.tensors:
                copy(name, name)
        d = src.n_embd
        for j, la in enumerate(layers):
            i = la.source
            if la.attn == "copy":
                for s in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"):
                    copy(f"blk.{i}.{s}.weight", f"blk.{j}.{s}.weight")
                for s in ("attn_q", "attn_k", "attn_v", "attn_output"):
                    if f"blk.{i}.{s}.bias" in src.tensors:
                        copy(f"blk.{i}.{s}.bias", f"blk.{j}.{s}.bias")
            elif la.attn == "linear0":
                synth(f"blk.{j}.attn_norm.weight", np.ones(d, np.float32))
                synth(f"blk.{j}.attn_output.weight", np.zeros((d, d), np.float16))
            elif la.attn == "dummy":
                synth(f"blk.{j}.attn_norm.weight", np.ones(d, np.float32))
                for s in ("attn_q", "attn_k", "attn_v"):
                    synth(f"blk.{j}.{s}.weight", np.zeros((hd, d), np.float16))
                synth(f"blk.{j}.attn_output.weight", np.zeros((d, hd), np.float16))
            if la.mlp == "copy":
                for s in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
                    copy(f"blk.{i}.{s}.weight", f"blk.{j}.{s}.weight")
            else:
                synth(f"blk.{j}.ffn_norm.weight", np.ones(d, np.float32))
                synth(f"blk.{j}.ffn_gate.weight", np.zeros((_ZERO_FF, d), np.float32))
                synth(f"blk.{j}.ffn_up.weight", np.zeros((_ZERO_FF, d), np.float32))
                synth(f"blk.{j}.ffn_down.weight", np.zeros((d, _ZERO_FF), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for arr in order:
            w.write_tensor_data(arr)
        w.close()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def _neox_to_norm_rows(data: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection (or its bias) within each head from the
    half-split lane order of NEOX RoPE to the interleaved order of NORM RoPE: new lane
    ``2i`` = old ``i``, ``2i+1`` = old ``i + head_dim/2``.  Rows are whole quantisation
    units, so this is a byte copy; q and k get the same order, so q.k is unchanged."""
    half = head_dim // 2
    lane = np.empty(head_dim, dtype=np.int64)
    lane[0::2] = np.arange(half)
    lane[1::2] = np.arange(half) + half
    rows = data.shape[0]
    if rows % head_dim:
        raise KnapSpecError(f"q/k projection with {rows} rows is not whole heads of {head_dim}")
    order = (np.arange(rows // head_dim)[:, None] * head_dim + lane[None, :]).ravel()
    return np.ascontiguousarray(data[order])


def _qtype(value: int) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(value)


# ----------------------------------------------------------------------------- file cache


class DraftFiles:
    """Content-addressed draft GGUFs of one source model, bounded in total size.

    A draft's file name is the hash of (source key, mask, ``DRAFT_FORMAT``), so the same
    mask is written once and reused across processes.  After each write the oldest files
    (by access time) are deleted until the folder is under ``max_bytes``; the file just
    written always stays.
    """

    def __init__(self, src: GgufSource, folder: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise KnapSpecError(f"draft cache size must be positive, got {max_bytes} bytes")
        self.src = src
        self.folder = folder
        self.max_bytes = max_bytes
        self.write_seconds: list[float] = []  # measured writes, for switch-cost estimates
        self.pinned: set[Path] = set()  # files in use that eviction must keep

    def path(self, mask: np.ndarray) -> Path:
        bits = np.packbits(np.asarray(mask, dtype=bool)).tobytes()
        h = hashlib.sha256(self.src.key.encode() + bits + bytes([DRAFT_FORMAT])).hexdigest()
        return self.folder / f"draft-{h[:20]}.gguf"

    def get(self, mask: np.ndarray) -> Path:
        """The draft file for ``mask``, written now if it is not cached."""
        p = self.path(mask)
        if p.is_file():
            os.utime(p)  # most recently used
            return p
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_draft(self.src, mask, p)
        self.write_seconds.append(time.perf_counter() - t0)
        log.info("wrote draft %s (%.0f MB) in %.2f s", p.name, p.stat().st_size / 1e6,
                 self.write_seconds[-1])
        self._evict(keep=p)
        return p

    def _evict(self, keep: Path) -> None:
        files = []
        for f in self.folder.glob("draft-*.gguf"):
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            if f == keep or f in self.pinned:
                continue
            f.unlink(missing_ok=True)
            total -= size
            log.info("evicted draft %s", f.name)
