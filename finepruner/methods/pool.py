"""``pool``: plain spatial downsampling of the visual-token grid, spec ``methods_more.md`` §6.

Before the language model, every visual token is replaced by an ``h x w`` grid of averages: the square
``G x G`` patch grid (24 x 24 on LLaVA-1.5) goes through ``adaptive_avg_pool2d`` to ``(h, w)``, by
default on the pre-projector CLIP features, which are then projected. The pooled tokens enter the image
span in raster order with contiguous positions. A weak-but-honest floor, not a copy of a paper's row.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from finepruner.methods.base import Positions, PruningMethod, Selection, Stage, StageContext

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


def bin_origins(side: int, grid: tuple[int, int]) -> torch.Tensor:
    """[h*w] raster index of each bin's top-left patch (``floor(i * G / h)``, ``floor(j * G / w)``)."""
    h, w = grid
    rows = torch.arange(h) * side // h
    cols = torch.arange(w) * side // w
    return (rows[:, None] * side + cols[None, :]).flatten()


class Pool(PruningMethod):
    """Pool: 2-D pooling of the visual-token grid to ``h x w`` tokens, before the LLM (spec §6).

    What "N tokens" means: ``h * w`` pooled tokens per sample enter the language model. With the default
    ``shape="exact"``, ``tokens=N`` maps to the most square ``h x w = N`` that fits the grid (LLaVA-1.5:
    64 = 8x8, 128 = 16x8, 192 = 16x12, so exactly N); ``shape="square"`` takes the near-square grid with the
    closest count instead (64 = 8x8, 128 -> 11x12 = 132, 192 -> 14x14 = 196): the true count is
    ``pool.grid(V)`` and ``handle.stats.visual_tokens``.

    Parameters:
        tokens: N (default 144 = V/4 on LLaVA-1.5, i.e. a 12x12 grid; in general V/4).
        grid: ``(h, w)`` directly instead of ``tokens`` (each 1..G).
        shape: ``"exact"`` (default) or ``"square"`` (above).
        where: ``"pre_projector"`` (default: pool the CLIP features, then run the projector on the pooled
            tokens) or ``"post_projector"`` (pool the projector outputs; the GELU MLP makes them differ).
        reduce: ``"avg"`` (default, ``adaptive_avg_pool2d``) or ``"max"`` (UniPruneBench's other variant).
        positions: ``"renumber"`` (default: contiguous positions, a plain shorter sequence) or
            ``"original"`` (each pooled token takes the position of its bin's top-left patch).

    Needs one square grid of V = G*G visual tokens per sample (one image, LLaVA-1.5 style); other layouts
    raise. LLaVA-NeXT (per-crop pooling) is not covered.
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
        self.tokens, self.shape, self.where, self.reduce = tokens, shape, where, reduce
        self.grid_size = grid

    def grid(self, num_visual: int) -> tuple[int, int]:
        """``(h, w)`` for ``num_visual`` visual tokens (validated); ``h * w`` tokens enter the LLM."""
        side = math.isqrt(num_visual)
        if side * side != num_visual:
            raise ValueError(
                f"{self.name}: {num_visual} visual tokens per sample are not one square grid; pool needs one "
                "image of G x G patches per sample (LLaVA-1.5 layout)"
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
        if self.shape == "square":
            return square_grid(tokens, side)
        grid = exact_grid(tokens, side)
        if grid is None:
            near = square_grid(tokens, side)
            raise ValueError(
                f"{self.name}: tokens={tokens} is no h x w grid with h, w <= {side}; allowed: a product of two "
                f"integers <= {side}, or shape='square' (here {near[0]}x{near[1]} = {near[0] * near[1]}), "
                "or grid=(h, w)"
            )
        return grid

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        h, w = self.grid(num_visual)
        return [Stage(layer=0, keep=0, insert=h * w)]

    def bind_model(self, model: torch.nn.Module) -> None:
        """Refuse ``where="pre_projector"`` on a family whose projector cannot take pooled features."""
        from finepruner.models.adapters import adapter_for

        adapter = adapter_for(model)
        if self.where == "pre_projector" and not adapter.projects_new_tokens:
            raise ValueError(f"{self.name}: where='pre_projector' projects pooled vision features, which "
                             f"{adapter.family}'s projector cannot (its merger folds 2 x 2 patches into one token); "
                             "use where='post_projector' (pools the merged tokens)")

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> Selection:
        ids = ctx.visual_ids
        batch, num_visual = ids.shape
        if ctx.vision is not None and ctx.vision.newline_mask is not None:
            raise ValueError(f"{self.name} pools one square G x G patch grid per image; anyres images (base crop, "
                             "tiles and newline tokens, LLaVA-NeXT/OneVision) are not one grid")
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


def _expand(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return ids.to(values.device)[..., None].expand(-1, -1, values.shape[-1])
