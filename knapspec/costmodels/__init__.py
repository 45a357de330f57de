"""Cost models: seconds per attention / MLP block, head and step.

Kinds (each registered for JSON loading on import of this package):

* ``LinearCostModel`` (``"linear"``): the paper's ``t_mlp = c1``, ``t_attn = c2*ctx + c3``,
  with optional per-extra-token slopes; ``LinearCostModel.fit`` fits it to profiles.
* ``TableCostModel`` (``"table"``): measured grid, piecewise-linear interpolation.
* ``RooflineCostModel`` (``"roofline"``): analytic, from ``DecoderSpec`` + ``HardwareSpec``.

``save_cost_model`` / ``load_cost_model`` read and write the JSON file format described
in ``knapspec.costmodels.io``.
"""

from .base import COST_MODEL_KINDS, CostModel, register_cost_model
from .io import cost_model_from_json, cost_model_to_json, load_cost_model, save_cost_model
from .linear import LinearCostModel
from .roofline import RooflineCostModel
from .specs import (
    HARDWARE_SPECS,
    MODEL_SPECS,
    DecoderSpec,
    HardwareSpec,
    get_hardware_spec,
    get_model_spec,
)
from .table import TableCostModel

__all__ = [
    "COST_MODEL_KINDS",
    "HARDWARE_SPECS",
    "MODEL_SPECS",
    "CostModel",
    "DecoderSpec",
    "HardwareSpec",
    "LinearCostModel",
    "RooflineCostModel",
    "TableCostModel",
    "cost_model_from_json",
    "cost_model_to_json",
    "get_hardware_spec",
    "get_model_spec",
    "load_cost_model",
    "register_cost_model",
    "save_cost_model",
]
