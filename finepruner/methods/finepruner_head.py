"""``finepruner`` (alias ``fastv+finepruner``): FastV ranked by selected visual heads (spec ``heads.md``).

The original FinePruner-Head system: after ``K`` layers keep the visual tokens with the highest
last-query attention averaged over the H heads a strategy picks for this sample, instead of all heads.
Head statistics are float32 on the attention renormalised over the visual tokens by default;
``definitions="original"`` reproduces the original double-softmax formulas (``docs/heads.md``).
``query="instruction"`` (an extension from the toy head study, ``docs/head_study.md``) ranks from every
instruction token instead of the last one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from finepruner.methods.base import ModelShape, Positions, Stage, StageContext, text_after_visual
from finepruner.methods.fastv import Budget, FastV, ScoreImpl
from finepruner.methods.head_guided import HeadGuidance

#: Where the ranking attention comes from: the last prompt token, or every instruction token (max).
QUERIES: tuple[str, ...] = ("last", "instruction")


def instruction_attention(ctx: StageContext) -> torch.Tensor:
    """[B, heads, V] float32: for each head and current visual token, the largest attention it receives
    from a real text token after the selection's last visual token (the instruction and the template
    tail, padding excluded), at the stage's score layer (``StageSignals.query_attention``)."""
    signals = ctx.signals
    text, valid = text_after_visual(ctx)
    query = signals.current_index(text).clamp(min=0)  # text tokens are never pruned
    rows = signals.query_attention(query)  # [B, H, Q, L]
    current = signals.visual_index
    heads = rows.shape[1]
    attention = rows.gather(3, current[:, None, None, :].expand(-1, heads, query.shape[1], -1))
    return attention.masked_fill(~valid[:, None, :, None], 0.0).amax(dim=2)


class FinePrunerHead(FastV):
    """FastV whose token ranking uses only the heads chosen per sample.

    Parameters (besides FastV's ``tokens``, ``ratio``, ``K``, ``budget``, ``positions``, ``score_impl``):
        heads: H, the number of heads to use (1..heads per layer); required by ranking strategies,
            an upper bound for ``dynamic``/``consensus``; optional for ``sparsevlm_priority`` (default
            ``round(14/32 · heads per layer)``) and ``weighting="hawk"`` (default: every head).
        strategy: a head-selection strategy from ``finepruner.heads.strategies()`` (default ``"sum"``:
            the heads that give the image the most attention; ``"all"`` equals ``fastv`` exactly;
            ``"sparsevlm_priority"``: SparseVLM v2.0's priority heads on the last query, with its RoPE
            gravity correction unless ``options={"gravity": "none"}``, spec methods_more.md §7).
        aggregation: ``"mean"`` (default) or ``"softmax_weighted"``.
        definitions: ``"renormalised"`` (default) or ``"original"`` (double softmax, as the original code).
        heads_from: path of a ``heads.json`` written by ``finepruner calibrate``: a fixed head set.
        weighting: ``"none"`` (default) or ``"hawk"``: HAWK's soft selection, token score
            ``Σ_h w_h · A_h/‖A_h‖₂`` with the per-head ``weights`` of ``heads_from``
            (``finepruner calibrate --weights``), spec methods_more.md §7.
        seed: seed of the ``random`` strategy (a control).
        options: further strategy options, e.g. ``{"k": 10}`` for ``top_k_sum`` or
            ``{"min_heads": 4, "max_heads": 24}`` for the dynamic selectors.
        query: ``"last"`` (default, the original and FastV: the last prompt token's attention) or
            ``"instruction"``: for each head and visual token, the largest attention it receives from any
            text token after the image (the instruction and the template tail), so that the token naming
            an object can rank it (an extension, not in the original system: ``docs/head_study.md``).

    The original system counts ``tokens`` as a layer average: use ``budget="average"`` to reproduce it
    (K=2 on 32 layers keeps 166/98/30 tokens for 192/128/64). The dynamic selector receives the kept
    count of this stage (``kept_tokens``) and the model's visual-token count.
    """

    name = "finepruner"
    aliases = ("fastv+finepruner",)

    def __init__(
        self,
        tokens: int | None = None,
        ratio: float | None = None,
        K: int = 2,
        budget: Budget = "kept",
        positions: Positions | None = None,
        heads: int | None = None,
        strategy: str = "sum",
        aggregation: str = "mean",
        definitions: str | None = None,
        heads_from: str | Path | None = None,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
        score_impl: ScoreImpl = "cheap",
        weighting: str = "none",
        query: str = "last",
    ) -> None:
        super().__init__(tokens=tokens, ratio=ratio, K=K, budget=budget, positions=positions, score_impl=score_impl)
        self.guidance = HeadGuidance.from_params(
            strategy, heads, aggregation, heads_from, definitions, seed, options, weighting
        )
        if query not in QUERIES:
            raise ValueError(f"{self.name}: query={query!r}; allowed: {QUERIES}")
        if query == "instruction" and strategy == "sparsevlm_priority":
            raise ValueError(f"{self.name}: strategy='sparsevlm_priority' corrects the last query's RoPE "
                             "gravity and needs query='last'")
        self.query = query

    def check_model(self, num_heads: int, num_layers: int, num_visual: int) -> None:
        self.guidance.check_model(num_heads, num_layers, num_visual, layer=self.K - 1)

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        stages = super().plan(num_layers, num_visual)
        if self.query == "instruction":  # rows of chosen queries, not the engine's last-query row
            stages = [replace(stage, last_query=False) for stage in stages]
        return stages

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        attention = instruction_attention(ctx) if self.query == "instruction" else None
        return self.guidance.select_tokens(ctx, stage.keep, attention)

    @classmethod
    def defaults_for(cls, shape: ModelShape, params: Mapping) -> dict:
        """``heads`` defaults to a quarter of the model's heads per layer (at least 1), so that the default
        ranking strategy (``sum``, which needs H) runs on any shape."""
        completed = super().defaults_for(shape, params)
        completed.setdefault("heads", max(1, shape.num_heads // 4))
        return completed
