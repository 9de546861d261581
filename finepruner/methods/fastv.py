"""``fastv``: FastV (Chen et al., ECCV'24), spec ``methods.md`` §1.

After ``K`` decoder layers, keep the visual tokens that receive the most attention from the last
prompt token, averaged over heads, in layer ``K-1``. The score comes from a cheap one-query attention
(``engine.signals``) in float32, not from eager attention.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from finepruner.methods.base import (
    Positions,
    PruningMethod,
    Stage,
    StageContext,
    check_layer,
    check_tokens,
    top_k_sorted,
)

Budget = Literal["kept", "average"]
ScoreImpl = Literal["cheap", "recompute", "eager"]
SCORE_IMPLS: tuple[str, ...] = ("cheap", "recompute", "eager")


def check_score_impl(method: str, score_impl: str) -> None:
    """Raise a ValueError unless ``score_impl`` is ``"cheap"``, ``"recompute"`` or ``"eager"``."""
    if score_impl not in SCORE_IMPLS:
        raise ValueError(f"{method}: score_impl={score_impl!r}; allowed: {SCORE_IMPLS}")


def average_matched_keep(tokens: int, K: int, num_layers: int, num_visual: int) -> int:
    """Kept count ``k`` whose layer average equals ``tokens``: (K*V + (T-K)*k)/T = N (§0.3 (b)).

    For LLaVA-1.5 (T=32, V=576, K=2) this gives 166 / 98 / 30 for N = 192 / 128 / 64.
    """
    return round((num_layers * tokens - K * num_visual) / (num_layers - K))


class FastV(PruningMethod):
    """FastV: prune after layer ``K`` with last-query attention averaged over all heads.

    Parameters:
        tokens: visual tokens kept after layer ``K`` (what "N tokens" means with ``budget="kept"``).
        ratio: alternatively, the fraction of visual tokens *pruned* (the paper's R); default 0.5
            when neither ``tokens`` nor ``ratio`` is given.
        K: prune after this many decoder layers (paper default 2); scores use layer ``K-1``.
        budget: ``"kept"`` (default): ``tokens`` is the count kept after layer K;
            ``"average"``: ``tokens`` is the layer-averaged visual count (FLOPs-matched, §0.3 (b)),
            and ``round((T*N - K*V)/(T-K))`` tokens are kept.
        positions: ``"original"`` (default, as FastV: kept tokens keep their position ids) or
            ``"renumber"``.
        score_impl: ``"cheap"`` (default: one query row, ``engine.signals.last_query_attention``, with the
            score layer's keys from its KV cache), ``"recompute"`` (the same row with those keys projected
            again from the layer's input and rotated in float32: identical kept sets in float32 models; in
            bf16/fp16 about 1 kept token in 700 differs from ``"cheap"``, docs/performance.md) or
            ``"eager"``: the scoring layer's full L x L attention is materialised, as the original code
            did with eager attention, to show that approach's cost (same kept set up to rounding).

    Deviation: scores are computed in float32 over the model's real (unpadded) tokens, for any batch
    size; the original takes the fp16 eager attention of batch row 0.
    """

    name = "fastv"
    default_positions = "original"
    scores_attention = True

    def __init__(
        self,
        tokens: int | None = None,
        ratio: float | None = None,
        K: int = 2,
        budget: Budget = "kept",
        positions: Positions | None = None,
        score_impl: ScoreImpl = "cheap",
    ) -> None:
        super().__init__(positions)
        check_score_impl(self.name, score_impl)
        self.score_impl = score_impl
        if tokens is not None and ratio is not None:
            raise ValueError(f"{self.name}: pass tokens or ratio, not both")
        if budget not in ("kept", "average"):
            raise ValueError(f"{self.name}: budget={budget!r}; allowed: 'kept', 'average'")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"{self.name}: ratio={ratio!r} is the pruned fraction; allowed: 0 <= ratio < 1")
        if budget == "average" and tokens is None:
            raise ValueError(f"{self.name}: budget='average' needs tokens=N (the layer-averaged count)")
        self.tokens, self.ratio, self.K, self.budget = tokens, ratio, K, budget

    def keep_count(self, num_layers: int, num_visual: int) -> int:
        """Visual tokens kept after layer K for this model shape (validated)."""
        if self.tokens is None:
            ratio = 0.5 if self.ratio is None else self.ratio
            return max(1, round(num_visual * (1.0 - ratio)))
        if self.budget == "kept":
            check_tokens(self.name, self.tokens, num_visual)
            return self.tokens
        keep = average_matched_keep(self.tokens, self.K, num_layers, num_visual)
        if not 1 <= keep <= num_visual:
            low = math.ceil((self.K * num_visual + (num_layers - self.K)) / num_layers)
            raise ValueError(
                f"{self.name}: tokens={self.tokens} cannot be a layer average with K={self.K} on "
                f"{num_layers} layers and {num_visual} visual tokens; allowed: {low}..{num_visual}"
            )
        return keep

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        check_layer(self.name, "K", self.K, 1, num_layers - 1)
        keep = self.keep_count(num_layers, num_visual)
        return [Stage(layer=self.K, keep=keep, score_layer=self.K - 1)]

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        return top_k_sorted(ctx.attention.mean(dim=1), stage.keep)
