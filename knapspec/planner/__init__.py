"""Backend-free planning: knapsack solvers, the TPT objective, proxies and planners."""

from .dp import (
    ClaspPlanner,
    EarlyExitPlanner,
    KnapSpecPlanner,
    OracleAdditivePlanner,
    StaticSearchPlanner,
)
from .factory import STRATEGIES, make_planner
from .fidelity import default_block_scores, load_block_scores, resample_profile
from .objective import (
    autoregressive_tokens_per_second,
    expected_tokens,
    round_seconds,
    tokens_per_second,
    verify_seconds,
)
from .plan import CostBreakdown, DraftPlan, select_plan
from .planners import (
    AdditivePlanner,
    AutoregressivePlanner,
    BlockOracle,
    PlanContext,
    Planner,
    StaticPlanner,
)
from .proxies import (
    AcceptanceProxy,
    CosineProxy,
    Top1Proxy,
    TotalVariationProxy,
    cosine_similarity,
    make_proxy,
)
from .solvers import KnapsackFrontier, KnapsackResult, knapsack, knapsack_frontier

__all__ = [
    "STRATEGIES",
    "AcceptanceProxy",
    "AdditivePlanner",
    "AutoregressivePlanner",
    "BlockOracle",
    "ClaspPlanner",
    "CosineProxy",
    "CostBreakdown",
    "DraftPlan",
    "EarlyExitPlanner",
    "KnapSpecPlanner",
    "KnapsackFrontier",
    "KnapsackResult",
    "OracleAdditivePlanner",
    "PlanContext",
    "Planner",
    "StaticPlanner",
    "StaticSearchPlanner",
    "Top1Proxy",
    "TotalVariationProxy",
    "autoregressive_tokens_per_second",
    "cosine_similarity",
    "default_block_scores",
    "expected_tokens",
    "knapsack",
    "knapsack_frontier",
    "load_block_scores",
    "make_planner",
    "make_proxy",
    "resample_profile",
    "round_seconds",
    "select_plan",
    "tokens_per_second",
    "verify_seconds",
]
