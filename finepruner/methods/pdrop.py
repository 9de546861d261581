"""``pdrop``: PyramidDrop (Xing et al., CVPR'25), spec ``methods.md`` §3.

At each stage boundary ``l`` (after ``l`` decoder layers) the visual tokens are ranked by the attention
of the last prompt token computed with the *next* layer's (layer ``l``'s) q/k projections on the
current hidden states, and ``int(V * ratio)`` of the original ``V`` visual tokens are kept.
"""

from __future__ import annotations

import math
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


def _decay(layers: Sequence[int], num_layers: int, lam: float) -> float:
    """The layers after the first boundary, each weighted by its kept fraction over ``r``:
    ``sum_s (b_{s+1} - b_s) lam^s``."""
    bounds = [*layers, num_layers]
    return sum((bounds[s + 1] - bounds[s]) * lam**s for s in range(len(layers)))


def _budget_ratio(tokens: float, num_layers: int, num_visual: int, layers: Sequence[int], lam: float) -> float:
    """The kept fraction ``r`` after the first boundary whose schedule averages ``tokens`` (feasible: 0 < r <= 1)."""
    return (tokens * num_layers / num_visual - layers[0]) / _decay(layers, num_layers, lam)


def budget_limits(num_layers: int, num_visual: int, layers: Sequence[int], lam: float = 0.5) -> tuple[float, float]:
    """``(low, high)``: the mapping reaches a layer average ``tokens`` with ``low < tokens <= high`` on
    ``num_visual`` tokens (low: the first ``layers[0]`` layers alone; high: the schedule with r = 1)."""
    return (layers[0] * num_visual / num_layers,
            (layers[0] + _decay(layers, num_layers, lam)) * num_visual / num_layers)


def budget_counts(tokens: int, num_layers: int, layers: Sequence[int], lam: float = 0.5) -> tuple[int, int] | None:
    """``(smallest, largest)`` visual-token count of an image on which ``budget_schedule`` reaches ``tokens``
    with these stage layers (``layers[0] >= 1``): the counts ``V`` with ``low(V) < tokens <= high(V)`` of
    ``budget_limits``, or None when no count does."""
    per_low, per_high = budget_limits(num_layers, 1, layers, lam)
    first, last = max(1, math.floor(tokens / per_high) - 1), math.ceil(tokens / per_low) + 1

    def fits(count: int) -> bool:
        return 0.0 < _budget_ratio(tokens, num_layers, count, layers, lam) <= 1.0

    while first <= last and not fits(first):
        first += 1
    while last >= first and not fits(last):
        last -= 1
    return (first, last) if first <= last else None


def budget_schedule(
    tokens: int, num_layers: int, num_visual: int, layers: Sequence[int] | None = None, lam: float = 0.5
) -> tuple[list[int], list[int]]:
    """Stage layers and kept counts whose layer average is ``tokens`` (our mapping; PDrop has none).

    The kept fraction after the first boundary is ``r``, then ``r*lam``, ``r*lam**2``, ... (the
    paper's geometric decay, lam=0.5), with ``r`` solved so that the average equals ``tokens``; counts
    are rounded to the nearest integer. On LLaVA-1.5 (32 layers, 576 tokens) with layers [2, 10, 20]:
    192 -> [312, 156, 78], 128 -> [184, 92, 46], 64 -> [56, 28, 14], each averaging exactly N. The schedule
    depends on ``num_visual``: on families with variable counts it is made per image (``budget_counts``
    gives the images a budget fits).
    """
    layers = list(layers) if layers is not None else budget_layers(num_layers)
    r = _budget_ratio(tokens, num_layers, num_visual, layers, lam)
    if not 0.0 < r <= 1.0:
        low, high = budget_limits(num_layers, num_visual, layers, lam)
        span = budget_counts(tokens, num_layers, layers, lam) if layers[0] > 0 else None
        images = "" if span is None else f"; tokens={tokens} fits images of {span[0]}..{span[1]} visual tokens"
        raise ValueError(
            f"pdrop: tokens={tokens} cannot be the layer average with stage layers {layers} on "
            f"{num_layers} layers and {num_visual} visual tokens; allowed: more than {low:.1f} and at most "
            f"{high:.1f} (or pass other layers=){images}"
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

    def stage_layers(self, num_layers: int) -> list[int]:
        """The stage boundaries for a model depth (validated; independent of the visual-token count)."""
        if self.layers is not None:
            layers = list(self.layers)
        elif self.tokens is not None:
            layers = budget_layers(num_layers)
        else:
            layers = sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)})
        if self.tokens is None:
            ratios = self.ratios or [self.lam ** (s + 1) for s in range(len(layers))]
            if len(ratios) != len(layers):
                raise ValueError(f"pdrop: {len(layers)} layers but {len(ratios)} ratios; give one ratio per layer")
        for layer in layers:
            check_layer(self.name, "layers[i]", layer, 1, num_layers - 1)
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"pdrop: layers={layers} must be strictly increasing")
        return layers

    def schedule(self, num_layers: int, num_visual: int) -> tuple[list[int], list[int]]:
        """Stage layers and kept visual counts for this model shape (validated)."""
        layers = self.stage_layers(num_layers)
        if self.tokens is not None:
            layers, keeps = budget_schedule(self.tokens, num_layers, num_visual, layers, self.lam)
        else:
            ratios = self.ratios or [self.lam ** (s + 1) for s in range(len(layers))]
            keeps = [int(num_visual * r) for r in ratios]
        if any(k < 1 for k in keeps) or any(b > a for a, b in zip(keeps, keeps[1:])):
            raise ValueError(f"pdrop: kept counts {keeps} must be >= 1 and non-increasing; adjust ratios")
        return layers, keeps

    def check_counts(self, num_layers: int, smallest: int, largest: int) -> None:
        """``tokens=N`` on families with variable counts (``spec/models.md`` §5.1): the stage layers are
        checked now, and that some image of ``smallest..largest`` visual tokens can average N
        (``budget_counts``); each image's own schedule is made, and checked, at its prefill."""
        if self.tokens is None:
            super().check_counts(num_layers, smallest, largest)
            return
        layers = self.stage_layers(num_layers)
        span = budget_counts(self.tokens, num_layers, layers, self.lam)
        if span is None or span[0] > largest or span[1] < smallest:
            fits = "no image" if span is None else f"images of {span[0]}..{span[1]} visual tokens"
            low, _ = budget_limits(num_layers, smallest, layers, self.lam)
            _, high = budget_limits(num_layers, largest, layers, self.lam)
            raise ValueError(
                f"pdrop: tokens={self.tokens} as the layer average with stage layers {layers} on {num_layers} "
                f"layers fits {fits}, but this model's images have {smallest}..{largest} visual tokens; allowed "
                f"there: more than {low:.1f} and at most {high:.1f} (or pass other layers=)"
            )
        self.schedule(num_layers, min(max(span[0], smallest), largest))

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        layers, keeps = self.schedule(num_layers, num_visual)
        return [Stage(layer=l, keep=min(k, num_visual), score_layer=l) for l, k in zip(layers, keeps)]

    def check_model(self, num_heads: int, num_layers: int, num_visual: int) -> None:
        self.guidance.check_model(num_heads, num_layers, num_visual, layer=None)

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        return self.guidance.select_tokens(ctx, stage.keep)
