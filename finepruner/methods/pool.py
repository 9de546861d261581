"""``pool``: plain spatial downsampling of the visual-token grid, spec ``methods_more.md`` §6.

Before the language model, every visual token is replaced by an ``h x w`` grid of averages: the square
``G x G`` patch grid (24 x 24 on LLaVA-1.5) goes through ``adaptive_avg_pool2d`` to ``(h, w)``, by
default on the pre-projector CLIP features, which are then projected. The pooled tokens enter the image
span in raster order with contiguous positions. A weak-but-honest floor, not a copy of a paper's row.

LLaVA-NeXT / OneVision ("pool each crop", §6; ``spec/models.md`` §1.1-§1.2): each grid of an image, as the
adapter describes it (``ModelAdapter.image_grids``: the base crop's patch grid, the unpadded tile grid with
one newline per row), is pooled with the stride of one crop pooled to ``h x w``; the newline tokens are laid
again, one after each pooled row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from finepruner.methods.base import Positions, PruningMethod, Selection, Stage, StageContext

if TYPE_CHECKING:
    from finepruner.models.adapters.base import ImageGrids, TokenGrid

Shape = Literal["exact", "square"]
SHAPES: tuple[str, ...] = ("exact", "square")
Where = Literal["pre_projector", "post_projector"]
WHERES: tuple[str, ...] = ("pre_projector", "post_projector")
Reduce = Literal["avg", "max"]
REDUCES: tuple[str, ...] = ("avg", "max")


def exact_grid(tokens: int, side: int) -> tuple[int, int] | None:
    """``(h, w)`` with ``h * w = tokens``, ``w <= h <= side`` and ``h - w`` smallest; None if none exists.
    On a 24 x 24 grid: 64 -> (8, 8), 128 -> (16, 8), 192 -> (16, 12)."""
    best = None
    for w in range(1, math.isqrt(tokens) + 1):
        h, rest = divmod(tokens, w)
        if not rest and h <= side:
            best = (h, w)  # w grows, so the last fit is the most square
    return best


def square_grid(tokens: int, side: int) -> tuple[int, int]:
    """The near-square ``(a, a)`` or ``(a, a + 1)`` grid (a + 1 <= side) whose count is closest to ``tokens``
    (the smaller count on ties): 64 -> (8, 8) = 64, 128 -> (11, 12) = 132, 192 -> (14, 14) = 196."""
    candidates = [(a, b) for a in range(1, side + 1) for b in (a, a + 1) if b <= side]
    return min(candidates, key=lambda hw: (abs(hw[0] * hw[1] - tokens), hw[0] * hw[1]))


def pool_grid(features: torch.Tensor, grid: tuple[int, int], reduce: Reduce = "avg") -> torch.Tensor:
    """[B, G*G, D] raster-order features -> [B, h*w, D] pooled, raster order (``adaptive_{avg,max}_pool2d``;
    averages in float32, returned in the input dtype)."""
    batch, count, width = features.shape
    side = math.isqrt(count)
    image = features.float().view(batch, side, side, width).permute(0, 3, 1, 2)
    pool = F.adaptive_avg_pool2d if reduce == "avg" else F.adaptive_max_pool2d
    pooled = pool(image, grid)  # [B, D, h, w]
    return pooled.flatten(2).transpose(1, 2).to(features.dtype)


def pool_cells(values: torch.Tensor, target: tuple[int, int], reduce: Reduce = "avg") -> torch.Tensor:
    """[r, c, D] grid -> [th, tw, D] pooled (``adaptive_{avg,max}_pool2d`` to ``target``; float32, returned in
    the input dtype)."""
    image = values.float().permute(2, 0, 1)[None]
    pool = F.adaptive_avg_pool2d if reduce == "avg" else F.adaptive_max_pool2d
    return pool(image, target)[0].permute(1, 2, 0).to(values.dtype)


def pooled_shape(rows: int, cols: int, crop_grid: tuple[int, int], side: int) -> tuple[int, int]:
    """The pooled shape of a ``rows x cols`` token grid at the stride of one ``side x side`` crop pooled to
    ``crop_grid``: ``round(rows * h / side) x round(cols * w / side)`` (halves up), at least 1 and at most
    the grid. A crop's own grid gives ``crop_grid``; a tile grid of ``a x b`` whole crops ``a*h x b*w``."""
    h, w = crop_grid
    return (min(rows, max(1, (2 * rows * h + side) // (2 * side))),
            min(cols, max(1, (2 * cols * w + side) // (2 * side))))


def bin_starts(size: int, bins: int) -> torch.Tensor:
    """[bins] first row (or column) of each adaptive-pooling bin: ``floor(i * size / bins)``."""
    return torch.arange(bins) * size // bins


def bin_ends(size: int, bins: int) -> torch.Tensor:
    """[bins] last row (or column) of each adaptive-pooling bin: ``ceil((i + 1) * size / bins) - 1``."""
    return -((-(torch.arange(bins) + 1) * size) // bins) - 1


def bin_origins(side: int, grid: tuple[int, int]) -> torch.Tensor:
    """[h*w] raster index of each bin's top-left patch (``floor(i * G / h)``, ``floor(j * G / w)``)."""
    h, w = grid
    rows = torch.arange(h) * side // h
    cols = torch.arange(w) * side // w
    return (rows[:, None] * side + cols[None, :]).flatten()


class Pool(PruningMethod):
    """Pool: 2-D pooling of the visual-token grid to ``h x w`` tokens, before the LLM (spec §6).

    What "N tokens" means on one square grid per sample (LLaVA-1.5): ``h * w`` pooled tokens per sample enter
    the language model. With the default ``shape="exact"``, ``tokens=N`` maps to the most square ``h x w = N``
    that fits the grid (LLaVA-1.5: 64 = 8x8, 128 = 16x8, 192 = 16x12, so exactly N); ``shape="square"`` takes
    the near-square grid with the closest count instead (64 = 8x8, 128 -> 11x12 = 132, 192 -> 14x14 = 196):
    the true count is ``pool.grid(V)`` and ``handle.stats.visual_tokens``.

    On families whose images are several grids (``ModelAdapter.image_grids``: LLaVA-NeXT, OneVision; spec
    §6 "pool each crop") the budget is per crop: every ``S x S`` crop grid is pooled to ``h x w``
    (``grid=(h, w)``), and ``tokens=N`` counts per image as the papers' LLaVA-NeXT budgets do, a base crop
    plus 2 x 2 tiles (``reference_crops=5``: 320 / 640 / 960 -> 64 / 128 / 192 per crop), mapped to ``h x w``
    by ``shape`` on the crop (default: ``S*S/4`` per crop, 12x12 of 24x24). The base grid becomes ``h x w``;
    the tile grid (unpadded, possibly shrunk by OneVision's anyres_max) ``rows x cols`` becomes
    ``pooled_shape`` (the same stride: ``round(rows*h/S) x round(cols*w/S)``) with one newline token after
    each pooled row; a trailing newline stays. The true count varies per image (``handle.stats``).

    Parameters:
        tokens: N (default 144 = V/4 on LLaVA-1.5, i.e. a 12x12 grid; in general V/4; per crop S*S/4 above).
        grid: ``(h, w)`` directly instead of ``tokens`` (each 1..G; per crop, 1..S, above).
        shape: ``"exact"`` (default) or ``"square"`` (above).
        where: ``"pre_projector"`` (default: pool the CLIP features, then run the projector on the pooled
            tokens) or ``"post_projector"`` (pool the projector outputs; the GELU MLP makes them differ).
        reduce: ``"avg"`` (default, ``adaptive_avg_pool2d``) or ``"max"`` (UniPruneBench's other variant).
        positions: ``"renumber"`` (default: contiguous positions, a plain shorter sequence) or
            ``"original"`` (each pooled token takes the position of its bin's top-left patch; a newline token
            that of the newline after its bins' last row).
        reference_crops: the crops ``tokens`` counts on families with several grids per image (default 5).

    Needs one square grid of V = G*G visual tokens per sample (one image, LLaVA-1.5 style) or a family that
    describes its images' grids; other layouts raise.
    """

    name = "pool"
    default_positions = "renumber"
    needs_vision = ("patch_features", "projected_features")

    def __init__(
        self,
        tokens: int | None = None,
        grid: tuple[int, int] | list[int] | None = None,
        shape: Shape = "exact",
        where: Where = "pre_projector",
        reduce: Reduce = "avg",
        positions: Positions | None = None,
        reference_crops: int = 5,
    ) -> None:
        super().__init__(positions)
        if tokens is not None and grid is not None:
            raise ValueError(f"{self.name}: pass tokens or grid, not both")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{self.name}: tokens={tokens!r}; allowed: an integer >= 1 (and <= V)")
        if grid is not None:
            if (not isinstance(grid, tuple | list) or len(grid) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid)):
                raise ValueError(f"{self.name}: grid={grid!r}; allowed: two integers (h, w) >= 1")
            grid = (int(grid[0]), int(grid[1]))
        for label, value, allowed in (("shape", shape, SHAPES), ("where", where, WHERES),
                                      ("reduce", reduce, REDUCES)):
            if value not in allowed:
                raise ValueError(f"{self.name}: {label}={value!r}; allowed: {allowed}")
        if isinstance(reference_crops, bool) or not isinstance(reference_crops, int) or reference_crops < 1:
            raise ValueError(f"{self.name}: reference_crops={reference_crops!r}; allowed: an integer >= 1")
        self.tokens, self.shape, self.where, self.reduce = tokens, shape, where, reduce
        self.grid_size = grid
        self.reference_crops = reference_crops
        # set on a family whose images are several grids (``_bind_family``): its image_grids and crop side
        self._image_grids: Callable[[torch.Tensor], ImageGrids] | None = None
        self._side: int | None = None

    def _shaped(self, tokens: int, side: int) -> tuple[int, int]:
        """``tokens`` on a ``side x side`` grid as ``(h, w)`` by ``shape`` (``"exact"`` raises without one)."""
        if self.shape == "square":
            return square_grid(tokens, side)
        grid = exact_grid(tokens, side)
        if grid is None:
            near = square_grid(tokens, side)
            shown = self.tokens if self._side is not None and self.tokens is not None else tokens
            raise ValueError(
                f"{self.name}: tokens={shown} is no h x w grid with h, w <= "
                f"{side}{'' if self._side is None else f' ({tokens} per crop)'}; allowed: a product of two "
                f"integers <= {side}, or shape='square' (here {near[0]}x{near[1]} = {near[0] * near[1]}), "
                "or grid=(h, w)"
            )
        return grid

    def grid(self, num_visual: int) -> tuple[int, int]:
        """``(h, w)`` for ``num_visual`` visual tokens (validated); ``h * w`` tokens enter the LLM. On a
        family with several grids per image: the per-crop grid (``crop_grid``)."""
        if self._side is not None:
            return self.crop_grid()
        side = math.isqrt(num_visual)
        if side * side != num_visual:
            raise ValueError(
                f"{self.name}: {num_visual} visual tokens per sample are not one square grid; pool needs one "
                "image of G x G patches per sample (LLaVA-1.5 layout) or a family whose images are described as "
                "grids (LLaVA-NeXT, OneVision)"
            )
        if self.grid_size is not None:
            if max(self.grid_size) > side:
                raise ValueError(
                    f"{self.name}: grid={self.grid_size} on a {side}x{side} grid; allowed: h, w in 1..{side}"
                )
            return self.grid_size
        tokens = self.tokens if self.tokens is not None else max(1, num_visual // 4)
        if tokens > num_visual:
            raise ValueError(
                f"{self.name}: tokens={tokens} is not allowed; this model has {num_visual} visual tokens per "
                f"sample, so tokens must be in 1..{num_visual}"
            )
        return self._shaped(tokens, side)

    def crop_grid(self) -> tuple[int, int]:
        """``(h, w)`` each ``S x S`` crop grid is pooled to, on a family with several grids per image
        (validated): ``grid``, or ``tokens / reference_crops`` (rounded, at least 1) mapped by ``shape``."""
        side = self._side
        if side is None:
            raise RuntimeError(f"{self.name}: crop_grid needs the method bound to a family with image grids")
        if self.grid_size is not None:
            if max(self.grid_size) > side:
                raise ValueError(f"{self.name}: grid={self.grid_size} per crop of {side}x{side} patches; allowed: "
                                 f"h, w in 1..{side}")
            return self.grid_size
        if self.tokens is None:
            return self._shaped(max(1, side * side // 4), side)
        per_crop = max(1, (2 * self.tokens + self.reference_crops) // (2 * self.reference_crops))
        if per_crop > side * side:
            raise ValueError(
                f"{self.name}: tokens={self.tokens} is not allowed; tokens counts {self.reference_crops} crops "
                f"(reference_crops) of {side}x{side} patches per image here, so tokens must be in "
                f"1..{self.reference_crops * side * side}"
            )
        return self._shaped(per_crop, side)

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        if self._side is not None:  # several grids per image: the count depends on the image's layout
            self.crop_grid()
            return [Stage(layer=0, keep=0, insert=None)]
        h, w = self.grid(num_visual)
        return [Stage(layer=0, keep=0, insert=h * w)]

    def _bind_family(self, model: torch.nn.Module) -> None:
        """Note whether the model's family describes its images as several grids (``image_grids``; the
        handle plans against the family's largest image before ``bind_model``, so this runs first)."""
        from finepruner.models.adapters import adapter_for  # no import cycle

        adapter = adapter_for(model)
        image_grids = partial(type(adapter).image_grids, adapter.config)
        try:
            probe = image_grids(torch.zeros(adapter.patches_per_crop, dtype=torch.bool))
        except ValueError as error:
            raise ValueError(f"{self.name}: {adapter.family}: {error}") from None
        self._image_grids = None if probe is None else image_grids
        self._side = None if probe is None else probe.crop_side

    def required_vision(self, model: torch.nn.Module) -> tuple[str, ...]:
        self._bind_family(model)
        return tuple(self.needs_vision)

    def bind_model(self, model: torch.nn.Module) -> None:
        """Refuse ``where="pre_projector"`` on a family whose projector cannot take pooled features."""
        from finepruner.models.adapters import adapter_for

        self._bind_family(model)
        adapter = adapter_for(model)
        if self.where == "pre_projector" and not adapter.projects_new_tokens:
            raise ValueError(f"{self.name}: where='pre_projector' projects pooled vision features, which "
                             f"{adapter.family}'s projector cannot (its merger folds 2 x 2 patches into one token); "
                             "use where='post_projector' (pools the merged tokens)")

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> Selection:
        if self._image_grids is not None:
            return self._select_grids(ctx)
        ids = ctx.visual_ids
        batch, num_visual = ids.shape
        if ctx.vision is not None and ctx.vision.newline_mask is not None:
            raise ValueError(f"{self.name} pools one square G x G patch grid per image; this family's anyres "
                             "images (base crop, tiles and newline tokens) are not described as grids")
        grid = self.grid(num_visual)
        if self.where == "pre_projector":
            vision = ctx.require_vision(self.name, "patch_features", projector=True)
            features = vision.patch_features
            pooled = vision.project(pool_grid(features.gather(1, _expand(ids, features)), grid, self.reduce))
        else:
            features = ctx.require_vision(self.name, "projected_features").projected_features
            pooled = pool_grid(features.gather(1, _expand(ids, features)), grid, self.reduce)
        origins = bin_origins(math.isqrt(num_visual), grid).to(ids.device).expand(batch, -1)
        keep = torch.empty(batch, 0, dtype=torch.long, device=ids.device)
        return Selection(keep=keep, insert=pooled.to(ids.device), insert_from=origins)

    def _select_grids(self, ctx: StageContext) -> Selection:
        """Every image of the group pooled grid by grid (``pool_image``); images of one token count whose
        layouts pool to different counts are padded (``Selection.insert_valid``)."""
        pre = self.where == "pre_projector"
        vision = ctx.require_vision(self.name, "patch_features", "projected_features", projector=pre)
        if vision.newline_mask is None:
            raise RuntimeError(f"{self.name}: no newline mask reached the selection (engine error)")
        ids = ctx.visual_ids
        device = ids.device
        batch = ids.shape[0]
        newline = vision.newline_mask.to(device).gather(1, ids)
        embeds = vision.projected_features.to(device)
        embeds = embeds.gather(1, _expand(ids, embeds))
        features = embeds
        if pre:
            features = vision.patch_features.to(device)
            features = features.gather(1, _expand(ids, features))
        rows, origins = [], []
        for b in range(batch):
            try:
                layout = self._image_grids(newline[b])
            except ValueError as error:
                raise ValueError(f"{self.name}: {error}") from None
            pooled, origin = pool_image(layout, features[b], embeds[b], self.crop_grid(), self.reduce,
                                        vision.project if pre else None)
            rows.append(pooled)
            origins.append(origin.to(device))
        width = max(row.shape[0] for row in rows)
        insert = embeds.new_zeros(batch, width, embeds.shape[-1])
        insert_from = torch.zeros(batch, width, dtype=torch.long, device=device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
        for b, (row, origin) in enumerate(zip(rows, origins, strict=True)):
            insert[b, :row.shape[0]] = row.to(device, insert.dtype)
            insert_from[b, :row.shape[0]] = origin
            valid[b, :row.shape[0]] = True
        keep = torch.empty(batch, 0, dtype=torch.long, device=device)
        return Selection(keep=keep, insert=insert, insert_from=insert_from,
                         insert_valid=None if bool(valid.all()) else valid)


def pool_grid_tokens(grid: TokenGrid, features: torch.Tensor, crop_grid: tuple[int, int], side: int,
                     reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """One grid of an image pooled at the crop stride (``pooled_shape``): ``(pooled [th*tw, D] raster order,
    origins [th, tw] the token index of each bin's top-left cell, (th, tw))``."""
    cells = grid.cells().to(features.device)
    target = pooled_shape(grid.rows, grid.cols, crop_grid, side)
    pooled = pool_cells(features[cells], target, reduce).reshape(-1, features.shape[-1])
    rows, cols = bin_starts(grid.rows, target[0]), bin_starts(grid.cols, target[1])
    return pooled, cells.cpu()[rows[:, None], cols[None, :]], target


def pool_image(layout: ImageGrids, features: torch.Tensor, embeds: torch.Tensor, crop_grid: tuple[int, int],
               reduce: Reduce, project: Callable[[torch.Tensor], torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One image pooled grid by grid (spec §6, "pool each crop"), laid out as the family lays a grid: each
    grid's pooled tokens in raster order, a newline token after each pooled row where the grid has them, then
    the trailing newline tokens. ``features`` [V, Dv] are what is pooled (pre-projector features, then
    ``project``-ed; or the language model's inputs), ``embeds`` [V, D] the image's language-model inputs
    (newline tokens are taken from there). Returns ``(tokens [n, D], origins [n])``: each token's source index
    among the image's tokens (its bin's top-left cell; a newline: the newline after its bins' last row)."""
    count = embeds.shape[0]
    if layout.count != count:
        raise RuntimeError(f"an image of {count} tokens described as grids of {layout.count} (engine error)")
    pooled = [pool_grid_tokens(grid, features, crop_grid, layout.crop_side, reduce) for grid in layout.grids]
    values = torch.cat([p for p, _, _ in pooled])
    if project is not None:
        values = project(values)
    values = values.to(embeds.device, embeds.dtype)
    parts, origins, start = [], [], 0
    for grid, (_, origin, (th, tw)) in zip(layout.grids, pooled, strict=True):
        block = values[start:start + th * tw]
        start += th * tw
        if not grid.row_newlines:
            parts.append(block)
            origins.append(origin.reshape(-1))
            continue
        lines = grid.newlines()[bin_ends(grid.rows, th)]  # the newline after each pooled row's last source row
        line_rows = embeds[lines.to(embeds.device)]  # [th, D]
        parts.append(torch.cat([block.view(th, tw, -1), line_rows[:, None]], dim=1).reshape(-1, block.shape[-1]))
        origins.append(torch.cat([origin, lines[:, None]], dim=1).reshape(-1))
    if layout.trailing_newlines:
        tail = torch.arange(count - layout.trailing_newlines, count)
        parts.append(embeds[tail.to(embeds.device)])
        origins.append(tail)
    return torch.cat(parts), torch.cat(origins)


def _expand(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return ids.to(values.device)[..., None].expand(-1, -1, values.shape[-1])
