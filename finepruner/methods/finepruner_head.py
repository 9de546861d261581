"""``finepruner`` (alias ``fastv+finepruner``): FastV ranked by selected visual heads (spec ``heads.md``).

The original FinePruner-Head system: after ``K`` layers keep the visual tokens with the highest
last-query attention averaged over the H heads a strategy picks for this sample, instead of all heads.
Head statistics are float32 on the attention renormalised over the visual tokens by default;
``definitions="original"`` reproduces the original double-softmax formulas (``docs/heads.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from finepruner.methods.base import ModelShape, Positions, Stage, StageContext
from finepruner.methods.fastv import Budget, FastV, ScoreImpl
from finepruner.methods.head_guided import HeadGuidance


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
    ) -> None:
        super().__init__(tokens=tokens, ratio=ratio, K=K, budget=budget, positions=positions, score_impl=score_impl)
        self.guidance = HeadGuidance.from_params(
            strategy, heads, aggregation, heads_from, definitions, seed, options, weighting
        )

    def check_model(self, num_heads: int, num_layers: int, num_visual: int) -> None:
        self.guidance.check_model(num_heads, num_layers, num_visual, layer=self.K - 1)

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        return self.guidance.select_tokens(ctx, stage.keep)

    @classmethod
    def defaults_for(cls, shape: ModelShape, params: Mapping) -> dict:
        """``heads`` defaults to a quarter of the model's heads per layer (at least 1), so that the default
        ranking strategy (``sum``, which needs H) runs on any shape."""
        completed = super().defaults_for(shape, params)
        completed.setdefault("heads", max(1, shape.num_heads // 4))
        return completed
