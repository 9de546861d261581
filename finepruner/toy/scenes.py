"""Deterministic synthetic scenes: a few small coloured shapes on a cluttered, noisy background.

Layout (168 x 168 pixels, CLIP patch 14, so 12 x 12 = 144 visual tokens): the image is cut into a
6 x 6 grid of 28-pixel *cells*, each covering exactly 2 x 2 patches. Every object (a circle, square or
triangle in one of six saturated colours) sits inside its own cell, so it covers 4 of the 144 patches.
Distractor clutter (grey/black/white crosses, stripes and checkerboards) occupies other cells: it is as
salient as the objects (high contrast) but never asked about, so "salient" and "relevant to the
question" differ. The background is a smooth, desaturated texture plus pixel noise.

Every scene carries its ground-truth :meth:`Scene.description` (a JSON-serialisable dict), from which
the questions are generated and checked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 168
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 12 patches per side -> 144 visual tokens
CELL = 28  # one cell = 2 x 2 patches
CELLS = IMAGE_SIZE // CELL  # 6 x 6 cells

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 20),
    "purple": (150, 40, 190),
    "orange": (245, 130, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
CLUTTER_KINDS: tuple[str, ...] = ("cross", "stripes", "checker")

MIN_OBJECTS, MAX_OBJECTS = 1, 5
MAX_CLUTTER = 4


@dataclass(frozen=True)
class SceneObject:
    """A coloured shape in cell (row, col) of the 6 x 6 cell grid."""

    shape: str
    color: str
    row: int
    col: int
    size: int = 22
    dx: int = 0
    dy: int = 0

    @property
    def side(self) -> str:
        """``"left"`` or ``"right"``: which half of the image the object lies in."""
        return "left" if self.col < CELLS // 2 else "right"

    def patches(self) -> list[int]:
        """Indices (row-major, 0..143) of the 2 x 2 patches this object's cell covers."""
        r, c = 2 * self.row, 2 * self.col
        return [(r + i) * GRID + (c + j) for i in (0, 1) for j in (0, 1)]


@dataclass(frozen=True)
class Clutter:
    """A grey-scale distractor (never asked about) in cell (row, col)."""

    kind: str
    row: int
    col: int
    shade: int = 0

    def patches(self) -> list[int]:
        r, c = 2 * self.row, 2 * self.col
        return [(r + i) * GRID + (c + j) for i in (0, 1) for j in (0, 1)]


@dataclass(frozen=True)
class Scene:
    """One synthetic image: objects, clutter and the seed of its background texture."""

    objects: tuple[SceneObject, ...]
    clutter: tuple[Clutter, ...] = ()
    background_seed: int = 0
    background: tuple[int, int, int] = (200, 200, 200)
    extra: dict = field(default_factory=dict, compare=False)

    def description(self) -> dict:
        """The ground truth as plain data (what the questions are generated and checked from)."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "row": o.row, "col": o.col, "side": o.side,
                 "patches": o.patches()}
                for o in self.objects
            ],
            "clutter": [{"kind": c.kind, "row": c.row, "col": c.col} for c in self.clutter],
            "image_size": IMAGE_SIZE,
            "grid": GRID,
        }

    def object_patches(self) -> list[int]:
        """Sorted patch indices covered by the (question-relevant) objects."""
        return sorted({p for o in self.objects for p in o.patches()})

    def render(self) -> Image.Image:
        return render(self)


def generate_scene(rng: random.Random, max_objects: int = MAX_OBJECTS, max_clutter: int = MAX_CLUTTER) -> Scene:
    """Draw one scene from ``rng`` (all randomness goes through it: same state, same scene).

    1-5 objects with distinct (colour, shape) pairs, each in its own cell; 0-4 clutter items in free
    cells. The object count is skewed towards 2-4 so that counting and uniqueness questions both occur.
    ``max_objects`` and ``max_clutter`` cap the counts (the training curriculum starts with simple scenes).
    """
    weights = (1, 3, 3, 3, 2)[: max(1, min(max_objects, MAX_OBJECTS))]
    n_obj = rng.choices(range(MIN_OBJECTS, MIN_OBJECTS + len(weights)), weights=weights)[0]
    cells = rng.sample(range(CELLS * CELLS), n_obj + MAX_CLUTTER)
    pairs = rng.sample([(c, s) for c in COLOR_NAMES for s in SHAPES], n_obj)
    objects = []
    for (color, shape), cell in zip(pairs, cells[:n_obj], strict=True):
        size = rng.randint(18, 24)
        slack = (CELL - size) // 2
        objects.append(SceneObject(
            shape=shape, color=color, row=cell // CELLS, col=cell % CELLS, size=size,
            dx=rng.randint(-slack, slack), dy=rng.randint(-slack, slack),
        ))
    n_clutter = rng.randint(0, max(0, min(max_clutter, MAX_CLUTTER)))
    clutter = tuple(
        Clutter(kind=rng.choice(CLUTTER_KINDS), row=cell // CELLS, col=cell % CELLS,
                shade=rng.choice((0, 60, 255)))
        for cell in cells[n_obj:n_obj + n_clutter]
    )
    base = rng.randint(150, 225)
    background = tuple(min(255, max(0, base + rng.randint(-15, 15))) for _ in range(3))
    return Scene(objects=tuple(objects), clutter=clutter, background_seed=rng.getrandbits(31),
                 background=background)  # type: ignore[arg-type]


def _texture(scene: Scene) -> np.ndarray:
    """Smooth, desaturated background texture plus pixel noise (uint8, H x W x 3)."""
    g = np.random.default_rng(scene.background_seed)
    low = g.normal(0.0, 18.0, size=(7, 7, 1)) + g.normal(0.0, 5.0, size=(7, 7, 3))
    low_img = Image.fromarray(np.clip(low + 128, 0, 255).astype(np.uint8), mode="RGB")
    smooth = np.asarray(low_img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) - 128
    noise = g.normal(0.0, 10.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    img = np.asarray(scene.background, dtype=np.float32)[None, None, :] + smooth + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_clutter(draw: ImageDraw.ImageDraw, c: Clutter) -> None:
    x0, y0 = c.col * CELL + 3, c.row * CELL + 3
    x1, y1 = x0 + CELL - 7, y0 + CELL - 7
    ink = (c.shade,) * 3
    other = (255 - c.shade,) * 3 if c.shade != 60 else (230, 230, 230)
    if c.kind == "cross":
        draw.line((x0, y0, x1, y1), fill=ink, width=4)
        draw.line((x0, y1, x1, y0), fill=ink, width=4)
    elif c.kind == "stripes":
        for k in range(0, CELL - 6, 6):
            draw.rectangle((x0 + k, y0, x0 + k + 2, y1), fill=ink)
    else:  # checker
        step = 5
        for i in range(0, CELL - 6, step):
            for j in range(0, CELL - 6, step):
                fill = ink if (i // step + j // step) % 2 == 0 else other
                draw.rectangle((x0 + j, y0 + i, x0 + j + step - 1, y0 + i + step - 1), fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    cx = o.col * CELL + CELL // 2 + o.dx
    cy = o.row * CELL + CELL // 2 + o.dy
    h = o.size / 2
    fill = COLORS[o.color]
    if o.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif o.shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """Render ``scene`` to a 168 x 168 RGB image (deterministic)."""
    img = Image.fromarray(_texture(scene), mode="RGB")
    draw = ImageDraw.Draw(img)
    for c in scene.clutter:
        _draw_clutter(draw, c)
    for o in scene.objects:
        _draw_object(draw, o)
    return img


def generate_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes from one seed (deterministic)."""
    rng = random.Random(seed)
    return [generate_scene(rng) for _ in range(n)]
