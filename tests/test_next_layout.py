"""LLaVA-NeXT's ``layout="paper2880"``: the papers' fixed 2 x 2 grid (``spec/models.md`` §1.1): every image
gives base + 4 tiles of patches, no unpadding, no newline; the processor counts the same tokens."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.models.adapters import adapter_class, adapter_for
from finepruner.models.adapters.llava_next import _pack_fixed_grid
from finepruner.models.tiny import build_tiny_llava
from finepruner.models.tiny_families import build_tiny_llava_next, tiny_image, visual_token_counts

PROMPTS = ["USER: <image>\nwhat color is the circle ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:",
           "USER: <image>\nwhich one is on the left ? ASSISTANT:"]
IMAGES = [tiny_image(60, 40, 1), tiny_image(64, 64, 2), tiny_image(90, 30, 3)]
GEN = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
CROP_TOKENS = 16  # 32-px crops of 8-px patches


@pytest.fixture(scope="module")
def paper():
    model, processor = build_tiny_llava_next(seed=0, qk_scale=8.0)
    adapter_for(model).set_layout(processor, "paper2880")
    return model.eval(), processor


def test_every_image_gives_five_crops_of_tokens(paper):
    model, processor = paper
    inputs = processor(images=IMAGES, text=PROMPTS, return_tensors="pt", padding=True)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [5 * CROP_TOKENS] * 3
    assert visual_token_counts(model, inputs) == counts
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_packing_is_base_then_tiles_in_global_raster_order(paper):
    model, _ = paper
    side = 4
    crops = torch.arange(5 * side * side).view(5, side * side, 1).float()  # each patch holds its crop-major index
    packed, lengths = _pack_fixed_grid(model.model, [crops], None, "default")
    expected = list(range(side * side))
    for row in range(2 * side):  # the 2 x 2 tile grid, 8 patch rows of 8
        tile_row, inner = divmod(row, side)
        for col in range(2 * side):
            tile_col, x = divmod(col, side)
            tile = 1 + 2 * tile_row + tile_col
            expected.append(tile * side * side + inner * side + x)
    assert packed[0][:, 0].long().tolist() == expected and lengths.tolist() == [80]


def test_per_crop_budgets_keep_five_times_t(paper):
    model, processor = paper
    inputs = processor(images=IMAGES, text=PROMPTS, return_tensors="pt", padding=True)
    with finepruner.apply(model, "vispruner", tokens=4, budget_scope="crop") as handle, torch.no_grad():
        model.generate(**inputs, **GEN)
    assert handle.kept[0].shape == (3, 20) and bool((handle.kept[0] >= 0).all())


def test_padded_batch_equals_each_sample_alone(paper):
    model, processor = paper
    inputs = processor(images=IMAGES, text=PROMPTS, return_tensors="pt", padding=True)
    with finepruner.apply(model, "fastv", tokens=12, K=2), torch.no_grad():
        together = model.generate(**inputs, **GEN)
        for row in range(3):
            alone = model.generate(**processor(images=[IMAGES[row]], text=[PROMPTS[row]], return_tensors="pt"),
                                   **GEN)
            for step, scores in enumerate(alone.scores):
                assert (scores[0] - together.scores[step][row]).abs().max().item() <= 1e-4


def test_other_families_offer_only_their_own_layout():
    assert adapter_class("llava_next").layouts == ("hf", "paper2880")
    model, processor = build_tiny_llava()
    with pytest.raises(ValueError, match=r"layout='paper2880' is not available on llava; allowed: hf"):
        adapter_for(model).set_layout(processor, "paper2880")
    adapter_for(model).set_layout(processor, "hf")  # the model's own: nothing changes


def test_load_model_applies_the_layout(tmp_path):
    model, processor = build_tiny_llava_next(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = finepruner.load_model(tmp_path, layout="paper2880")
    inputs = loaded_processor(images=[IMAGES[0]], text=[PROMPTS[0]], return_tensors="pt")
    assert int((inputs["input_ids"] == loaded.config.image_token_id).sum()) == 5 * CROP_TOKENS
    with pytest.raises(ValueError, match="allowed: hf, paper2880"):
        finepruner.load_model(tmp_path, layout="paper576")
