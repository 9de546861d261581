"""``finepruner show``: kept-token overlays and per-head attention grids for one image and question.

Both pictures are composed with Pillow at exact pixel sizes (``overlay_size``, ``head_grid_size``):

* ``tokens.png``: one column per method, one row per pruning stage; each panel is the image as the model
  sees it with the visual tokens the stage kept shown in full colour and the pruned ones darkened, on the
  image's token grids as its adapter lays them out (``ModelAdapter.token_grids``, ``spec/models.md`` §1):
  LLaVA-1.5 one square grid over the padded square image (24 x 24); Qwen2/2.5-VL/Qwen3-VL one merged grid
  over the image as ``smart_resize`` squashed it; LLaVA-NeXT/OneVision the (unpadded, OneVision: possibly
  shrunk) tile grid over the image in the panel, and the base crop's grid over the whole image squashed to
  a square in a half-size panel to its right (``INSET``). ``image_newline`` tokens are not drawn (they are
  counted in the label's ``kept/total``).
* ``heads.png``: the last-query attention of every head at the scoring layer of one method's first
  attention stage, each head's map on the same grids; the heads the method selected have a red frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from finepruner.models.adapters.base import GridRegion, TokenGrid, TokenLayout

GAP = 8
TITLE_H = 24
LABEL_H = 16
DIM = 0.25  # brightness of pruned tokens
SELECTED = (230, 30, 30)
PAD_GREY = 128  # the grid's cells outside the image (a padded anyres pinpoint)
ABSENT = (96, 96, 96)  # head-map cells of tokens absent at the stage (pruned before it)
INSET = 2  # the second grid's panel (anyres base crop) is 1/INSET of the main panel's side


@dataclass
class MethodView:
    """What one method did on the image: per stage, the kept token ids (original tokens only), the heads
    chosen and the attention [heads, n_visual] it scored with over the image's tokens (NaN at tokens pruned
    before the stage; None where the stage had none); ``layout``: the image's token grids (None: one square
    grid of ``num_visual`` tokens)."""

    label: str
    num_visual: int
    kept: list[np.ndarray]
    heads: list[np.ndarray | None]
    attention: list[np.ndarray | None]
    answer: str = ""
    layout: TokenLayout | None = None

    def grids(self) -> TokenLayout:
        """The image's token grids (``layout``, else one square grid of ``num_visual`` tokens)."""
        if self.layout is not None:
            return self.layout
        side = _side(self.num_visual)
        return TokenLayout(self.num_visual, (GridRegion(TokenGrid(0, side, side)),))


def view_image(image: Image.Image, processor: Any, aspect: str = "pad") -> Image.Image:
    """The image as the model sees it (before resizing): padded to a square with the mean colour."""
    from finepruner.eval.prompting import expand2square, image_background

    image = image.convert("RGB")
    return expand2square(image, image_background(processor)) if aspect == "pad" else image


def image_layout(model: Any, processor: Any, image: Image.Image, question: str,
                 aspect: str = "pad") -> TokenLayout:
    """The token grids of ``image`` (as prepared for the model) in the prompt of ``question``: the processor's
    inputs handed to the model's adapter (``ModelAdapter.token_grids``); a ValueError names why none exist."""
    from finepruner.eval.runner import Generator

    generator = Generator(model, processor, aspect)
    inputs = generator.model_inputs([generator.build_prompt(question, True)], [image])
    return generator.adapter.token_grids(inputs, 0)


def _stage_attention(attention: Any, present: np.ndarray, count: int) -> np.ndarray:
    """[heads, count] float32 of one stage's attention [heads, len(present)] over the tokens present at the
    stage (``present``: their ids in sequence order), NaN at the tokens absent (pruned before) or merged."""
    attention = np.asarray(attention, dtype=np.float32)
    if attention.shape[1] != len(present):
        raise ValueError(f"a stage scored {attention.shape[1]} tokens but {len(present)} were present")
    full = np.full((attention.shape[0], count), np.nan, dtype=np.float32)
    real = (present >= 0) & (present < count)
    full[:, present[real]] = attention[:, real]
    return full


def run_methods(model: Any, processor: Any, image: Image.Image, question: str,
                methods: Sequence[tuple[str, Mapping[str, Any]]], aspect: str = "pad",
                max_new_tokens: int = 8) -> list[MethodView]:
    """Apply each method in turn, generate a short answer, and collect what it kept on the image's grids."""
    import finepruner
    from finepruner.eval.runner import Generator

    generator = Generator(model, processor, aspect)
    prepared = view_image(image, processor, aspect) if aspect == "pad" else image.convert("RGB")
    layout = image_layout(model, processor, prepared, question, aspect)  # refuses what cannot be drawn, first
    count = layout.count
    views = []
    for name, params in methods:
        with finepruner.apply(model, name, processor=processor, **dict(params)) as handle:
            answer = generator.generate([question], [prepared], max_new_tokens)[0]
        every = [k[0].detach().cpu().numpy() for k in handle.kept]
        merged = [None if m is None else m[0].detach().cpu().numpy() for m in (handle.merged or [])]
        merged += [None] * (len(every) - len(merged))
        kept = [k[(k >= 0) & (k < count)] for k in every]
        heads = [None if h is None else np.asarray(h[0].detach().cpu()) for h in (handle.heads or [])]
        attention = []
        for stage, a in enumerate(handle.attention or []):
            if a is None:
                attention.append(None)
                continue
            if stage == 0:
                present = np.arange(count)
            else:  # the tokens after the previous stage: its kept ones, then those it inserted
                extra = merged[stage - 1]
                present = every[stage - 1] if extra is None else np.concatenate([every[stage - 1], extra])
                present = present[present >= 0]
            attention.append(_stage_attention(a[0].detach().float().cpu().numpy(), present, count))
        heads += [None] * (len(kept) - len(heads))
        attention += [None] * (len(kept) - len(attention))
        extra = ",".join(f"{k}={v}" for k, v in params.items())
        views.append(MethodView(f"{name} {extra}".strip(), count, kept, heads, attention, answer, layout))
    return views


def _side(num_visual: int) -> int:
    side = math.isqrt(num_visual)
    if side * side != num_visual:
        raise ValueError(f"{num_visual} visual tokens do not form a square grid (anyres is not supported)")
    return side


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def cell_width(size: int, regions: int = 1) -> int:
    """Width of one picture of an image's grids at ``size`` pixels: ``size`` for one grid, plus a gap and a
    ``size // INSET`` square for the second grid (the anyres base crop) beside it."""
    return size if regions <= 1 else size + GAP + max(1, size // INSET)


def overlay_size(n_methods: int, n_stages: int, panel: int, regions: int = 1) -> tuple[int, int]:
    """(width, height) of ``tokens.png`` (``regions``: grids per image, 2 on LLaVA-NeXT/OneVision)."""
    rows = max(1, n_stages)
    width = cell_width(panel, regions)
    return n_methods * width + (n_methods + 1) * GAP, TITLE_H + rows * (panel + LABEL_H + GAP) + GAP


def head_grid_size(n_heads: int, tile: int, cols: int, regions: int = 1) -> tuple[int, int]:
    """(width, height) of ``heads.png`` (``regions`` as in :func:`overlay_size`)."""
    cols = max(1, min(cols, n_heads))
    rows = math.ceil(n_heads / cols)
    width = cell_width(tile, regions)
    return cols * width + (cols + 1) * GAP, TITLE_H + rows * (tile + LABEL_H + GAP) + GAP


def region_boxes(layout: TokenLayout, size: int) -> list[tuple[int, int, int, int]]:
    """``(x, y, width, height)`` of each grid of ``layout`` in one picture of ``size`` pixels (relative to its
    top-left corner): the last grid (the image's, or the anyres tile grid) fitted into ``size x size`` with
    square cells and centred, an earlier one (the base crop) fitted into the ``size // INSET`` square to its
    right."""
    boxes: list[tuple[int, int, int, int]] = []
    small = max(1, size // INSET)
    for r, region in enumerate(layout.regions):
        main = r == len(layout.regions) - 1
        area, x0 = (size, 0) if main else (small, size + GAP)
        scale = min(area / region.grid.cols, area / region.grid.rows)
        w = max(1, round(region.grid.cols * scale))
        h = max(1, round(region.grid.rows * scale))
        boxes.append((x0 + (area - w) // 2, (area - h) // 2, w, h))
    return boxes


def region_picture(image: Image.Image, region: GridRegion, width: int, height: int) -> np.ndarray:
    """[height, width, 3] float32: the part of ``image`` that ``region``'s grid covers (its ``box``), squashed
    to ``width x height``; cells beyond the image (padding) are grey."""
    left, top, right, bottom = region.box
    if (left, top, right, bottom) == (0.0, 0.0, 1.0, 1.0):
        return np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
    full_w = max(1, round(width / (right - left)))
    full_h = max(1, round(height / (bottom - top)))
    canvas = Image.new("RGB", (width, height), (PAD_GREY,) * 3)
    canvas.paste(image.convert("RGB").resize((full_w, full_h), Image.BICUBIC),
                 (round(-left * full_w), round(-top * full_h)))
    return np.asarray(canvas, dtype=np.float32)


def _cell_index(grid: TokenGrid, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel row's grid row and each pixel column's grid column in a ``width x height`` picture."""
    rows = np.linspace(0, height, grid.rows + 1).round().astype(int)
    cols = np.linspace(0, width, grid.cols + 1).round().astype(int)
    return (np.searchsorted(rows, np.arange(height), side="right") - 1,
            np.searchsorted(cols, np.arange(width), side="right") - 1)


def kept_cells(layout: TokenLayout, kept: np.ndarray) -> list[np.ndarray]:
    """Per grid of ``layout``, [rows, cols] bool: the cells whose token is in ``kept`` (token ids of the
    image; newline tokens sit in no cell)."""
    mask = np.zeros(layout.count, dtype=bool)
    mask[np.asarray(kept, dtype=np.int64)] = True
    return [mask[region.grid.cells().numpy()] for region in layout.regions]


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    font = _font()
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def token_overlay(image: Image.Image, views: Sequence[MethodView], panel: int = 336) -> Image.Image:
    """The ``tokens.png`` picture (see the module docstring)."""
    n_stages = max([len(v.kept) for v in views] + [1])
    regions = max([len(v.grids().regions) for v in views] + [1])
    width, height = overlay_size(len(views), n_stages, panel, regions)
    column = cell_width(panel, regions)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, view in enumerate(views):
        layout = view.grids()
        boxes = region_boxes(layout, panel)
        pictures = [region_picture(image, region, w, h) for region, (_, _, w, h) in zip(layout.regions, boxes,
                                                                                       strict=True)]
        index = [_cell_index(region.grid, w, h) for region, (_, _, w, h) in zip(layout.regions, boxes, strict=True)]
        x0 = GAP + col * (column + GAP)
        title = view.label + (f" -> {view.answer!r}" if view.answer else "")
        draw.text((x0, 6), _fit(draw, title, column), fill="black", font=_font())
        stages = view.kept or [np.arange(layout.count)]
        for row, kept in enumerate(stages):
            y0 = TITLE_H + row * (panel + LABEL_H + GAP)
            cells = kept_cells(layout, kept)
            for picture, (bx, by, _, _), (rows, cols), on in zip(pictures, boxes, index, cells, strict=True):
                shade = np.where(on[rows[:, None], cols[None, :]], 1.0, DIM).astype(np.float32)
                pic = Image.fromarray((picture * shade[..., None]).clip(0, 255).astype(np.uint8))
                canvas.paste(pic, (x0 + bx, y0 + by))
            n_kept = len(np.unique(np.asarray(kept)))
            label = f"stage {row + 1}: {n_kept}/{view.num_visual} kept" if view.kept else "no pruning"
            draw.text((x0, y0 + panel + 2), _fit(draw, label, column), fill="black", font=_font())
    return canvas


def _colormap(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """viridis RGB of ``values`` scaled from ``lo`` to ``hi`` (default: their min and max); NaN -> ``ABSENT``."""
    import matplotlib

    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if lo is None and finite.size else (lo or 0.0)
    hi = float(finite.max()) if hi is None and finite.size else (hi or 0.0)
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgb = (matplotlib.colormaps["viridis"](np.nan_to_num(norm))[..., :3] * 255).astype(np.uint8)
    rgb[~np.isfinite(values)] = ABSENT
    return rgb


def head_grid(view: MethodView, stage: int | None = None, tile: int = 96, cols: int = 8) -> Image.Image:
    """The ``heads.png`` picture for ``view`` (its first stage with attention unless ``stage`` is given)."""
    if stage is None:
        stage = next((i for i, a in enumerate(view.attention) if a is not None), None)
    if stage is None or view.attention[stage] is None:
        raise ValueError(f"{view.label}: no attention signal to show (the method does not score with attention)")
    attn = view.attention[stage]  # [heads, n_visual]
    layout = view.grids()
    if attn.shape[1] != layout.count:
        raise ValueError(f"{view.label}: attention over {attn.shape[1]} tokens for an image of {layout.count}")
    n_heads = attn.shape[0]
    selected = set() if view.heads[stage] is None else {int(h) for h in view.heads[stage]}
    regions = len(layout.regions)
    width, height = head_grid_size(n_heads, tile, cols, regions)
    cols = max(1, min(cols, n_heads))
    cell = cell_width(tile, regions)
    boxes = region_boxes(layout, tile)
    cells = [region.grid.cells().numpy() for region in layout.regions]
    drawn = np.unique(np.concatenate([c.reshape(-1) for c in cells]))  # newline tokens sit in no cell
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title = f"{view.label}: stage {stage + 1}, last-query attention per head; red = selected ({len(selected)})"
    draw.text((GAP, 6), _fit(draw, title, width - 2 * GAP), fill="black", font=_font())
    for h in range(n_heads):
        r, c = divmod(h, cols)
        x0 = GAP + c * (cell + GAP)
        y0 = TITLE_H + r * (tile + LABEL_H + GAP)
        values = attn[h, drawn]
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        for index, (bx, by, w, hh) in zip(cells, boxes, strict=True):
            rgb = _colormap(attn[h][index], lo, hi)
            canvas.paste(Image.fromarray(rgb).resize((w, hh), Image.NEAREST), (x0 + bx, y0 + by))
        if h in selected:
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + tile - 1), outline=SELECTED, width=3)
        draw.text((x0, y0 + tile + 2), f"head {h}" + (" *" if h in selected else ""),
                  fill=SELECTED if h in selected else "black", font=_font())
    return canvas


def show(model: Any, processor: Any, image: Image.Image, question: str,
         methods: Sequence[tuple[str, Mapping[str, Any]]], out_dir: str | Path, *, panel: int = 336,
         tile: int = 96, cols: int = 8, heads_method: int | None = None, aspect: str = "pad",
         max_new_tokens: int = 8) -> dict[str, Path]:
    """Write ``tokens.png`` and (when a method scored with attention) ``heads.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    views = run_methods(model, processor, image, question, methods, aspect, max_new_tokens)
    shown = view_image(image, processor, aspect) if aspect == "pad" else image.convert("RGB")
    written = {"tokens": out_dir / "tokens.png"}
    token_overlay(shown, views, panel).save(written["tokens"])
    if heads_method is not None:
        candidates = [heads_method]
    else:  # the first method that selects heads, else the first that scores with attention
        candidates = sorted(range(len(views)), key=lambda i: all(h is None for h in views[i].heads))
    for i in candidates:
        if i < 0 or i >= len(views):
            raise ValueError(f"--heads-method {i}: there are {len(views)} methods (0..{len(views) - 1})")
        if any(a is not None for a in views[i].attention):
            written["heads"] = out_dir / "heads.png"
            head_grid(views[i], tile=tile, cols=cols).save(written["heads"])
            break
    return written
