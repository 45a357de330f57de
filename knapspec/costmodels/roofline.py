"""An analytic cost model: a roofline per block, from architecture and hardware specs.

Each block takes ``max(FLOPs / (peak_flops * flops_efficiency),
bytes / (mem_bandwidth * bandwidth_efficiency)) + block_overhead_s`` seconds, i.e. it is
either compute bound or memory bound, plus a fixed launch / dispatch cost.  With ``D``
hidden size, ``H`` query heads, ``KV`` key/value heads, ``hd`` head width, ``F`` MLP
width, ``V`` vocabulary, ``b`` bytes per weight, ``b_kv`` bytes per cached element,
``c`` cached tokens and ``n`` new tokens:

* attention block: ``P_a = D*H*hd + 2*D*KV*hd + H*hd*D`` weights (q, k, v, o);
  bytes ``P_a*b + 2*KV*hd*(c+n)*b_kv`` (KV cache read) ``+ 2*KV*hd*n*b_kv`` (written);
  FLOPs ``2*n*P_a + 4*n*H*hd*(c+n)`` (projections, then QK^T and AV; ``c+n`` bounds
  the causal span of each new token from above).
* MLP block (gated): ``3*D*F`` weights; bytes ``3*D*F*b``; FLOPs ``2*n*3*D*F``.
* head: ``D*V`` weights (tied or not, the matrix is read once); FLOPs ``2*n*D*V``.
* ``overhead(n) = step_overhead_s``.

Activations, norms, rotary embeddings and biases are ignored: they are ``O(n*D)`` bytes
and FLOPs, negligible next to ``O(D^2)`` weights for the token counts of decoding.
Use it to plan before any profiling, or for hardware one does not have; a measured
``TableCostModel`` / fitted ``LinearCostModel`` is more faithful on a real machine.
"""

from __future__ import annotations

from typing import Any

from ..errors import KnapSpecError
from .base import (
    CostModel,
    check_context,
    check_n_tokens,
    check_param_keys,
    register_cost_model,
)
from .specs import DecoderSpec, HardwareSpec, get_hardware_spec, get_model_spec


@register_cost_model
class RooflineCostModel(CostModel):
    """Roofline latencies for ``model`` on ``hardware`` (see the module docstring).

    Args:
        model: architecture (``DecoderSpec``).
        hardware: device (``HardwareSpec``).
        kv_dtype_bytes: bytes per cached K/V element; default ``model.dtype_bytes``.
        meta: free-form provenance, saved with the model.
    """

    kind = "roofline"

    def __init__(
        self,
        model: DecoderSpec,
        hardware: HardwareSpec,
        kv_dtype_bytes: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(meta)
        if not isinstance(model, DecoderSpec):
            raise KnapSpecError(f"model: expected a DecoderSpec, got {type(model).__name__}")
        if not isinstance(hardware, HardwareSpec):
            raise KnapSpecError(
                f"hardware: expected a HardwareSpec, got {type(hardware).__name__}"
            )
        if kv_dtype_bytes is not None:
            try:
                kv = float(kv_dtype_bytes)
            except (TypeError, ValueError):
                kv = float("nan")
            if isinstance(kv_dtype_bytes, bool) or not (kv > 0 and kv < float("inf")):
                raise KnapSpecError(
                    f"kv_dtype_bytes: expected a finite number > 0 or null, got {kv_dtype_bytes!r}"
                )
            kv_dtype_bytes = kv
        self.model = model
        self.vocab_size = int(model.vocab_size)  # a reduced head's weight traffic scales by K/V
        self.hardware = hardware
        self.kv_dtype_bytes = kv_dtype_bytes
        self._kv_bytes = model.dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
        self._flops = hardware.effective_flops
        self._bw = hardware.effective_bandwidth

    def _roof(self, flops: float, nbytes: float) -> float:
        """Seconds for one kernel group: compute- or memory-bound, plus launch overhead."""
        return max(flops / self._flops, nbytes / self._bw) + self.hardware.block_overhead_s

    # ------------------------------------------------------------------ per-block work
    def attention_work(self, context: float, n_tokens: int = 1) -> tuple[float, float]:
        """``(FLOPs, bytes)`` of one attention block at ``context`` with ``n_tokens`` new."""
        c, n = check_context(context), check_n_tokens(n_tokens)
        m = self.model
        p = m.attention_params
        kv_row = 2 * m.n_kv_heads * m.head_dim * self._kv_bytes  # bytes per token (K and V)
        nbytes = p * m.dtype_bytes + kv_row * (c + n) + kv_row * n
        flops = 2 * n * p + 4 * n * m.n_heads * m.head_dim * (c + n)
        return flops, nbytes

    def mlp_work(self, n_tokens: int = 1) -> tuple[float, float]:
        """``(FLOPs, bytes)`` of one gated MLP block over ``n_tokens`` tokens."""
        n = check_n_tokens(n_tokens)
        p = self.model.mlp_params
        return 2 * n * p, p * self.model.dtype_bytes

    def head_work(self, n_tokens: int = 1) -> tuple[float, float]:
        """``(FLOPs, bytes)`` of the LM head over ``n_tokens`` tokens."""
        n = check_n_tokens(n_tokens)
        p = self.model.head_params
        return 2 * n * p, p * self.model.dtype_bytes

    # ------------------------------------------------------------------ cost methods
    def attention(self, context: float, n_tokens: int = 1) -> float:
        """Seconds for one attention block (roofline + block overhead)."""
        return self._roof(*self.attention_work(context, n_tokens))

    def mlp(self, n_tokens: int = 1) -> float:
        """Seconds for one MLP block (roofline + block overhead)."""
        return self._roof(*self.mlp_work(n_tokens))

    def head(self, n_tokens: int = 1) -> float:
        """Seconds for the LM head (roofline + block overhead)."""
        return self._roof(*self.head_work(n_tokens))

    def overhead(self, n_tokens: int = 1) -> float:
        """Seconds per forward call: ``hardware.step_overhead_s`` (independent of n)."""
        check_n_tokens(n_tokens)
        return self.hardware.step_overhead_s

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """``{"model": {...}, "hardware": {...}, "kv_dtype_bytes": float | None}``."""
        return {
            "model": self.model.to_dict(),
            "hardware": self.hardware.to_dict(),
            "kv_dtype_bytes": self.kv_dtype_bytes,
        }

    @classmethod
    def from_dict(
        cls, params: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> RooflineCostModel:
        """Inverse of ``to_dict``.  ``model`` / ``hardware`` may also be built-in names."""
        check_param_keys(cls.kind, params, ("model", "hardware"), ("kv_dtype_bytes",))
        model, hardware = params["model"], params["hardware"]
        model = get_model_spec(model) if isinstance(model, str) else DecoderSpec.from_dict(model)
        hardware = (
            get_hardware_spec(hardware)
            if isinstance(hardware, str)
            else HardwareSpec.from_dict(hardware)
        )
        return cls(model, hardware, params.get("kv_dtype_bytes"), meta=meta)

    def __repr__(self) -> str:
        return (
            f"RooflineCostModel(model={self.model.name!r}, hardware={self.hardware.name!r}, "
            f"kv_dtype_bytes={self.kv_dtype_bytes!r})"
        )
