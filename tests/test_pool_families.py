"""Pool on LLaVA-NeXT and LLaVA-OneVision (``methods_more.md`` §6, "pool each crop"; ``spec/models.md``
§1.1-§1.2): every grid of an image (the base crop's patch grid, the unpadded tile grid, OneVision's shrunk
grid, a multi-image sample's base-only grid) pooled at the stride of one crop pooled to ``h x w``, one
newline token after each pooled row, contiguous positions.

The references build each image's grids by hand from its tokens (the rows between newline tokens), pool them
with plain loops and place the newline tokens by hand; the features are read from an eager tower run
(pre-projector) or the model's own ``get_image_features`` (post-projector).
"""

from __future__ import annotations

import math

import pytest
import torch

import finepruner
from finepruner.engine.vision import VisionSignals
from finepruner.methods.base import Stage, StageContext
from finepruner.methods.pool import pool_image
from finepruner.models.adapters.llava_next import packed_image_grids
from tests.conftest import assert_row_equals_alone, assert_same_generation
from tests.test_vision_families import (
    GENERATE,
    IMAGES,
    LAYOUT_IMAGES,
    PROMPTS,
    eager_signals,
    family,
    image_features,
    newlines_of,
)

SIDE = 4  # patches per crop side of the tiny models (32-px crops of 8-px patches)
FAMILIES = ["llava_next", "llava_onevision", "onevision_shrunk"]


# -- references ---------------------------------------------------------------------------------------------
def reference_pool(grid: torch.Tensor, th: int, tw: int, reduce: str = "avg") -> torch.Tensor:
    """Adaptive pooling of a [R, C, D] grid to th x tw as loops: bin (i, j) covers rows floor(i*R/th) ..
    ceil((i+1)*R/th) - 1 and the same for columns; raster order, float64."""
    rows, cols = grid.shape[:2]
    out = []
    for i in range(th):
        for j in range(tw):
            r0, r1 = (i * rows) // th, -((-(i + 1) * rows) // th)
            c0, c1 = (j * cols) // tw, -((-(j + 1) * cols) // tw)
            cell = grid[r0:r1, c0:c1].reshape(-1, grid.shape[-1]).double()
            out.append(cell.mean(dim=0) if reduce == "avg" else cell.max(dim=0).values)
    return torch.stack(out)


def stride_shape(rows: int, cols: int, h: int, w: int) -> tuple[int, int]:
    """A rows x cols grid at the stride of a SIDE x SIDE crop pooled to h x w (halves rounded up)."""
    return (max(1, min(rows, math.floor(rows * h / SIDE + 0.5))),
            max(1, min(cols, math.floor(cols * w / SIDE + 0.5))))


def hand_grids(newline: torch.Tensor) -> tuple[list[int], list[list[int]], int]:
    """One image's tokens split by hand: the base crop's SIDE*SIDE tokens, the tile grid's rows (the tokens
    between newline tokens), and the newline tokens that end no row (a one-crop image's trailing one)."""
    base = list(range(SIDE * SIDE))
    rows, current, trailing = [], [], 0
    for index in range(SIDE * SIDE, newline.shape[0]):
        if not newline[index]:
            current.append(index)
        elif current:
            rows.append(current)
            current = []
        else:
            trailing += 1
    assert not current  # every tile row ends with a newline on these layouts
    return base, rows, trailing


def reference_image(fam, features: torch.Tensor, newline: torch.Tensor, grid: tuple[int, int], where: str,
                    reduce: str) -> torch.Tensor:
    """One image's pooled tokens [n, D], as the language model should receive them."""
    h, w = grid
    projector = fam.model.model.multi_modal_projector
    image_newline = fam.model.model.image_newline.detach()

    def finish(pooled: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return projector(pooled.float()) if where == "pre_projector" else pooled.float()

    base, rows, trailing = hand_grids(newline)
    out = [finish(reference_pool(features[base].view(SIDE, SIDE, -1), h, w, reduce))]
    if rows:
        tiles = torch.stack([features[row] for row in rows])  # [R, C, D]
        th, tw = stride_shape(len(rows), len(rows[0]), h, w)
        pooled = finish(reference_pool(tiles, th, tw, reduce)).view(th, tw, -1)
        for i in range(th):
            out += [pooled[i], image_newline[None]]
    out += [image_newline[None]] * trailing
    return torch.cat(out)


def logits_with_images(model, inputs, images: list[torch.Tensor]) -> torch.Tensor:
    """Last-token logits of sample 0 with each image's span of ``<image>`` tokens replaced, in order, by that
    image's rows (contiguous positions): a plain run of the language model on hand-built embeddings."""
    ids = inputs["input_ids"][0]
    is_image = ids == model.config.image_token_id
    embed = model.model.get_input_embeddings()
    parts, index, image = [], 0, 0
    with torch.no_grad():
        while index < ids.shape[0]:
            if is_image[index]:
                end = index
                while end < ids.shape[0] and is_image[end]:
                    end += 1
                parts.append(images[image])
                image += 1
                index = end
            else:
                end = index
                while end < ids.shape[0] and not is_image[end]:
                    end += 1
                parts.append(embed(ids[index:end]))
                index = end
        assert image == len(images)
        hidden = model.model.language_model(inputs_embeds=torch.cat(parts)[None]).last_hidden_state
        return model.lm_head(hidden[:, -1])


def reference_logits(fam, inputs, grid: tuple[int, int], where: str, reduce: str) -> tuple[torch.Tensor, list[int]]:
    """Reference logits of sample 0 and each image's pooled token count."""
    newlines = newlines_of(fam, inputs)
    if where == "pre_projector":
        features = [signals["patch_features"] for signals in eager_signals(fam, inputs)]
    else:
        features = image_features(fam, inputs)
    images = [reference_image(fam, f, n, grid, where, reduce) for f, n in zip(features, newlines, strict=True)]
    return logits_with_images(fam.model, inputs, images), [image.shape[0] for image in images]


CASES = [
    ({"grid": (2, 2)}, (2, 2)),
    ({"grid": (3, 2)}, (3, 2)),  # bins of 1-2 rows: not a divisor of the crop side
    ({"grid": (1, 1), "where": "post_projector"}, (1, 1)),
    ({"tokens": 20, "where": "post_projector"}, (2, 2)),  # 20 / 5 crops = 4 per crop = 2 x 2
    ({"tokens": 40, "shape": "square"}, (3, 3)),  # 8 per crop -> the near-square 3 x 3 = 9
    ({"tokens": 10}, (2, 1)),  # 2 per crop, exact: 2 x 1
    ({"grid": (2, 3), "reduce": "max"}, (2, 3)),
]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("params", "grid"), CASES)
def test_pooled_tokens_equal_plain_reference(name, params, grid):
    """Six single-image layouts (2-4 tiles, unpadded rows or columns, square; OneVision shrunk with
    anyres_max_1) and a two-image sample (OneVision: base grid + one newline per image)."""
    fam = family(name)
    where, reduce = params.get("where", "pre_projector"), params.get("reduce", "avg")
    samples = [fam.build([PROMPTS[0]], [[image]]) for image in LAYOUT_IMAGES]
    samples.append(fam.build([PROMPTS[2]], [IMAGES[2]]))
    for index, inputs in enumerate(samples):
        expected, counts = reference_logits(fam, inputs, grid, where, reduce)
        with finepruner.apply(fam.model, "pool", processor=fam.processor, **params) as handle, torch.no_grad():
            logits = fam.model(**inputs).logits[:, -1]
        assert handle.stats.visual_tokens == [sum(counts)] * 4, (name, params, index)
        assert handle.merged[0].shape == (1, sum(counts))
        assert (logits - expected).abs().max().item() <= 1e-4, (name, params, index)


def test_two_by_two_grid_pools_each_crop_to_a_quarter():
    """An image whose 2 x 2 tile grid is not unpadded (64 x 64 on NeXT: 8 x 8 tiles, 8 newlines) pools each
    crop to 2 x 2: 4 base tokens + a 4 x 4 tile grid with 4 newlines."""
    fam = family("llava_next")
    inputs = fam.build([PROMPTS[0]], [[LAYOUT_IMAGES[1]]])
    assert [n.shape[0] for n in newlines_of(fam, inputs)] == [16 + 8 * 9]
    with finepruner.apply(fam.model, "pool", grid=(2, 2)) as handle, torch.no_grad():
        fam.model(**inputs)
    assert handle.stats.visual_tokens == [4 + 4 * 5] * 4


@pytest.mark.parametrize("name", FAMILIES)
def test_full_grid_is_the_identity(name):
    """Pooling each crop to its own S x S grid after the projector changes nothing: the same generation as
    plain transformers (and before the projector too where no bilinear shrink mixes features)."""
    fam = family(name)
    inputs = fam.inputs()
    reference = fam.generate(inputs)
    for where in ("post_projector", "pre_projector") if name != "onevision_shrunk" else ("post_projector",):
        with finepruner.apply(fam.model, "pool", grid=(SIDE, SIDE), where=where):
            pooled = fam.generate(inputs)
        assert_same_generation(pooled, reference, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("params", [{"grid": (2, 2)},
                                    {"tokens": 45, "shape": "square", "positions": "original"},
                                    {"grid": (3, 1), "where": "post_projector"}])
def test_padded_batch_of_different_images_equals_each_sample_alone(name, params):
    """Rows of one image (two layouts), two images and none, left-padded together."""
    fam = family(name)
    with finepruner.apply(fam.model, "pool", processor=fam.processor, **params) as handle:
        together = fam.generate(fam.inputs())
        merged = handle.merged[0].clone()
        for row in range(len(PROMPTS)):
            alone = fam.generate(fam.inputs([row]))
            assert_row_equals_alone(alone, together, row)
            if IMAGES[row]:
                width = handle.merged[0].shape[1]
                assert torch.equal(merged[row, :width], handle.merged[0][0])
                assert bool((merged[row, width:] == -1).all())
        assert bool((merged[3] == -1).all())  # the text-only row pools nothing


@pytest.mark.parametrize("name", ["llava_next", "onevision_shrunk"])
def test_cached_decode_equals_no_cache(name):
    fam = family(name)
    inputs = fam.inputs([0, 1, 2])
    with finepruner.apply(fam.model, "pool", grid=(2, 2)):
        with torch.no_grad():
            uncached = fam.model.generate(**inputs, **{**GENERATE, "max_new_tokens": 4}, use_cache=False)
            cached = fam.model.generate(**inputs, **{**GENERATE, "max_new_tokens": 4})
    assert_same_generation(cached, uncached, atol=1e-4)


def test_images_of_one_count_pooled_to_different_counts_are_padded():
    """Two layouts of 40 tokens (a 4 x 5 and a 3 x 7 tile grid, each row ending in a newline) pool to 12 and
    14 tokens: the shorter row's slots are padding (``insert_valid``)."""
    fam = family("llava_next")
    method = finepruner.methods.create("pool", grid=(2, 2), where="post_projector")
    method.bind_model(fam.model)

    def layout(rows: int, cols: int) -> torch.Tensor:
        return torch.cat([torch.zeros(16, dtype=torch.bool),
                          torch.tensor(([False] * cols + [True]) * rows)])

    newline = torch.stack([layout(4, 5), layout(3, 7)])
    embeds = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    vision = VisionSignals(patch_features=embeds, projected_features=embeds, newline_mask=newline)
    ids = torch.arange(40).expand(2, -1)
    answer = method.select(0, Stage(layer=0, keep=0, insert=None),
                           StageContext(attention=None, visual_ids=ids, row_keys=[0, 1], vision=vision))
    assert answer.keep.shape == (2, 0) and answer.insert.shape == (2, 14, 8)
    assert answer.insert_valid.sum(dim=1).tolist() == [12, 14]
    for row in range(2):
        grids = packed_image_grids(newline[row], 16)
        expected, origins = pool_image(grids, embeds[row], embeds[row], (2, 2), "avg", None)
        count = expected.shape[0]
        assert torch.equal(answer.insert[row, :count], expected)
        assert torch.equal(answer.insert_from[row, :count], origins)
    # base bins' top-left patches, then the 4 x 5 tile grid as 2 x 3 (2.5 rounds up), each pooled row's
    # newline taking the newline after its bins' last source row
    assert answer.insert_from[0, :12].tolist() == [0, 2, 8, 10, 16, 17, 19, 27, 28, 29, 31, 39]


def test_paper2880_layout_pools_five_crops():
    """``layout="paper2880"`` (no unpadding, no newline): base + a square 2 x 2 tile grid, 5 x 2 x 2 tokens."""
    from finepruner.models.adapters import adapter_for
    from finepruner.models.tiny_families import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0, qk_scale=8.0)
    adapter_for(model).set_layout(processor, "paper2880")
    inputs = processor(images=[LAYOUT_IMAGES[0], LAYOUT_IMAGES[2]], text=[PROMPTS[0], PROMPTS[1]],
                       return_tensors="pt", padding=True)
    with finepruner.apply(model, "pool", tokens=20) as handle, torch.no_grad():
        model.generate(**inputs, **GENERATE)
    assert handle.stats.visual_tokens == [20] * 4 and handle.merged[0].shape == (2, 20)


# -- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"grid": (5, 2)}, r"grid=\(5, 2\) per crop of 4x4 patches; allowed: h, w in 1..4"),
        ({"tokens": 83}, r"tokens=83 is not allowed; tokens counts 5 crops \(reference_crops\) of 4x4 patches per "
                         r"image here, so tokens must be in 1..80"),
        ({"tokens": 35}, r"tokens=35 is no h x w grid with h, w <= 4 \(7 per crop\).*shape='square'"),
        ({"tokens": 16, "reference_crops": 0}, r"reference_crops=0; allowed: an integer >= 1"),
    ],
)
def test_bad_budgets_are_refused_at_apply(params, message):
    fam = family("llava_next")
    with pytest.raises(ValueError, match=message):
        finepruner.apply(fam.model, "pool", **params)
    assert "forward" not in vars(fam.model.model.language_model)


def test_reference_crops_changes_the_per_crop_grid():
    fam = family("llava_onevision")
    with finepruner.apply(fam.model, "pool", tokens=8, reference_crops=2) as handle:
        assert handle.method.crop_grid() == (2, 2)
    with finepruner.apply(fam.model, "pool") as handle:  # default: a quarter of each crop
        assert handle.method.crop_grid() == (2, 2)


def test_a_crop_with_its_cls_row_is_no_grid():
    fam = family("llava_next")
    config = fam.model.config
    config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match=r"pool: llava_next: 17 tokens per crop are no square patch grid"):
            finepruner.apply(fam.model, "pool", grid=(2, 2))
    finally:
        config.vision_feature_select_strategy = "default"


@pytest.mark.parametrize(
    ("newline", "message"),
    [
        ([False] * 15 + [True] + [False] * 3 + [True], "does not start with its base crop's 16 patches"),
        ([False] * 16 + [False, False, True, False, True], "no grid with one newline per row"),
        ([False] * 16 + [False, False, True, False, False], "no grid with one newline per row"),
        ([False] * 16 + [False] * 5, "the 5 tile tokens \\(no newline\\) are no square grid"),
        ([False] * 10, "does not start with its base crop's 16 patches"),
    ],
)
def test_tokens_that_are_no_layout_raise(newline, message):
    with pytest.raises(ValueError, match=message):
        packed_image_grids(torch.tensor(newline), 16)


def test_layouts_of_the_families():
    grids = packed_image_grids(torch.tensor([False] * 16 + ([False] * 3 + [True]) * 2), 16)
    assert [(g.start, g.rows, g.cols, g.row_newlines) for g in grids.grids] == [(0, 4, 4, False), (16, 2, 3, True)]
    assert grids.trailing_newlines == 0 and grids.count == 24 and grids.crop_side == 4
    assert grids.grids[1].newlines().tolist() == [19, 23]
    assert grids.grids[1].cells().tolist() == [[16, 17, 18], [20, 21, 22]]
    single = packed_image_grids(torch.tensor([False] * 16 + [True]), 16)
    assert len(single.grids) == 1 and single.trailing_newlines == 1


def test_llava15_plans_as_before(tiny):
    model, _ = tiny
    with finepruner.apply(model, "pool", tokens=16) as handle:
        assert handle.plan(64)[0].insert == 16
    assert finepruner.methods.create("pool", tokens=16).plan(4, 64)[0].insert == 16
