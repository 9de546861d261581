"""``pdrop``: PyramidDrop (Xing et al., CVPR'25), spec ``methods.md`` §3.

At each stage boundary ``l`` (after ``l`` decoder layers) the visual tokens are ranked by the attention
of the last prompt token computed with the *next* layer's (layer ``l``'s) q/k projections on the
current hidden states, and ``int(V * ratio)`` of the original ``V`` visual tokens are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from finepruner.methods.base import Positions, PruningMethod, Stage, StageContext, check_layer
from finepruner.methods.fastv import ScoreImpl, check_score_impl
from finepruner.methods.head_guided import HeadGuidance

#: Stage boundaries of the budget mapping, as fractions of the depth: [2, 10, 20] on 32 layers.
BUDGET_LAYER_FRACTIONS = (2 / 32, 10 / 32, 20 / 32)


def average_visual_tokens(layers: Sequence[int], keeps: Sequence[int], num_layers: int, num_visual: int) -> float:
    """Layer-averaged visual-token count of a schedule (what "N tokens" means for PDrop, §0.3)."""
    bounds = [0, *layers, num_layers]
    counts = [num_visual, *keeps]
    return sum(c * (hi - lo) for c, lo, hi in zip(counts, bounds[:-1], bounds[1:], strict=True)) / num_layers


def budget_layers(num_layers: int) -> list[int]:
    """The mapping's stage boundaries for a model depth: [2, 10, 20] for 32 layers."""
    layers = sorted({min(num_layers - 1, max(1, round(num_layers * f))) for f in BUDGET_LAYER_FRACTIONS})
    return layers


def budget_schedule(
    tokens: int, num_layers: int, num_visual: int, layers: Sequence[int] | None = None, lam: float = 0.5
) -> tuple[list[int], list[int]]:
    """Stage layers and kept counts whose layer average is ``tokens`` (our mapping; PDrop has none).

    The kept fraction after the first boundary is ``r``, then ``r*lam``, ``r*lam**2``, ... (the
    paper's geometric decay, lam=0.5), with ``r`` solved so that the average equals ``tokens``; counts
    are rounded to the nearest integer. On LLaVA-1.5 (32 layers, 576 tokens) with layers [2, 10, 20]:
    192 -> [312, 156, 78], 128 -> [184, 92, 46], 64 -> [56, 28, 14], each averaging exactly N.
    """
    layers = list(layers) if layers is not None else budget_layers(num_layers)
    bounds = [*layers, num_layers]
    decay = sum((bounds[s + 1] - bounds[s]) * lam**s for s in range(len(layers)))
    r = (tokens * num_layers / num_visual - layers[0]) / decay
    if not 0.0 < r <= 1.0:
        low = layers[0] * num_visual / num_layers
        high = average_visual_tokens(layers, [num_visual] * len(layers), num_layers, num_visual)
        raise ValueError(
            f"pdrop: tokens={tokens} cannot be the layer average with stage layers {layers} on "
            f"{num_layers} layers and {num_visual} visual tokens; allowed: more than {low:.1f} and at most "
            f"{high:.0f} (or pass other layers=)"
        )
    keeps = [max(1, round(num_visual * r * lam**s)) for s in range(len(layers))]
    return layers, keeps


class PDrop(PruningMethod):
    """PyramidDrop: multi-stage pruning with a lightweight last-query attention at each boundary.

    Parameters:
        layers: stage boundaries (prune after this many layers). Default: the paper's
            [T/4, T/2, 3T/4] ([8, 16, 24] on 32 layers), or the budget mapping's [2, 10, 20] when
            ``tokens`` is given.
        ratios: kept fraction of the *original* visual tokens after each boundary (kept count
            ``int(V * ratio)``, as the official code). Default ``[lam, lam**2, lam**3]``.
        lam: the decay between stages (paper default 0.5).
        tokens: a budget N = the layer-averaged visual-token count; selects a schedule with
            ``budget_schedule`` (not combinable with ``ratios``).
        positions: ``"renumber"`` (default, as PDrop re-indexes contiguously) or ``"original"``.
        heads, strategy, aggregation, definitions, seed, options: rank tokens with selected heads at
            every stage, as the ``finepruner`` method does (default ``strategy="all"``: every head, the
            official PDrop).
        score_impl: ``"cheap"`` (default; PDrop's own one-query attention) or ``"eager"`` (the score layer's
            L x L attention materialised, to show that cost; the official PDrop never does this).

    Deviation: softmax and head mean in float32 (the official code averages heads in the model dtype).
    """

    name = "pdrop"
    default_positions = "renumber"
    scores_attention = True

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        ratios: Sequence[float] | None = None,
        lam: float = 0.5,
        tokens: int | None = None,
        positions: Positions | None = None,
        heads: int | None = None,
        strategy: str = "all",
        aggregation: str = "mean",
        definitions: str | None = None,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
        score_impl: ScoreImpl = "cheap",
    ) -> None:
        super().__init__(positions)
        check_score_impl(self.name, score_impl)
        self.score_impl = score_impl
        self.guidance = HeadGuidance.from_params(strategy, heads, aggregation, None, definitions, seed, options)
        if tokens is not None and ratios is not None:
            raise ValueError("pdrop: pass tokens (a layer-averaged budget) or ratios, not both")
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"pdrop: lam={lam!r}; allowed: 0 < lam <= 1")
        if ratios is not None and not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"pdrop: ratios={list(ratios)}; each must be in (0, 1]")
        self.layers = list(layers) if layers is not None else None
        self.ratios = list(ratios) if ratios is not None else None
        self.lam, self.tokens = lam, tokens

    def schedule(self, num_layers: int, num_visual: int) -> tuple[list[int], list[int]]:
        """Stage layers and kept visual counts for this model shape (validated)."""
        if self.tokens is not None:
            layers, keeps = budget_schedule(self.tokens, num_layers, num_visual, self.layers, self.lam)
        else:
            layers = self.layers or sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)})
            ratios = self.ratios or [self.lam ** (s + 1) for s in range(len(layers))]
            if len(ratios) != len(layers):
                raise ValueError(f"pdrop: {len(layers)} layers but {len(ratios)} ratios; give one ratio per layer")
            keeps = [int(num_visual * r) for r in ratios]
        for layer in layers:
            check_layer(self.name, "layers[i]", layer, 1, num_layers - 1)
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"pdrop: layers={layers} must be strictly increasing")
        if any(k < 1 for k in keeps) or any(b > a for a, b in zip(keeps, keeps[1:])):
            raise ValueError(f"pdrop: kept counts {keeps} must be >= 1 and non-increasing; adjust ratios")
        return layers, keeps

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        layers, keeps = self.schedule(num_layers, num_visual)
        return [Stage(layer=l, keep=min(k, num_visual), score_layer=l) for l, k in zip(layers, keeps)]

    def check_model(self, num_heads: int, num_layers: int, num_visual: int) -> None:
        self.guidance.check_model(num_heads, num_layers, num_visual, layer=None)

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        return self.guidance.select_tokens(ctx, stage.keep)
