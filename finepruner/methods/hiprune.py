"""``hiprune``: HiPrune (arXiv 2508.00553), hierarchical CLIP attention, spec ``methods_more.md`` §4.

Before the language model, from the attention each patch *receives* in two CLIP layers (mean over heads and
over all queries): "anchors" are the top patches of a middle "object" layer, each with its ±1 and ±grid-width
neighbours ("buffers"); "registers" fill the budget with the top patches of the deep (feature) layer among
the rest. The kept patches go to the LLM in spatial order, contiguous positions, nothing merged.

Towers without [CLS] (Qwen2-VL/2.5-VL/3-VL, the official Qwen2.5-VL code's rule): the scored units are the
merged tokens (the received attention of each 2 x 2 merge unit, mean over heads, sum over the queries of the
block's segments, mean over the unit; the adapter's capture), the buffers are +-1 and +-row on each image's
merged grid, the deep layer is the last block, and the budget counts per image.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

from finepruner.methods.base import (
    Positions,
    PruningMethod,
    Stage,
    StageContext,
    check_tokens,
    require_default_features,
)

#: Official ``HIPRUNE_ALPHA``, ``HIPRUNE_OBJECT_LAYER`` (1-based) and the tower depth it is set for (§4.1).
DEFAULT_ALPHA = 0.1
DEFAULT_OBJECT_LAYER = 9
REFERENCE_DEPTH = 24
Wrap = Literal["official", "grid"]
WRAP_MODES: tuple[str, ...] = ("official", "grid")
#: ``budget_scope`` values (``engine.vision.BUDGET_SCOPES``): on LLaVA-NeXT ``tokens`` per image, or per crop.
BUDGET_SCOPES: tuple[str, ...] = ("image", "crop")


def anchor_count(tokens: int, alpha: float) -> int:
    """``a = round(N' * alpha / 5)`` (Python's ``round``, half to even), spec §4.1."""
    return round(tokens * alpha / 5)


def default_object_layer(depth: int, reference: tuple[int, int] = (DEFAULT_OBJECT_LAYER, REFERENCE_DEPTH)) -> int:
    """The object layer (1-based) for a tower of ``depth`` layers: ``reference`` = (official layer, the depth it
    is set for), 9 of LLaVA-1.5's 24 CLIP layers by default (16 of 32 on Qwen2.5-VL, the adapter's
    ``hiprune_object_layer``), the same fraction of the depth elsewhere (``max(1, round(layer * depth / of))``)."""
    layer, of = reference
    return max(1, round(layer * depth / of))


def ratio_tokens(ratio: float, num_visual: int) -> int:
    """N' of the official Qwen ``HIPRUNE_QWEN_RETENTION`` ratio: ``round(V * ratio)`` (Python's ``round``), >= 1."""
    return max(1, round(num_visual * ratio))


def hiprune_select(
    object_scores: torch.Tensor, deep_scores: torch.Tensor, tokens: int, alpha: float,
    grid_width: int | torch.Tensor, wrap: Wrap = "official",
) -> torch.Tensor:
    """HiPrune's kept set (spec §4.1), vectorised over the batch.

    Args:
        object_scores: [B, V] attention received per patch at the object layer.
        deep_scores: [B, V] the same at the deep (feature) layer.
        tokens: N', patches kept per sample.
        alpha: anchors are ``round(N' * alpha / 5)`` patches.
        grid_width: patches per row of the grid (the ±row neighbours are ±grid_width): one for the batch, or
            [B] long, one per sample (Qwen: each image's merged grid).
        wrap: ``"official"``: neighbours are flat indices clamped to [0, V-1] (±1 crosses row edges);
            ``"grid"``: neighbours outside the image or across a row edge are dropped.

    Returns:
        [B, N'] sorted indices: anchors, buffers and the top deep-layer registers outside them. Ties go to
        the first index.
    """
    batch, num_visual = object_scores.shape
    device = object_scores.device
    count = anchor_count(tokens, alpha)
    anchors = object_scores.argsort(dim=-1, descending=True, stable=True)[:, :count]  # [B, a]
    chosen = torch.zeros(batch, num_visual, dtype=torch.bool, device=device)
    chosen.scatter_(1, anchors, True)
    if isinstance(grid_width, torch.Tensor):
        grid_width = grid_width.to(device).view(batch, 1)
    column = anchors % grid_width
    for step in (-1, 1, -grid_width, grid_width):
        neighbours = anchors + step
        if wrap == "grid":  # a dropped neighbour is replaced by its anchor (already chosen)
            valid = (neighbours >= 0) & (neighbours < num_visual)
            if step == -1:
                valid &= column > 0
            elif step == 1:
                valid &= column < grid_width - 1
            neighbours = torch.where(valid, neighbours, anchors)
        chosen.scatter_(1, neighbours.clamp(0, num_visual - 1), True)
    left = tokens - chosen.sum(dim=1, keepdim=True)  # registers per sample
    masked = deep_scores.float().masked_fill(chosen, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_visual, device=device).expand(batch, -1))
    keep = chosen | (~chosen & (rank < left))
    return keep.nonzero()[:, 1].view(batch, tokens)


class HiPrune(PruningMethod):
    """HiPrune: object-layer anchors with buffers + deep-layer registers, before the LLM (spec §4).

    "N tokens" means exactly ``tokens`` visual tokens per sample enter the language model (official
    ``HIPRUNE_RETENTION``; the official code divides it by the batch size, a bug we do not reproduce, §4.2).

    Parameters:
        tokens: N' kept patches per sample (1..V); budgets 192/128/64 are ``tokens=192/128/64``; default V/3
            (192 on LLaVA-1.5). Not with ``ratio``.
        ratio: alternatively the kept fraction (official Qwen ``HIPRUNE_QWEN_RETENTION``: 0.334/0.223/0.112),
            ``N' = round(V * ratio)`` (at least 1) of each image's V tokens (each budget unit's on NeXT).
        alpha: anchor share, ``a = round(N' * alpha / 5)`` anchors (default 0.1, official); allowed when
            ``5a <= N'`` (anchors and their four neighbours fit in the budget).
        object_layer: the object layer, 1-based as the official ``HIPRUNE_OBJECT_LAYER`` (encoder layer
            ``object_layer - 1``), in 1..depth of the vision tower; default 9 on a 24-layer tower (LLaVA-1.5),
            the same fraction of the depth on other CLIP/SigLIP towers (``max(1, round(9 * depth / 24))``); on
            the Qwen towers 16 of 32 blocks (official Qwen2.5-VL), the same fraction of other depths
            (``max(1, round(16 * depth / 32))``: 14 of Qwen3-VL's 27, 1 of a 2-block tiny tower; our inference).
        wrap: ``"official"`` (default): buffer neighbours are flat indices clamped to [0, V-1], so ±1 wraps
            across rows and edge neighbours become patch 0 or V-1; ``"grid"``: neighbours across a row edge or
            outside the grid are dropped.
        positions: ``"renumber"`` (default, official: contiguous positions) or ``"original"``.
        budget_scope: ``"image"`` (default) or ``"crop"``: the unit ``tokens`` counts on LLaVA-NeXT.

    Signals: ``received_attention`` at the object layer and at the feature layer (the deep layer, official
    ``attentions[-2]`` = LLaVA's ``vision_feature_layer=-2``), from hooks on those two layers' self-attention
    (q/k recomputed, float32; no ``output_attentions``). Needs the ``"default"`` feature strategy; on LLaVA-1.5
    one image per sample on a square patch grid; others raise.

    LLaVA-NeXT (``budget_scope``): N' per image over its crops (``"image"``, default) or per crop (``"crop"``,
    the official ``RETENTION / B`` with B crops; a crop left with fewer patches by unpadding keeps them all);
    newline tokens always kept and not counted; buffers on the anchor's own crop grid (a neighbour that
    unpadding removed is dropped). OneVision (SigLIP, no [CLS]; our inference): the received attention of
    the object and feature layers mixed by the anyres_max shrink's bilinear weights where it mixes patches,
    buffers on the grids of the image's tokens (``ModelAdapter.image_grids``: base grid, unpadded or shrunk
    tile grid; within the budget unit), since a shrunk token has no single patch on a crop grid.

    Qwen2-VL / Qwen2.5-VL / Qwen3-VL (official Qwen2.5-VL code, ``qwen2_5_vl_HiPrune.py``): per image, its V
    merged tokens are the units: scores are the attention each patch receives at the object block and at the
    last block (mean over heads, *sum* over the queries of the block's own attention segments, as the
    official eager code; mean over each 2 x 2 merge unit; window order undone), buffers are the anchors'
    +-1 and +-w neighbours on the image's h x w merged grid (``wrap`` as above: official flat clamp to
    [0, V-1]), N' per image (``tokens`` or ``ratio``); kept tokens keep their 3-D positions (official).
    Deviation: the official code pushes chosen tokens out of the registers by subtracting 1 from their summed
    deep score, which can pick one again when its score exceeds 1 (then fewer than N' tokens are kept); here
    they are excluded.
    """

    name = "hiprune"
    default_positions = "renumber"
    needs_vision = ("received_attention",)

    def __init__(
        self,
        tokens: int | None = None,
        alpha: float = DEFAULT_ALPHA,
        object_layer: int | None = None,
        wrap: Wrap = "official",
        positions: Positions | None = None,
        budget_scope: str = "image",
        ratio: float | None = None,
    ) -> None:
        super().__init__(positions)
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{self.name}: tokens={tokens!r} is not allowed; allowed: an integer >= 1 (and <= V)")
        if tokens is not None and ratio is not None:
            raise ValueError(f"{self.name}: pass tokens or ratio, not both")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1):
            raise ValueError(f"{self.name}: ratio={ratio!r} is the kept fraction; allowed: 0 < ratio <= 1 "
                             "(official Qwen2.5-VL 0.334/0.223/0.112)")
        self.ratio = None if ratio is None else float(ratio)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"{self.name}: alpha={alpha!r}; allowed: a number in [0, 1] (official 0.1)")
        if object_layer is not None and (
            isinstance(object_layer, bool) or not isinstance(object_layer, int) or object_layer < 1
        ):
            raise ValueError(
                f"{self.name}: object_layer={object_layer!r}; allowed: None (9 of 24 layers, scaled to the tower) "
                "or a 1-based layer in 1..depth of the vision tower"
            )
        if wrap not in WRAP_MODES:
            raise ValueError(f"{self.name}: wrap={wrap!r}; allowed: {WRAP_MODES}")
        self.tokens, self.alpha, self.object_layer, self.wrap = tokens, float(alpha), object_layer, wrap
        if budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"{self.name}: budget_scope={budget_scope!r}; allowed: {BUDGET_SCOPES}")
        self.budget_scope = budget_scope
        self._layers: tuple[int, int] | None = None  # (object, deep) encoder layer indices, set by bind_model
        self._side: int | None = None  # LLaVA-NeXT (set by bind_model): patches per crop row
        self._image_grids = None  # OneVision (set by bind_model): newline mask [V] -> the image's token grids

    def _count(self, num_visual: int) -> int:
        """N' before validation: ``tokens``, ``round(V * ratio)``, or V/3."""
        if self.tokens is not None:
            return self.tokens
        if self.ratio is not None:
            return ratio_tokens(self.ratio, num_visual)
        return max(1, num_visual // 3)

    def kept(self, num_visual: int) -> int:
        """N' for ``num_visual`` patches per sample, validated against the model and ``alpha``."""
        tokens = self._count(num_visual)
        check_tokens(self.name, tokens, num_visual)
        anchors = anchor_count(tokens, self.alpha)
        if 5 * anchors > tokens:
            raise ValueError(
                f"{self.name}: alpha={self.alpha} gives {anchors} anchors, up to {5 * anchors} tokens with their "
                f"buffers, more than tokens={tokens}; allowed: alpha with 5 * round(tokens * alpha / 5) <= tokens"
            )
        return tokens

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        if self._side is not None:  # NeXT: newline tokens kept on top, per-crop counts: known at selection
            return [Stage(layer=0, keep=None)]
        return [Stage(layer=0, keep=self.kept(num_visual))]

    def bind_model(self, model) -> None:
        from finepruner.engine.vision import received_attention_signal  # no import cycle
        from finepruner.models.adapters import adapter_for  # no import cycle

        adapter = adapter_for(model)
        config = model.config
        if adapter.has_cls(config):
            require_default_features(self.name, model, "patch tokens on the grid, [CLS] dropped")
        depth, deep = adapter.vision_layers()
        reference = getattr(adapter, "hiprune_object_layer", (DEFAULT_OBJECT_LAYER, REFERENCE_DEPTH))
        default = default_object_layer(depth, reference)
        layer = self.object_layer if self.object_layer is not None else default
        if layer > depth:
            raise ValueError(
                f"{self.name}: object_layer={layer} but the vision tower has {depth} layers; allowed: object_layer "
                f"in 1..{depth} (or None: {default} on this tower)"
            )
        self._layers = (layer - 1, deep)
        self.needs_vision = tuple(dict.fromkeys(received_attention_signal(i) for i in self._layers))

        self._side = None
        self._image_grids = None
        if adapter.packs_crops:  # LLaVA-NeXT/OneVision: each crop's patch grid side (the handle plans again)
            vision = config.vision_config
            self._side = int(vision.image_size) // int(vision.patch_size)
            if adapter.mixes_patches:  # OneVision: buffers on the grids of the image's tokens
                self._image_grids = functools.partial(type(adapter).image_grids, config)

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        if self._layers is None:
            raise RuntimeError(f"{self.name}: the method was not bound to a model (engine error)")
        vision = ctx.require_vision(self.name, *self.needs_vision)
        ids = ctx.visual_ids
        if vision.newline_mask is not None:
            return self._select_packed(vision, ids)
        if vision.grid_column is not None:  # each image its own merged grid (Qwen)
            return self._select_grids(vision, ids, stage.keep)
        num_visual = ids.shape[1]
        if vision.patches_per_image != num_visual:
            images = num_visual / vision.patches_per_image if vision.patches_per_image else float("nan")
            raise ValueError(
                f"{self.name}: a sample has {images:g} images; HiPrune selects per image on its patch grid and "
                "needs one image per sample (LLaVA-1.5 layout)"
            )
        width = math.isqrt(num_visual)
        if width * width != num_visual:
            raise ValueError(f"{self.name}: {num_visual} patches per image do not form a square grid")
        device = ids.device
        obj, deep = (vision.received_attention[i].to(device).gather(1, ids) for i in self._layers)
        return hiprune_select(obj, deep, stage.keep, self.alpha, width, self.wrap)

    def _select_grids(self, vision, ids: torch.Tensor, tokens: int) -> torch.Tensor:
        """Images that are each one grid of their own shape (Qwen's merged grids, ``grid_column``):
        ``hiprune_select`` per image with its own grid width."""
        device = ids.device
        num_visual = ids.shape[1]
        if vision.patches_per_image != num_visual:
            raise ValueError(f"{self.name}: the selection got {num_visual} tokens of images of "
                             f"{vision.patches_per_image}; HiPrune selects per image before the language model")
        width = vision.grid_column.to(device).amax(dim=1) + 1  # [B] grid widths
        obj, deep = (vision.received_attention[i].to(device).gather(1, ids) for i in self._layers)
        return hiprune_select(obj, deep, tokens, self.alpha, width, self.wrap)

    def _token_neighbours(self, newline: torch.Tensor) -> torch.Tensor:
        """[V, 4] long: each token's -1/+1/-row/+row neighbour on its grid of the image's tokens (OneVision:
        the base crop's grid, the unpadded, possibly shrunk tile grid; ``ModelAdapter.image_grids``), as a
        token index; ``wrap="official"`` clamps the flat cell index to the grid, ``"grid"`` gives -1 across an
        edge; -1 at newline tokens."""
        table = torch.full((int(newline.shape[0]), 4), -1, dtype=torch.long)
        for grid in self._image_grids(newline).grids:
            cells = grid.cells().reshape(-1)
            count = cells.numel()
            flat = torch.arange(count)
            column = flat % grid.cols
            for k, step in enumerate((-1, 1, -grid.cols, grid.cols)):
                target = flat + step
                if self.wrap == "grid":
                    valid = (target >= 0) & (target < count)
                    valid &= (column > 0) if step == -1 else (column < grid.cols - 1) if step == 1 else valid
                    table[cells, k] = torch.where(valid, cells[target.clamp(0, count - 1)], -1)
                else:
                    table[cells, k] = cells[target.clamp(0, count - 1)]
        return table

    def _unit_count(self, members: int) -> int:
        """N' of one budget unit of ``members`` patches: the image (validated) or a crop (capped)."""
        if self.budget_scope == "image":
            return self.kept(members)
        count = min(self._count(members), members)
        if 5 * anchor_count(count, self.alpha) > count:
            raise ValueError(
                f"{self.name}: alpha={self.alpha} gives {anchor_count(count, self.alpha)} anchors for a crop of "
                f"{count} tokens, more with their buffers; allowed: alpha with 5 * round(tokens * alpha / 5) <= tokens"
            )
        return count

    def _select_packed(self, vision, ids: torch.Tensor) -> torch.Tensor:
        """LLaVA-NeXT: per image (or crop), newline tokens kept and not counted. Anchors are the top object-layer
        scores of the unit, their buffers the patches at +-1 and +-side on the anchor's own crop grid (flat
        patch index clamped to the crop with ``wrap="official"``; dropped across a row edge or outside the crop
        with ``"grid"``) that are tokens of the image (unpadding may have removed them); registers fill the
        unit's count with the top deep-layer scores of the rest."""
        from finepruner.engine.vision import image_candidates  # no import cycle

        device = ids.device
        side = self._side
        patches = side * side
        newline, crop = image_candidates(vision, ids)
        patch = vision.patch_index.to(device).gather(1, ids)
        obj, deep = (vision.received_attention[i].to(device).gather(1, ids).float() for i in self._layers)
        batch, num_visual = ids.shape
        plans = []
        for b in range(batch):
            candidates = torch.nonzero(~newline[b])[:, 0]
            if self.budget_scope == "image":
                units = [candidates]
            else:
                units = [candidates[crop[b, candidates] == c] for c in torch.unique(crop[b, candidates]).tolist()]
            plans.append([(members, self._unit_count(members.numel())) for members in units])
        lines = [int(newline[b].sum()) for b in range(batch)]
        totals = [lines[b] + sum(n for _, n in units) for b, units in enumerate(plans)]
        if self.budget_scope == "crop" and len(set(totals)) > 1:
            raise ValueError(
                f"{self.name}: budget_scope='crop' keeps {sorted(set(totals))} tokens for images of the same token "
                "count in one batch (different crop layouts); batch them separately or use budget_scope='image'"
            )
        width = max(totals)
        rows = []
        for b, units in enumerate(plans):
            token_of = torch.full(((int(crop[b].max()) + 1) * patches,), -1, dtype=torch.long, device=device)
            valid = ~newline[b]
            token_of[(crop[b] * patches + patch[b])[valid]] = torch.arange(num_visual, device=device)[valid]
            chosen = torch.zeros(num_visual, dtype=torch.bool, device=device)
            chosen[newline[b]] = True
            table = None if self._image_grids is None else self._token_neighbours(newline[b]).to(device)
            for unit, (members, count) in enumerate(units):
                count += width - totals[b] if unit == 0 else 0  # image scope: fewer newlines than another unit
                picked = torch.zeros(num_visual, dtype=torch.bool, device=device)
                order = obj[b, members].argsort(descending=True, stable=True)
                anchors = members[order[:anchor_count(count, self.alpha)]]
                picked[anchors] = True
                if table is not None:  # OneVision: the anchors' neighbours on their token grid, within the unit
                    inside = torch.zeros(num_visual, dtype=torch.bool, device=device)
                    inside[members] = True
                    target = table[anchors].reshape(-1)
                    target = target[target >= 0]
                    picked[target[inside[target]]] = True
                home, column = crop[b, anchors] * patches, patch[b, anchors] % side
                for step in (-1, 1, -side, side) if table is None else ():
                    neighbour = patch[b, anchors] + step
                    if self.wrap == "grid":
                        ok = (neighbour >= 0) & (neighbour < patches)
                        ok &= (column > 0) if step == -1 else (column < side - 1) if step == 1 else ok
                        neighbour = torch.where(ok, neighbour, patch[b, anchors])
                    target = token_of[home + neighbour.clamp(0, patches - 1)]
                    picked[target[target >= 0]] = True
                left = count - int(picked.sum())
                rest = members[~picked[members]]
                registers = rest[deep[b, rest].argsort(descending=True, stable=True)[:left]]
                picked[registers] = True
                chosen |= picked
            rows.append(torch.nonzero(chosen)[:, 0])
        return torch.stack(rows)
