"""Per-layer KV transplants between llama.cpp contexts through the sequence-state API.

``llama_state_seq_get_data`` serialises one sequence's KV cells; the layout of the
llama.cpp vendored by llama-cpp-python 0.3.36 (one stream, ``kv_unified``) is::

    8-byte prefix | u32 n_stream (=1) | u32 cell_count | cells: (i32 pos, u32 n_seq, i32 seq[n_seq])
    u32 v_trans | u32 n_layer
    per layer K:  i32 type, u64 row_bytes, row_bytes * cell_count bytes
    per layer V:  not v_trans: i32 type, u64 row_bytes, rows
                  v_trans:     i32 type, u32 element_bytes, u32 n_embd_v, elements

A draft keeps a subset of the target's attention layers, renumbered; its blob is the
target's with those layers' rows (attention-free draft layers get width-0 entries, as the
draft itself would write them).  Rows are copied as bytes: the transplant is exact.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import KnapSpecError

_PREFIX = 8


@dataclass
class KVBlob:
    """One sequence's serialised KV, split per layer (views into the original bytes)."""

    head: bytes  # prefix, n_stream, cell_count and the cells
    cell_count: int  # cells (positions) in the blob
    v_trans: int  # 1 if V is stored transposed (no flash attention)
    k: list[tuple[int, int, memoryview]]  # per layer: (type, row_bytes, data)
    v: list[tuple[int, bytes, memoryview]]  # per layer: (type, header after type, data)

    @classmethod
    def parse(cls, blob: bytes | bytearray | memoryview) -> KVBlob:
        mv = memoryview(blob).cast("B")
        o = _PREFIX
        n_stream, cell_count = struct.unpack_from("<II", mv, o)
        o += 8
        if n_stream != 1:
            raise KnapSpecError(f"KV state with {n_stream} streams is not supported")
        for _ in range(cell_count):
            _pos, n_seq = struct.unpack_from("<iI", mv, o)
            o += 8 + 4 * n_seq
        head = bytes(mv[:o])
        v_trans, n_layer = struct.unpack_from("<II", mv, o)
        o += 8
        k = []
        for _ in range(n_layer):
            kt, row = struct.unpack_from("<iQ", mv, o)
            o += 12
            n = row * cell_count
            k.append((kt, row, mv[o : o + n]))
            o += n
        v = []
        for _ in range(n_layer):
            (vt,) = struct.unpack_from("<i", mv, o)
            o += 4
            hdr = bytes(mv[o : o + 8])
            if v_trans:
                el, n_embd = struct.unpack_from("<II", mv, o)
                n = el * n_embd * cell_count
            else:
                (row,) = struct.unpack_from("<Q", mv, o)
                n = row * cell_count
            o += 8
            v.append((vt, hdr, mv[o : o + n]))
            o += n
        if o != len(mv):
            raise KnapSpecError(
                f"unexpected KV state layout ({len(mv) - o} trailing bytes): this llama.cpp "
                "build serialises sequences differently from the one knapspec supports"
            )
        return cls(head, cell_count, v_trans, k, v)

    def build(self, layer_map: list[int | str | None], dummy_width: int) -> bytes:
        """A blob for a draft whose layer ``j`` holds this blob's layer ``layer_map[j]``;
        ``None``: no KV (width 0); ``"zeros"``: a 1-head dummy attention of ``dummy_width``
        values per token (zeros; its output is multiplied by a zero ``wo``)."""
        kt0, _, _ = self.k[0]
        vt0, hdr0, _ = self.v[0]
        el = struct.unpack("<II", hdr0)[0] if self.v_trans else 0
        parts: list[bytes | memoryview] = [self.head,
                                           struct.pack("<II", self.v_trans, len(layer_map))]
        elem = 2  # F16 KV (llama.cpp's default cache type)
        for src in layer_map:
            if src is None:
                parts.append(struct.pack("<iQ", kt0, 0))
            elif src == "zeros":
                parts += [struct.pack("<iQ", kt0, elem * dummy_width),
                          bytes(elem * dummy_width * self.cell_count)]
            else:
                kt, row, data = self.k[src]
                parts += [struct.pack("<iQ", kt, row), data]
        for src in layer_map:
            if src is None:
                empty = struct.pack("<II", el, 0) if self.v_trans else struct.pack("<Q", 0)
                parts += [struct.pack("<i", vt0), empty]
            elif src == "zeros":
                hdr = (struct.pack("<II", elem, dummy_width) if self.v_trans
                       else struct.pack("<Q", elem * dummy_width))
                parts += [struct.pack("<i", vt0), hdr,
                          bytes(elem * dummy_width * self.cell_count)]
            else:
                vt, hdr, data = self.v[src]
                parts += [struct.pack("<i", vt), hdr, data]
        return b"".join(parts)
