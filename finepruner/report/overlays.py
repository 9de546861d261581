"""``finepruner show``: kept-token overlays and per-head attention grids for one image and question.

Both pictures are composed with Pillow at exact pixel sizes (``overlay_size``, ``head_grid_size``):

* ``tokens.png``: one column per method, one row per pruning stage; each panel is the model's view of the
  image (LLaVA-1.5's pad-to-square) with the visual tokens the stage kept shown in full colour and the
  pruned ones darkened, on the model's token grid (24 x 24 for LLaVA-1.5).
* ``heads.png``: the last-query attention of every head at the scoring layer of one method's first
  attention stage, each head's map on the token grid; the heads the method selected have a red frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 8
TITLE_H = 24
LABEL_H = 16
DIM = 0.25  # brightness of pruned tokens
SELECTED = (230, 30, 30)


@dataclass
class MethodView:
    """What one method did on the image: per stage, the kept token ids (original tokens only), the heads
    chosen and the attention [heads, n_visual] it scored with (None where the stage had none)."""

    label: str
    num_visual: int
    kept: list[np.ndarray]
    heads: list[np.ndarray | None]
    attention: list[np.ndarray | None]
    answer: str = ""


def view_image(image: Image.Image, processor: Any, aspect: str = "pad") -> Image.Image:
    """The image as the model sees it (before resizing): padded to a square with the mean colour."""
    from finepruner.eval.prompting import expand2square, image_background

    image = image.convert("RGB")
    return expand2square(image, image_background(processor)) if aspect == "pad" else image


def run_methods(model: Any, processor: Any, image: Image.Image, question: str,
                methods: Sequence[tuple[str, Mapping[str, Any]]], aspect: str = "pad",
                max_new_tokens: int = 8) -> list[MethodView]:
    """Apply each method in turn, generate a short answer, and collect what it kept."""
    import finepruner
    from finepruner.eval.runner import Generator

    generator = Generator(model, processor, aspect)
    prepared = view_image(image, processor, aspect) if aspect == "pad" else image.convert("RGB")
    views = []
    for name, params in methods:
        with finepruner.apply(model, name, processor=processor, **dict(params)) as handle:
            answer = generator.generate([question], [prepared], max_new_tokens)[0]
        num_visual = handle.adapter.num_visual_tokens
        kept = [k[0].detach().cpu().numpy() for k in handle.kept]
        kept = [k[k < num_visual] for k in kept]
        heads = [None if h is None else np.asarray(h[0].detach().cpu()) for h in (handle.heads or [])]
        attention = [None if a is None else a[0].detach().float().cpu().numpy() for a in (handle.attention or [])]
        heads += [None] * (len(kept) - len(heads))
        attention += [None] * (len(kept) - len(attention))
        extra = ",".join(f"{k}={v}" for k, v in params.items())
        views.append(MethodView(f"{name} {extra}".strip(), num_visual, kept, heads, attention, answer))
    return views


def _side(num_visual: int) -> int:
    side = math.isqrt(num_visual)
    if side * side != num_visual:
        raise ValueError(f"{num_visual} visual tokens do not form a square grid (anyres is not supported)")
    return side


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def overlay_size(n_methods: int, n_stages: int, panel: int) -> tuple[int, int]:
    """(width, height) of ``tokens.png``."""
    rows = max(1, n_stages)
    return n_methods * panel + (n_methods + 1) * GAP, TITLE_H + rows * (panel + LABEL_H + GAP) + GAP


def head_grid_size(n_heads: int, tile: int, cols: int) -> tuple[int, int]:
    """(width, height) of ``heads.png``."""
    cols = max(1, min(cols, n_heads))
    rows = math.ceil(n_heads / cols)
    return cols * tile + (cols + 1) * GAP, TITLE_H + rows * (tile + LABEL_H + GAP) + GAP


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    font = _font()
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def token_overlay(image: Image.Image, views: Sequence[MethodView], panel: int = 336) -> Image.Image:
    """The ``tokens.png`` picture (see the module docstring)."""
    n_stages = max([len(v.kept) for v in views] + [1])
    width, height = overlay_size(len(views), n_stages, panel)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    base = np.asarray(image.convert("RGB").resize((panel, panel), Image.BICUBIC), dtype=np.float32)
    for col, view in enumerate(views):
        x0 = GAP + col * (panel + GAP)
        title = view.label + (f" -> {view.answer!r}" if view.answer else "")
        draw.text((x0, 6), _fit(draw, title, panel), fill="black", font=_font())
        side = _side(view.num_visual)
        edges = np.linspace(0, panel, side + 1).round().astype(int)
        stages = view.kept or [np.arange(view.num_visual)]
        for row, kept in enumerate(stages):
            mask = np.zeros(view.num_visual, dtype=bool)
            mask[kept] = True
            shade = np.full((panel, panel), DIM, dtype=np.float32)
            for t in np.flatnonzero(mask):
                r, c = divmod(int(t), side)
                shade[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 1.0
            pic = Image.fromarray((base * shade[..., None]).clip(0, 255).astype(np.uint8))
            y0 = TITLE_H + row * (panel + LABEL_H + GAP)
            canvas.paste(pic, (x0, y0))
            label = f"stage {row + 1}: {int(mask.sum())}/{view.num_visual} kept" if view.kept else "no pruning"
            draw.text((x0, y0 + panel + 2), _fit(draw, label, panel), fill="black", font=_font())
    return canvas


def _colormap(values: np.ndarray) -> np.ndarray:
    import matplotlib

    lo, hi = float(values.min()), float(values.max())
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return (matplotlib.colormaps["viridis"](norm)[..., :3] * 255).astype(np.uint8)


def head_grid(view: MethodView, stage: int | None = None, tile: int = 96, cols: int = 8) -> Image.Image:
    """The ``heads.png`` picture for ``view`` (its first stage with attention unless ``stage`` is given)."""
    if stage is None:
        stage = next((i for i, a in enumerate(view.attention) if a is not None), None)
    if stage is None or view.attention[stage] is None:
        raise ValueError(f"{view.label}: no attention signal to show (the method does not score with attention)")
    attn = view.attention[stage]  # [heads, n_visual]
    n_heads = attn.shape[0]
    selected = set() if view.heads[stage] is None else {int(h) for h in view.heads[stage]}
    width, height = head_grid_size(n_heads, tile, cols)
    cols = max(1, min(cols, n_heads))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title = f"{view.label}: stage {stage + 1}, last-query attention per head; red = selected ({len(selected)})"
    draw.text((GAP, 6), _fit(draw, title, width - 2 * GAP), fill="black", font=_font())
    side = _side(attn.shape[1])
    for h in range(n_heads):
        r, c = divmod(h, cols)
        x0 = GAP + c * (tile + GAP)
        y0 = TITLE_H + r * (tile + LABEL_H + GAP)
        rgb = _colormap(attn[h].reshape(side, side))
        canvas.paste(Image.fromarray(rgb).resize((tile, tile), Image.NEAREST), (x0, y0))
        if h in selected:
            draw.rectangle((x0, y0, x0 + tile - 1, y0 + tile - 1), outline=SELECTED, width=3)
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
