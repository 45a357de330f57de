"""Backend-free planning: knapsack solvers, the TPT objective, proxies and planners."""

from ..oracle import BlockOracle
from .calibration import CalibratedPlanner, MaskStats
from .factory import ENTRY_POINT_GROUP, STRATEGIES, make_planner, strategy_names
from .fidelity import default_block_scores, load_block_scores, resample_profile
from .objective import expected_tokens, round_seconds, verify_seconds
from .oracle_planners import (
    ClaspPlanner,
    EarlyExitPlanner,
    KnapSpecPlanner,
    OracleAdditivePlanner,
    StaticSearchPlanner,
)
from .plan import CostBreakdown, DraftPlan, select_plan
from .planners import (
    AdditivePlanner,
    AutoregressivePlanner,
    PlanContext,
    Planner,
    StaticPlanner,
    prior_alpha,
)
from .proxies import (
    AcceptanceProxy,
    CosineProxy,
    Top1Proxy,
    TotalVariationProxy,
    cosine_similarity,
    make_proxy,
)
from .solvers import (
    KnapsackFrontier,
    KnapsackResult,
    knapsack,
    knapsack_frontier,
    knapsack_frontier_batch,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "STRATEGIES",
    "AcceptanceProxy",
    "AdditivePlanner",
    "AutoregressivePlanner",
    "BlockOracle",
    "CalibratedPlanner",
    "ClaspPlanner",
    "CosineProxy",
    "CostBreakdown",
    "DraftPlan",
    "EarlyExitPlanner",
    "KnapSpecPlanner",
    "KnapsackFrontier",
    "KnapsackResult",
    "MaskStats",
    "OracleAdditivePlanner",
    "PlanContext",
    "Planner",
    "StaticPlanner",
    "StaticSearchPlanner",
    "Top1Proxy",
    "TotalVariationProxy",
    "cosine_similarity",
    "default_block_scores",
    "expected_tokens",
    "knapsack",
    "knapsack_frontier",
    "knapsack_frontier_batch",
    "load_block_scores",
    "make_planner",
    "make_proxy",
    "prior_alpha",
    "resample_profile",
    "round_seconds",
    "select_plan",
    "strategy_names",
    "verify_seconds",
]
