"""``finepruner show`` on LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL (tiny models from config, CPU).

Per family: the adapter's token grids (``ModelAdapter.token_grids``) against the family's own layout of a
non-square image (NeXT/OneVision: the model's ``pack_image_features`` applied to coordinate features; Qwen: the
model's ``get_rope_index`` rows), the cells drawn as kept in ``tokens.png`` against the tokens the handle kept
(mapped to cells by hand), and the sizes of ``tokens.png`` and ``heads.png``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionProcessor
from transformers.image_processing_utils import select_best_resolution

from finepruner.methods.spec import parse_method_spec
from finepruner.models.adapters import adapter_for
from finepruner.models.tiny_families import (
    ONEVISION_CHAT_TEMPLATE,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen3_vl,
    next_inputs,
    onevision_inputs,
    qwen_chat_inputs,
    tiny_image,
)
from finepruner.report import overlays
from finepruner.report.overlays import GAP, TITLE_H, head_grid_size, overlay_size, show

QUESTION = "What is in the image?"
METHODS = ("vanilla", "fastv:ratio=0.3,K=1", "finepruner:ratio=0.3,K=1,heads=2,strategy=sum")


class _OnevisionProcessorNoVideo(LlavaOnevisionProcessor):
    """The real OneVision processor without its video processor (torchvision is optional, spec §6)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def next_model():
    return build_tiny_llava_next(seed=0, qk_scale=4.0)


@pytest.fixture(scope="module")
def ov_model():
    model, image_processor, tokenizer = build_tiny_llava_onevision(seed=0, qk_scale=4.0)
    processor = _OnevisionProcessorNoVideo(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio=model.config.vision_aspect_ratio,
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    return model, processor


# -- layouts against the families' own packing ---------------------------------------------------------------


def _coordinate_features(config, height: int, width: int) -> tuple[torch.Tensor, int]:
    """[crops, side*side, 3] features (region, grid row, grid column) of an image's crops: the base crop's patch
    at its own row and column, each tile's patch at its row and column on the full tile grid (tiles in the
    model's row-major order); and the patch side."""
    crop = int(config.vision_config.image_size)
    side = crop // int(config.vision_config.patch_size)
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    tiles_h, tiles_w = best_h // crop, best_w // crop
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    crops = [torch.stack([torch.zeros(side, side), rows, cols], -1).reshape(-1, 3)]
    for k in range(tiles_h * tiles_w):
        tr, tc = divmod(k, tiles_w)
        crops.append(torch.stack([torch.ones(side, side), tr * side + rows, tc * side + cols], -1).reshape(-1, 3))
    return torch.stack(crops).float(), side


def _check_packing(layout, packed: torch.Tensor, side: int) -> None:
    """Every token the layout puts in a cell carries that cell's coordinates in the model's packing (the tile
    grid shifted by the rows or columns unpadding cut); the tokens in no cell are the newline tokens."""
    cell_of = layout.cell_of()
    newline = packed[:, 0] < 0
    assert set(cell_of) == set(torch.nonzero(~newline)[:, 0].tolist())
    assert [r.name for r in layout.regions] == ["base", "tiles"]
    base, tiles = (r.grid for r in layout.regions)
    assert (base.start, base.rows, base.cols, base.row_newlines) == (0, side, side, False)
    assert tiles.start == side * side and tiles.row_newlines
    offsets: dict[int, set] = {0: set(), 1: set()}
    for token, (region, i, j) in cell_of.items():
        kind, row, col = packed[token].tolist()
        assert kind == region
        offsets[region].add((row - i, col - j))
        if region == 0:
            assert (row, col) == (i, j)
        else:  # by hand: token = start + i * (cols + 1) + j
            assert token == tiles.start + i * (tiles.cols + 1) + j
    assert [len(v) for v in offsets.values()] == [1, 1]  # one shift per grid: 0, and the rows/cols unpadding cut


def test_next_layout_is_the_model_packing(next_model):
    model, processor = next_model
    adapter = adapter_for(model)
    for width, height in ((60, 24), (24, 60), (40, 28), (64, 32)):
        inputs = next_inputs(model, processor, ["USER: <image>\nwhat ASSISTANT:"], [tiny_image(width, height)])
        layout = adapter.token_grids(inputs)
        features, side = _coordinate_features(model.config, height, width)
        packed, _ = model.model.pack_image_features(
            [features], torch.tensor([[height, width]]), "default", image_newline=torch.tensor([-1.0, -1.0, -1.0]))
        assert layout.count == packed[0].shape[0] == int((inputs["input_ids"] == adapter.image_token_id).sum())
        _check_packing(layout, packed[0], side)
    # (60 x 24): the pinpoint 32 x 64 (4 x 8 cells); the image covers 3.2 of its 4 rows, so the grid reaches
    # beyond the image by 0.4 rows above and below
    inputs = next_inputs(model, processor, ["USER: <image>\nwhat ASSISTANT:"], [tiny_image(60, 24)])
    box = adapter.token_grids(inputs).regions[1].box
    assert box == pytest.approx((0.0, -0.125, 1.0, 1.125))


def test_onevision_layout_is_the_model_packing(ov_model):
    model, processor = ov_model
    adapter = adapter_for(model)
    for width, height in ((60, 24), (100, 30), (30, 70)):
        inputs = dict(processor(images=[tiny_image(width, height)], text=["<|im_start|>user <image>\nq<|im_end|>\n"],
                                return_tensors="pt"))
        layout = adapter.token_grids(inputs)
        features, side = _coordinate_features(model.config, height, width)
        packed, _ = model.model.pack_image_features(
            [features], torch.tensor([[height, width]]), image_newline=torch.tensor([-1.0, -1.0, -1.0]),
            vision_aspect_ratio=model.config.vision_aspect_ratio)
        assert layout.count == packed[0].shape[0] == int((inputs["input_ids"] == adapter.image_token_id).sum())
        _check_packing(layout, packed[0], side)


def test_onevision_shrunk_grid_and_refusals(ov_model):
    model, image_processor, tokenizer = build_tiny_llava_onevision(seed=0, vision_aspect_ratio="anyres_max_1")
    adapter = adapter_for(model)
    prompt = "<|im_start|>user <image>\nq<|im_end|>\n"
    inputs = onevision_inputs(model, image_processor, tokenizer, [prompt], [tiny_image(96, 64)])
    layout = adapter.token_grids(inputs)
    tiles = layout.regions[1].grid
    assert (tiles.rows, tiles.cols) == (3, 4)  # the unpadded 8 x 12 grid shrunk (bilinear) by anyres_max_1
    assert layout.count == 16 + 3 * 5 == int((inputs["input_ids"] == adapter.image_token_id).sum())
    two = onevision_inputs(model, image_processor, tokenizer, ["<|im_start|>user <image><image>\nq<|im_end|>\n"],
                           [[tiny_image(40, 30), tiny_image(30, 40)]])
    with pytest.raises(ValueError, match="holds 2 images"):
        adapter.token_grids(two)
    with pytest.raises(ValueError, match="video"):
        adapter.token_grids({**inputs, "pixel_values_videos": torch.zeros(1)})


@pytest.mark.parametrize("builder", [build_tiny_qwen2_5_vl, build_tiny_qwen3_vl], ids=["qwen2_5_vl", "qwen3_vl"])
def test_qwen_layout_is_the_rope_grid(builder):
    model, processor = builder(seed=0)
    adapter = adapter_for(model)
    inputs = qwen_chat_inputs(processor, ["what"], [[tiny_image(150, 60)]])
    layout = adapter.token_grids(inputs)
    (region,) = layout.regions
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (t, region.grid.rows, region.grid.cols) == (1, h // 2, w // 2) and h != w
    assert region.box == (0.0, 0.0, 1.0, 1.0)
    rows, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"],
                                         attention_mask=inputs["attention_mask"])
    visual = inputs["input_ids"][0] == adapter.image_token_id
    height_pos, width_pos = rows[1, 0, visual], rows[2, 0, visual]
    assert layout.count == int(visual.sum())
    for token, (_, i, j) in layout.cell_of().items():  # by hand: raster order, token = i * cols + j
        assert token == i * region.grid.cols + j
        assert (int(height_pos[token] - height_pos.min()), int(width_pos[token] - width_pos.min())) == (i, j)
    two = qwen_chat_inputs(processor, ["what"], [[tiny_image(60, 60), tiny_image(90, 40)]])
    with pytest.raises(ValueError, match="holds 2 images"):
        adapter.token_grids(two)
    with pytest.raises(ValueError, match="video"):
        adapter.token_grids({**inputs, "video_grid_thw": inputs["image_grid_thw"]})
    video_only = {k: v for k, v in inputs.items() if k not in ("image_grid_thw", "pixel_values")}
    with pytest.raises(ValueError, match="video"):
        adapter.token_grids({**video_only, "video_grid_thw": inputs["image_grid_thw"]})


# -- drawing ----------------------------------------------------------------------------------------------


def _centres(rows: int, cols: int, area: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """By hand: the grid fitted into ``area x area`` with square cells, centred: each cell's centre pixel."""
    scale = min(area / cols, area / rows)
    w, h = round(cols * scale), round(rows * scale)
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    return (ys[:-1] + ys[1:]) // 2 + (area - h) // 2, (xs[:-1] + xs[1:]) // 2 + (area - w) // 2, w, h


def _drawn_kept(pixels: np.ndarray, column: int, panel: int, cell: int, regions, y_stage: int = 0) -> list:
    """Per grid, [rows, cols] bool read from ``tokens.png``: a cell is kept when its centre pixel in ``column``
    equals the unpruned first column's (vanilla), pruned when it is that pixel darkened to a quarter."""
    out = []
    for r, grid in enumerate(regions):
        main = r == len(regions) - 1
        area, x_off = (panel, 0) if main else (panel // 2, panel + GAP)
        ys, xs, _, _ = _centres(grid.rows, grid.cols, area)
        kept = np.zeros((grid.rows, grid.cols), dtype=bool)
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                yy = TITLE_H + y_stage + y
                ref = pixels[yy, GAP + x_off + x].astype(int)
                got = pixels[yy, GAP + column * (cell + GAP) + x_off + x].astype(int)
                if np.array_equal(got, ref):
                    kept[i, j] = True
                else:
                    assert np.abs(got - ref * 0.25).max() <= 1.5, (r, i, j, got, ref)
        out.append(kept)
    return out


def _hand_cells(layout, kept: np.ndarray) -> list[np.ndarray]:
    """By hand: the anyres base crop ``i * side + j``, its tile grid ``start + i * (cols + 1) + j`` (a newline
    ends each row), Qwen's merged grid ``i * cols + j``."""
    ids = set(int(k) for k in kept)
    out = []
    for region in layout.regions:
        g = region.grid
        width = g.cols + int(g.row_newlines)
        out.append(np.array([[g.start + i * width + j in ids for j in range(g.cols)] for i in range(g.rows)]))
    return out


def _check_show(model, processor, image: Image.Image, tmp_path, regions: int) -> None:
    methods = [parse_method_spec(s) for s in METHODS]
    panel, tile = 96, 40
    written = show(model, processor, image, QUESTION, methods, tmp_path, panel=panel, tile=tile, cols=2,
                   aspect="original", max_new_tokens=1)
    views = overlays.run_methods(model, processor, image, QUESTION, methods, aspect="original", max_new_tokens=1)
    layout = views[0].layout
    assert len(layout.regions) == regions
    cell = panel + (GAP + panel // 2 if regions == 2 else 0)
    with Image.open(written["tokens"]) as im:
        assert im.size == overlay_size(3, 1, panel, regions)
        assert im.size == (3 * cell + 4 * GAP, TITLE_H + panel + 16 + GAP + GAP)
        pixels = np.asarray(im.convert("RGB"))
    grids = [r.grid for r in layout.regions]
    for column, view in ((1, views[1]), (2, views[2])):
        assert len(view.kept) == 1 and 0 < len(view.kept[0]) < layout.count
        drawn = _drawn_kept(pixels, column, panel, cell, grids)
        expected = _hand_cells(layout, view.kept[0])
        for got, want in zip(drawn, expected, strict=True):
            assert np.array_equal(got, want)
        assert not all(w.all() for w in expected)  # something was pruned and drawn dark
    with Image.open(written["heads"]) as im:
        assert im.size == head_grid_size(4, tile, 2, regions)
        tile_cell = tile + (GAP + tile // 2 if regions == 2 else 0)
        assert im.size == (2 * tile_cell + 3 * GAP, TITLE_H + 2 * (tile + 16 + GAP) + GAP)
    assert views[2].attention[0].shape == (4, layout.count)


def test_show_next(next_model, tmp_path):
    model, processor = next_model
    _check_show(model, processor, tiny_image(60, 36, seed=1), tmp_path, regions=2)


def test_show_onevision(ov_model, tmp_path):
    model, processor = ov_model
    _check_show(model, processor, tiny_image(100, 30, seed=2), tmp_path, regions=2)


@pytest.mark.parametrize("builder", [build_tiny_qwen2_5_vl, build_tiny_qwen3_vl], ids=["qwen2_5_vl", "qwen3_vl"])
def test_show_qwen(builder, tmp_path):
    model, processor = builder(seed=0, qk_scale=4.0)
    _check_show(model, processor, tiny_image(200, 90, seed=3), tmp_path, regions=1)


def test_later_stage_attention_is_mapped_to_the_image(next_model):
    """PDrop's later stages score the tokens left by the previous stage: their maps have those tokens' values
    at their own cells and nothing (NaN) at the tokens pruned before."""
    model, processor = next_model
    method = parse_method_spec("pdrop:lam=0.5,layers=[1,2,3]")
    (view,) = overlays.run_methods(model, processor, tiny_image(60, 36), QUESTION, [method], aspect="original",
                                   max_new_tokens=1)
    assert len(view.kept) == 3
    for stage in (1, 2):
        attention = view.attention[stage]
        if attention is None:
            continue
        present = np.isfinite(attention[0])
        assert set(np.flatnonzero(present)) == set(view.kept[stage - 1].tolist())
        overlays.head_grid(view, stage=stage, tile=32)


def test_show_refuses_two_images_per_prompt(next_model):
    model, processor = next_model
    inputs = next_inputs(model, processor, ["USER: <image>\n<image>\nwhat ASSISTANT:"],
                         [[tiny_image(40, 30), tiny_image(30, 40)]])
    with pytest.raises(ValueError, match="holds 2 images"):
        adapter_for(model).token_grids(inputs)


def test_default_methods_on_variable_count_families():
    """Without --method on LLaVA-NeXT/OneVision/Qwen: a ninth of each image's tokens (ratio), which the
    pre-load check accepts against the family's shape (a fixed count would not fit small images)."""
    from finepruner.methods.base import ModelShape
    from finepruner.report.show import default_methods
    from finepruner.sweep.config import check_method_params

    specs = default_methods(16384, 28, variable=True)
    assert specs == ["fastv:ratio=0.889", "finepruner:ratio=0.889,heads=14,strategy=sum"]
    shape = ModelShape(28, 28, 16384, variable=True, min_visual=4)
    for name, params in map(parse_method_spec, specs):
        check_method_params(name, params, shape)
    assert default_methods(576, 32) == ["fastv:tokens=64", "finepruner:tokens=64,heads=16,strategy=sum"]


def test_next_paper2880_layout_covers_the_padded_pinpoint():
    """``layout="paper2880"``: 2 x 2 tiles, no unpadding and no newline: the tile grid covers the whole padded
    pinpoint, so its box reaches beyond a non-square image; its cells are the model's fixed packing."""
    model, processor = build_tiny_llava_next(seed=0)
    adapter = adapter_for(model)
    adapter.set_layout(processor, "paper2880")
    inputs = dict(processor(images=[tiny_image(60, 30)], text=["USER: <image>\nwhat ASSISTANT:"], return_tensors="pt"))
    assert int((inputs["input_ids"] == adapter.image_token_id).sum()) == 16 + 64
    layout = adapter.token_grids(inputs)
    tiles = layout.regions[1]
    assert (tiles.grid.start, tiles.grid.rows, tiles.grid.cols, tiles.grid.row_newlines) == (16, 8, 8, False)
    assert tiles.box == pytest.approx((0.0, -0.5, 1.0, 1.5))  # the 60 x 30 image fills half the square's height
    features, _ = _coordinate_features(model.config, 30, 60)
    packed, _ = model.model.pack_image_features([features], torch.tensor([[30, 60]]), "default")
    for token, (region, i, j) in layout.cell_of().items():
        assert packed[0][token].tolist() == [float(region), float(i), float(j)]


def test_llava_default_layout_is_one_square_grid():
    """The base adapter's default (LLaVA-1.5): one square grid of crop_tokens over the whole image; two images
    in a prompt are refused."""
    from finepruner.models.tiny import build_tiny_llava

    model, _ = build_tiny_llava(seed=0)
    adapter = adapter_for(model)
    n = adapter.crop_tokens(model.config)
    side = int(round(n ** 0.5))
    token = adapter.image_token_id
    one = torch.tensor([[1] + [token] * n + [2]])
    layout = adapter.token_grids({"input_ids": one})
    (region,) = layout.regions
    assert layout.count == n and (region.grid.rows, region.grid.cols) == (side, side)
    assert region.box == (0.0, 0.0, 1.0, 1.0)
    assert layout.cell_of()[side + 1] == (0, 1, 1)
    with pytest.raises(ValueError, match="holds 2 images"):
        adapter.token_grids({"input_ids": torch.tensor([[1] + [token] * (2 * n)])})
