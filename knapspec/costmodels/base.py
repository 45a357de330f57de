"""The cost-model interface: how many seconds each part of a forward step takes.

A forward step that pushes ``n`` new tokens through the model, with ``c`` tokens already
in the KV cache, costs::

    overhead(n) + sum_{kept attention blocks} attention(c, n) + sum_{kept MLP blocks} mlp(n)
                + head(n)

All methods return **seconds** for **one** block (or one head / one step), and take the
context length ``c`` in tokens (tokens already in the KV cache before the step) and the
number of new tokens ``n`` processed in the step (1 for a draft step, ``d + 1`` for the
verification of ``d`` drafted tokens).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ..errors import KnapSpecError

#: kind name -> CostModel subclass, filled by ``register_cost_model``.
COST_MODEL_KINDS: dict[str, type[CostModel]] = {}


def register_cost_model(cls: type[CostModel]) -> type[CostModel]:
    """Class decorator: make ``cls`` loadable from JSON under ``cls.kind``."""
    if not getattr(cls, "kind", None):
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'kind'")
    COST_MODEL_KINDS[cls.kind] = cls
    return cls


class CostModel(ABC):
    """Seconds per block, head and step, as a function of context length and tokens.

    Subclasses implement the four cost methods and ``to_dict``/``from_dict`` (the ``params``
    part of the JSON file; see ``knapspec.costmodels.io``).  ``meta`` carries free-form
    provenance (model, backend, threads, date) and is saved alongside.
    """

    kind: ClassVar[str] = ""

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.meta: dict[str, Any] = dict(meta or {})
        # measured seconds of a one-token draft head over the top K ids, by K (reduced
        # vocabulary heads, ``knapspec.planner.knobs``); saved beside ``params``
        self.draft_heads: dict[int, float] = {}
        self.vocab_size: int | None = None  # V of the full head, when known (scales heads)

    @abstractmethod
    def attention(self, context: float, n_tokens: int = 1) -> float:
        """Seconds for one attention block: ``n_tokens`` new tokens over ``context`` cached."""

    @abstractmethod
    def mlp(self, n_tokens: int = 1) -> float:
        """Seconds for one MLP block over ``n_tokens`` tokens."""

    @abstractmethod
    def head(self, n_tokens: int = 1) -> float:
        """Seconds for the final norm + LM head (+ token selection) over ``n_tokens`` tokens."""

    @abstractmethod
    def overhead(self, n_tokens: int = 1) -> float:
        """Fixed seconds per forward call (embedding, framework, dispatch), ``n_tokens`` tokens."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (the ``params`` object of the file)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, params: dict[str, Any], meta: dict[str, Any] | None = None) -> CostModel:
        """Inverse of ``to_dict``; raise ``KnapSpecError`` naming a bad or missing field."""

    # ----------------------------------------------------------------- derived helpers
    def draft_head(self, vocab: int = 0) -> float:
        """Seconds of a one-token draft head (final norm + LM head + selection) over the
        top ``vocab`` ids; ``0``: the full head (``head(1)``).

        Measured (``draft_heads``, from profiling) where known; else ``head(1)`` scaled by
        ``vocab / vocab_size`` (the head's weight traffic; a projection), or ``head(1)``
        when the vocabulary size is unknown (no saving is predicted)."""
        vocab = int(vocab)
        full = self.head(1)
        if vocab == 0:
            return full
        if vocab in self.draft_heads:
            return float(self.draft_heads[vocab])
        if self.vocab_size and vocab < self.vocab_size:
            return full * vocab / self.vocab_size
        return full

    def block_costs(self, n_layers: int, context: float, n_tokens: int = 1) -> np.ndarray:
        """``[2L]`` float64 seconds per block (even: attention, odd: MLP)."""
        costs = np.empty(2 * n_layers, dtype=np.float64)
        costs[0::2] = self.attention(context, n_tokens)
        costs[1::2] = self.mlp(n_tokens)
        return costs

    def step_seconds(self, mask: np.ndarray, context: float, n_tokens: int = 1) -> float:
        """Seconds for one forward step of ``n_tokens`` tokens under skip ``mask`` [2L]."""
        mask = np.asarray(mask, dtype=bool)
        costs = self.block_costs(len(mask) // 2, context, n_tokens)
        return float(
            self.overhead(n_tokens) + self.head(n_tokens) + costs[~mask].sum()
        )

    def full_step_seconds(self, n_layers: int, context: float, n_tokens: int = 1) -> float:
        """Seconds for a full-model step (no block skipped)."""
        return self.step_seconds(np.zeros(2 * n_layers, dtype=bool), context, n_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


def _check_number(name: str, value: Any, minimum: float, expected: str, bound: str) -> float:
    """``value`` as a finite float >= ``minimum``, or a ``KnapSpecError`` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise KnapSpecError(f"{name}: expected {expected}, got {value!r}") from None
    if not np.isfinite(v) or v < minimum:
        raise KnapSpecError(f"{name}: expected {bound}, got {value!r}")
    return v


def check_finite_nonnegative(name: str, value: Any) -> float:
    """Validate one scalar parameter; return it as float or raise naming ``name``."""
    return _check_number(name, value, 0.0, "a number", "a finite non-negative number")


def check_context(context: Any) -> float:
    """Validate a context length (tokens already in the KV cache); return it as float."""
    return _check_number("context", context, 0.0, "a number of tokens",
                         "a finite number of tokens >= 0")


def check_n_tokens(n_tokens: Any) -> float:
    """Validate a number of new tokens in a step (>= 1); return it as float."""
    return _check_number("n_tokens", n_tokens, 1.0, "a number of tokens",
                         "a finite number >= 1")


def check_param_keys(
    kind: str, params: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check that ``params`` is a dict with all ``required`` keys and no unknown ones.

    Returns ``params``; raises ``KnapSpecError`` naming the missing or unknown fields
    (unknown keys are rejected so that a misspelt field is not silently ignored).
    """
    if not isinstance(params, dict):
        raise KnapSpecError(f"{kind} params: expected an object, got {type(params).__name__}")
    missing = [k for k in required if k not in params]
    if missing:
        raise KnapSpecError(f"{kind} params: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise KnapSpecError(
            f"{kind} params: unknown field(s) {', '.join(unknown)}; "
            f"expected {', '.join((*required, *optional))}"
        )
    return params
