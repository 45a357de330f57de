"""The CPU kernel of each linear weight, chosen per weight shape by a measurement.

Why: on the CPU, ``F.linear`` goes through MKL's ``sgemm``, whose cost at small token counts
``M`` grows far faster than the bytes it reads (issue 10, 1536x8960 fp32, M=1/2/4/8:
5.1/11.1/17.4/17.9 ms, against 3.1/6.9/7.1/7.8 ms with the weight reordered once for
oneDNN).  Verification of ``k`` drafts runs every weight at ``M = k + 1``, so this is the
difference between a verification that costs about one step and one that costs 2-3.

Kernels (``KERNELS``):

* ``dense``: ``F.linear`` (MKL);
* ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on a copy of the weight reordered once
  for oneDNN (what inductor's CPU freezing does);
* ``numba``: ``small_m.linear``, a numba kernel that reads the dense weight once per call
  and computes the ``M`` dot products of each of its rows (float32, ``M <= 16`` only; no
  extra memory; bit-identical rows across ``M``).

How: the ``torch-compile`` backend's block functions call ``linear`` (``torch.ops.knapspec.
linear``, a custom op, so ``torch.compile`` keeps it opaque in its graphs) instead of
``F.linear``.  The op looks its weight up in ``_PACKED`` (keyed by the weight's data pointer,
the entry holding the weight itself so the address cannot be reused while it is registered)
and runs the kernel registered for that token range, else plain ``F.linear``.  The graphs
never depend on the decision, so a different decision never recompiles.

Decision (``PackedLinears.prepack``): once per distinct weight shape and dtype, at backend
setup, the minimum over a few runs (the minimum, not the median: it estimates the kernel's
own cost on a shared CPU) of each candidate kernel on random inputs, for two token ranges:

* ``step`` (``M <= STEP_MAX_TOKENS``: decoding, drafting, verification), measured at
  ``M = 1`` plus ``M = 5`` (one step and a typical verification): ONE kernel for the whole
  range, so a verified row and the same row run alone go through the same kernel (MKL and
  oneDNN are not bit-identical across ``M`` in float32: their differences, measured in the
  tests, leave the argmax unchanged; the numba kernel is bit-identical);
* ``prefill`` (larger ``M``: prompt chunks), measured at ``M = PREFILL_PROBE_TOKENS``
  (``dense`` or ``onednn``).

The decisions, their timings and the extra memory (oneDNN's copies; the dense weights stay:
the block oracle uses them) are logged and returned for ``describe()``.  Nothing is cached on
disk.  A reduced-vocabulary draft head's weight (its own ``[K, D]`` copy of the head's rows)
is registered the same way when the backend first uses it, with its own shape's decision,
so a reduced draft step and a full one both run through ``linear``.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import small_m

log = logging.getLogger(__name__)

#: token counts up to this use the ``step`` decision (decoding, drafting, verification)
STEP_MAX_TOKENS = 16
#: token count at which the ``prefill`` range is measured
PREFILL_PROBE_TOKENS = 128
#: timed runs per (shape, kernel, token count); the decision takes their minimum
PROBE_REPEATS = 5
#: dtypes oneDNN's packed linear accepts here
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
#: the kernels a range can be given (see the module docstring)
KERNELS = ("dense", "onednn", "numba")
#: what each ``backend.prepack`` mode does (``auto``: measure every kernel that applies)
MODES = ("auto", "on", "numba", "off")


@dataclass
class _Entry:
    """One registered weight."""

    weight: torch.Tensor  # [N, K] the dense weight (kept alive: its address is the key)
    packed: torch.Tensor | None  # oneDNN-layout copy of ``weight``, when a range uses it
    step: str  # kernel for M <= STEP_MAX_TOKENS (one of KERNELS)
    prefill: str  # kernel for larger M ("dense" or "onednn")
    owners: int = 1  # backends that registered this weight (tied weights, shared models)
    dense: np.ndarray | None = None  # [N, K] a NumPy view of ``weight`` (the numba kernel's)


_PACKED: dict[int, _Entry] = {}


def available() -> bool:
    """Whether oneDNN's packed linear exists in this torch build."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] through the prepacked weight -> [..., N]."""
    lead = x.shape[:-1]
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, b, "none", [], "")
    return y.view(*lead, y.shape[-1])


def _numba_linear(x: torch.Tensor, w: np.ndarray, b: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] float32 on the CPU times ``w`` [N, K] (a NumPy view of the dense weight)
    through ``small_m.linear`` -> [..., N], in torch's thread count."""
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    y = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.float32)  # [M, N]
    small_m.linear(x2.numpy(), w, y.numpy(), threads=torch.get_num_threads())
    if b is not None:
        y += b
    return y.view(*lead, w.shape[0])


def _linear_impl(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    entry = _PACKED.get(w.data_ptr()) if x.device.type == "cpu" else None
    if entry is not None and entry.weight.shape == w.shape:
        m = x.numel() // max(int(x.shape[-1]), 1)  # token rows
        kernel = entry.step if m <= STEP_MAX_TOKENS else entry.prefill
        if kernel == "onednn" and entry.packed is not None:
            return _packed_linear(x.contiguous(), entry.packed, b)
        if kernel == "numba" and entry.dense is not None and x.dtype == torch.float32:
            return _numba_linear(x, entry.dense, b)
    return F.linear(x, w, b)


def _dispatch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The op's kernel: this module's ``_linear_impl``, looked up at call time, so that a
    re-import of the module (the op stays registered once per process) uses its registry."""
    module = sys.modules.get(__name__)
    return getattr(module, "_linear_impl", _linear_impl)(x, w, b)


def _linear_fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _register() -> torch.library.Library | None:
    """Define ``knapspec::linear`` unless this process already has (module re-import)."""
    if hasattr(torch.ops.knapspec, "linear"):
        return None
    lib = torch.library.Library("knapspec", "FRAGMENT")
    lib.define("linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
    lib.impl("linear", _dispatch, "CompositeExplicitAutograd")
    torch.library.register_fake("knapspec::linear", _linear_fake, lib=lib)
    return lib


_LIB = _register()  # kept: the registration lives as long as the Library object


#: ``F.linear`` through the registered kernels: x [..., K], w [N, K], b [N] -> [..., N]
linear = torch.ops.knapspec.linear.default


def _min_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up (oneDNN creates its primitive, numba loads or compiles its kernel)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _shape_key(w: torch.Tensor) -> str:
    """``"NxK dtype"``, the key of a weight shape's decision."""
    return f"{w.shape[0]}x{w.shape[1]} {str(w.dtype).removeprefix('torch.')}"


def _numba_ok(w: torch.Tensor) -> bool:
    return w.dtype == torch.float32 and w.is_contiguous() and small_m.available()


def measure_kernels(
    w: torch.Tensor, packed: torch.Tensor | None, tokens: Iterable[int],
    kernels: Iterable[str], repeats: int = PROBE_REPEATS,
) -> dict[str, float]:
    """Summed minimum seconds of each of ``kernels`` (names in ``KERNELS``) on ``w``
    [N, K] over random inputs of each token count in ``tokens``."""
    gen = torch.Generator().manual_seed(0)
    dense_np = w.detach().numpy() if "numba" in kernels else None
    run = {
        "dense": lambda x: F.linear(x, w),
        "onednn": lambda x: _packed_linear(x, packed, None),
        "numba": lambda x: _numba_linear(x, dense_np, None),
    }
    out = dict.fromkeys(kernels, 0.0)
    with torch.inference_mode():
        for m in tokens:
            x = torch.randn(m, w.shape[1], generator=gen).to(w.dtype)
            for k in out:
                out[k] += _min_seconds(lambda k=k, x=x: run[k](x), repeats)
    return out


def measure_shape(
    w: torch.Tensor, packed: torch.Tensor, tokens: Iterable[int], repeats: int = PROBE_REPEATS
) -> tuple[float, float]:
    """Summed minimum seconds of ``F.linear`` and of the packed kernel on ``w`` [N, K] over
    random inputs of each token count in ``tokens``."""
    t = measure_kernels(w, packed, tokens, ("dense", "onednn"), repeats)
    return t["dense"], t["onednn"]


@dataclass
class PackedLinears:
    """The weights one backend registered, and why (unregistered when the owner dies).

    ``decisions`` maps ``"NxK dtype"`` to ``{"step": kernel, "prefill": kernel, "step_ms":
    {kernel: ms}, "prefill_ms": {kernel: ms}}`` (kernels from ``KERNELS``; milliseconds,
    the decision's timings).
    """

    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)  # per weight shape
    keys: list[int] = field(default_factory=list)  # data pointers registered in _PACKED
    nbytes: int = 0  # bytes of the oneDNN copies (the dense weights stay)
    setup_seconds: float = 0.0  # spent measuring and packing (every ``prepack`` call)
    policy: str | None = None  # the whole-step policy chosen (``choose``), None: per shape
    policy_ms: dict[str, float] = field(default_factory=dict)  # its timings, per policy

    def prepack(self, weights: Iterable[torch.Tensor], mode: str = "auto") -> None:
        """Give every 2-D CPU weight of a packable dtype the kernels that are faster for it.

        ``mode``: ``"auto"`` measures each distinct shape (see the module docstring),
        ``"on"`` packs every weight for oneDNN in both ranges without measuring,
        ``"numba"`` runs the step range of every float32 weight through the numba kernel
        (oneDNN for prefill) without measuring, ``"off"`` registers none.
        """
        if mode == "off" or not available():
            return
        t0 = time.perf_counter()
        for w in weights:
            if w.device.type != "cpu" or w.dtype not in PACKABLE_DTYPES or w.dim() != 2:
                continue
            key = w.data_ptr()
            if key in self.keys:
                continue  # tied weight, already registered by this owner
            shape = _shape_key(w)
            shared = _PACKED.get(key)
            if shared is not None and shared.weight.shape == w.shape:
                # another backend over the same model registered it: share its decision
                shared.owners += 1
                self.keys.append(key)
                self.decisions.setdefault(
                    shape, {"step": shared.step, "prefill": shared.prefill, "shared": True}
                )
                continue
            choice = self.decisions.get(shape)
            if choice is not None and choice.get("error"):
                continue
            try:  # oneDNN refuses what this CPU lacks an instruction set for
                packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
                if choice is None:
                    choice = self.decisions[shape] = self._decide(w, packed, mode)
            except RuntimeError as exc:
                log.info("prepack %s: not packed, oneDNN refused it (%s)", shape, exc)
                self.decisions[shape] = {"step": "dense", "prefill": "dense",
                                         "error": str(exc)}
                continue
            # under ``auto`` a numba-capable weight keeps every kernel at hand until
            # ``choose`` keeps the policy timed fastest on whole steps (``policies``)
            keep_all = mode == "auto" and _numba_ok(w)
            if choice["step"] == "dense" and choice["prefill"] == "dense" and not keep_all:
                continue
            _PACKED[key] = _Entry(
                w, packed, choice["step"], choice["prefill"],
                dense=w.detach().numpy() if keep_all or choice["step"] == "numba" else None,
            )
            self.keys.append(key)
        if self.policy is not None:  # weights registered later follow the chosen policy
            self.apply(self.policies().get(self.policy, {}))
        self.trim(keep_alternatives=mode == "auto" and self.policy is None)
        self.setup_seconds += time.perf_counter() - t0
        for shape, c in self.decisions.items():
            log.info(
                "prepack %s: step (M<=%d) %s [%s ms], prefill %s [%s ms]",
                shape, STEP_MAX_TOKENS, c["step"], c.get("step_ms"), c["prefill"],
                c.get("prefill_ms"),
            )  # fmt: skip
        log.info(
            "prepack: %d weights registered (%.0f MiB extra), %.1f s", len(self.keys),
            self.nbytes / 2**20, self.setup_seconds,
        )  # fmt: skip

    @staticmethod
    def _decide(w: torch.Tensor, packed: torch.Tensor, mode: str) -> dict[str, Any]:
        numba_ok = _numba_ok(w)
        if mode == "on" or (mode == "numba" and not numba_ok):
            return {"step": "onednn", "prefill": "onednn"}
        if mode == "numba":
            return {"step": "numba", "prefill": "onednn"}
        step = measure_kernels(w, packed, (1, 5),
                               ("dense", "onednn", "numba") if numba_ok else ("dense", "onednn"))
        prefill = measure_kernels(w, packed, (PREFILL_PROBE_TOKENS,), ("dense", "onednn"),
                                  repeats=2)
        return {
            "step": min(step, key=step.__getitem__),
            "prefill": min(prefill, key=prefill.__getitem__),
            "step_ms": {k: round(s * 1e3, 3) for k, s in step.items()},
            "prefill_ms": {k: round(s * 1e3, 3) for k, s in prefill.items()},
        }

    # ------------------------------------------------------------------ whole-step policy
    def policies(self) -> dict[str, dict[int, str]]:
        """Step-range kernel assignments worth timing on whole steps: ``{name: {key:
        kernel}}`` over this owner's weights (empty when there is no choice to make).

        * ``per-shape``: each shape's own fastest kernel (the ``auto`` decisions);
        * ``torch``: each shape's fastest of ``dense`` and ``onednn`` (torch's thread pool);
        * ``numba``: the numba kernel for every weight that takes it.

        Why whole steps: numba's and torch's thread pools are two OpenMP runtimes (numba's
        and torch's own ``libgomp``), and a pool's threads spin for a while after each
        parallel region; a forward that alternates between them pays for it on a 2-core
        CPU, a cost no per-shape measurement sees.
        """
        entries = {k: _PACKED[k] for k in self.keys if k in _PACKED}
        if not any(e.dense is not None and e.packed is not None for e in entries.values()):
            return {}
        out: dict[str, dict[int, str]] = {"per-shape": {}, "torch": {}, "numba": {}}
        for k, e in entries.items():
            c = self.decisions.get(_shape_key(e.weight), {})
            ms = c.get("step_ms") or {}
            out["per-shape"][k] = c.get("step", e.step)  # not e.step: ``apply`` moves it
            torch_ms = {n: ms[n] for n in ("dense", "onednn") if n in ms}
            out["torch"][k] = min(torch_ms, key=torch_ms.__getitem__) if torch_ms else e.step
            out["numba"][k] = "numba" if e.dense is not None else out["torch"][k]
        return out

    def apply(self, policy: dict[int, str]) -> None:
        """Set the step-range kernel of each weight in ``policy`` (``{key: kernel}``)."""
        for k, kernel in policy.items():
            entry = _PACKED.get(k)
            if entry is not None:
                entry.step = kernel

    def choose(self, name: str, timings: dict[str, float] | None = None) -> None:
        """Keep policy ``name`` (of ``policies()``) for good, and drop the rest."""
        self.apply(self.policies().get(name, {}))
        self.policy = name
        self.policy_ms = dict(timings or {})
        self.trim()
        log.info("linear kernels: policy %s chosen on whole steps (%s ms)", name,
                 self.policy_ms)

    def trim(self, keep_alternatives: bool = False) -> None:
        """Drop what no range of a weight uses (oneDNN copies, NumPy views), unless
        ``keep_alternatives`` (a policy is still to be chosen), and recount the extra
        bytes (the oneDNN copies held)."""
        self.nbytes = 0
        for k in self.keys:
            e = _PACKED.get(k)
            if e is None:
                continue
            if not keep_alternatives:
                if "onednn" not in (e.step, e.prefill):
                    e.packed = None
                if e.step != "numba":
                    e.dense = None
            if e.packed is not None:
                self.nbytes += e.weight.numel() * e.weight.element_size()

    def release(self) -> None:
        """Unregister this owner's weights."""
        release(self.keys)
        self.keys = []

    def attach(self, owner: Any) -> None:
        """Unregister the weights when ``owner`` is garbage-collected (those registered
        later too: reduced draft heads are packed when first used)."""
        weakref.finalize(owner, self.release)

    def describe(self) -> dict[str, Any]:
        return {
            "prepacked_weights": len(self.keys),
            "prepacked_mib": round(self.nbytes / 2**20, 1),
            "prepack_decisions": self.decisions,
            "kernel_policy": self.policy,
            "kernel_policy_ms": self.policy_ms,
        }


def release(keys: Iterable[int]) -> None:
    """Drop one owner's hold on the registered weights ``keys`` (data pointers); a weight
    is unregistered when its last owner lets go."""
    for k in keys:
        entry = _PACKED.get(k)
        if entry is not None:
            entry.owners -= 1
            if entry.owners <= 0:
                del _PACKED[k]
