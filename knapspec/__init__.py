"""knapspec: adaptive self-speculative decoding with a knapsack over tokens per time.

Import the parts you need: ``knapspec.planner`` (solvers, objective, planners),
``knapspec.costmodels`` (cost models and specs), ``knapspec.backends`` (model runners).
"""

import logging

from .blocks import BlockLayout, default_pinned
from .errors import KnapSpecError, MissingDependencyError

__version__ = "0.1.0"
__all__ = [
    "BlockLayout",
    "KnapSpecError",
    "MissingDependencyError",
    "__version__",
    "default_pinned",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
