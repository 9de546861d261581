"""``finepruner.heads``: training-free attention-head selection for visual-token pruning (FinePruner-Head).

Pure functions on ONE sample's last-prompt-token attention to the visual tokens ``[num_heads, num_visual]``
(spec heads.md §1.3), computed in float32::

    idx = heads.select(attn, "sparsity", heads=16)            # sorted int64 head indices
    s = heads.score(attn, "entropy")                          # float32 [num_heads]; best end: strategy_info
    token_scores = heads.aggregate(attn, idx, mode="mean")    # [num_visual]
    token_scores = heads.hawk_scores(attn, weights)           # HAWK soft weighting, [num_visual]
    heads.strategies()                                        # every strategy name

Strategies, formulas, directions, the dynamic selectors and the ``heads.json`` calibration format are
documented in docs/heads.md.
"""

from finepruner.heads.aggregation import AGGREGATION_MODES, aggregate
from finepruner.heads.api import (
    score,
    score_many,
    select,
    select_batch,
    select_detailed,
    strategies,
    strategy_info,
)
from finepruner.heads.calibration import (
    HeadSet,
    HeadStatsAccumulator,
    load_head_set,
    parse_head_set,
    save_head_set,
)
from finepruner.heads.dynamic import budget_regime
from finepruner.heads.prior_art import GRAVITY_MODES, default_priority_heads, hawk_scores, rope_gravity
from finepruner.heads.registry import REGISTRY, Strategy
from finepruner.heads.selection import Selection
from finepruner.heads.strategies import DEFINITIONS, HIERARCHICAL_VERSIONS

__all__ = [
    "AGGREGATION_MODES",
    "DEFINITIONS",
    "GRAVITY_MODES",
    "HIERARCHICAL_VERSIONS",
    "REGISTRY",
    "HeadSet",
    "HeadStatsAccumulator",
    "Selection",
    "Strategy",
    "aggregate",
    "budget_regime",
    "default_priority_heads",
    "hawk_scores",
    "load_head_set",
    "parse_head_set",
    "rope_gravity",
    "save_head_set",
    "score",
    "score_many",
    "select",
    "select_batch",
    "select_detailed",
    "strategies",
    "strategy_info",
]
