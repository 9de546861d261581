"""``finepruner show``: PNGs of the expected size on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finepruner.cli import main
from finepruner.methods.spec import parse_method_spec
from finepruner.models.tiny import build_tiny_llava
from finepruner.report import overlays
from finepruner.report.overlays import head_grid_size, overlay_size, show


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0, qk_scale=8.0)


def test_sizes_by_hand():
    assert overlay_size(3, 1, 64) == (3 * 64 + 4 * 8, 24 + (64 + 16 + 8) + 8)
    assert overlay_size(2, 3, 336) == (2 * 336 + 3 * 8, 24 + 3 * (336 + 16 + 8) + 8)
    assert head_grid_size(32, 96, 8) == (8 * 96 + 9 * 8, 24 + 4 * (96 + 16 + 8) + 8)
    assert head_grid_size(4, 48, 8) == (4 * 48 + 5 * 8, 24 + (48 + 16 + 8) + 8)


def test_show_writes_pngs_of_the_expected_size(tmp_path, tiny):
    model, processor = tiny
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 28, 3), dtype=np.uint8))
    methods = [parse_method_spec(s) for s in (
        "vanilla", "fastv:tokens=16,K=1", "finepruner:tokens=16,K=1,heads=2,strategy=sparsity",
        "pdrop:tokens=32,layers=[1,2,3]")]
    written = show(model, processor, image, "What is in the image?", methods, tmp_path, panel=64, tile=48,
                   max_new_tokens=1)
    with Image.open(written["tokens"]) as im:
        assert im.size == overlay_size(4, 3, 64)  # PDrop has three stages
        pixels = np.asarray(im.convert("RGB"))
    with Image.open(written["heads"]) as im:
        assert im.size == head_grid_size(4, 48, 8)  # the tiny model has 4 heads
        heads_px = np.asarray(im.convert("RGB"))
    # FastV's first-stage panel: 16 of 64 tokens kept, the rest darkened
    views = overlays.run_methods(model, processor, image, "What is in the image?", methods[1:3], max_new_tokens=1)
    assert [len(v.kept[0]) for v in views] == [16, 16]
    assert views[1].heads[0] is not None and len(views[1].heads[0]) == 2
    assert views[1].attention[0].shape == (4, 64)
    # the selected heads are framed in red in heads.png (the tile of a selected head has red border pixels);
    # heads.png is drawn for the first method that selects heads (finepruner)
    red = (heads_px[..., 0] > 200) & (heads_px[..., 1] < 60) & (heads_px[..., 2] < 60)
    assert red.sum() > 0
    assert pixels.shape[2] == 3


def test_show_heads_of_a_chosen_method_and_cli(tmp_path, tiny, monkeypatch):
    model, processor = tiny
    image_path = tmp_path / "img.png"
    Image.new("RGB", (30, 30), (120, 10, 200)).save(image_path)
    monkeypatch.setattr("finepruner.models.loading.load_model", lambda *a, **k: (model, processor))
    from finepruner.models.adapter import LlavaAdapter
    from finepruner.sweep.config import ModelShape

    adapter = LlavaAdapter(model)  # "tiny" has no config.json to check the methods against: give its shape
    shape = ModelShape(adapter.num_layers, adapter.num_heads, adapter.num_visual_tokens)
    monkeypatch.setattr("finepruner.sweep.config.model_shape", lambda path: shape)
    out = tmp_path / "out"
    assert main(["show", "--model", "tiny", "--image", str(image_path), "--question", "Color?", "--out", str(out),
                 "--method", "vanilla", "--method", "finepruner:tokens=8,K=1,heads=1,strategy=max_attention",
                 "--panel", "40", "--tile", "30", "--cols", "2", "--heads-method", "1"]) == 0
    with Image.open(out / "tokens.png") as im:
        assert im.size == overlay_size(2, 1, 40)
    with Image.open(out / "heads.png") as im:
        assert im.size == head_grid_size(4, 30, 2)
    assert main(["show", "--model", "tiny", "--image", str(tmp_path / "missing.png"), "--question", "q",
                 "--out", str(out)]) == 2


def test_default_methods_follow_the_model(tmp_path):
    """Without --method, show picks budgets and head counts the model has (64 tokens and 16 heads on
    LLaVA-1.5-7B would not fit the toy model's 144 tokens and 8 heads)."""
    from finepruner.report.show import default_methods

    assert default_methods(576, 32) == ["fastv:tokens=64", "finepruner:tokens=64,heads=16,strategy=sum"]
    assert default_methods(144, 8) == ["fastv:tokens=16", "finepruner:tokens=16,heads=4,strategy=sum"]
    image_path = tmp_path / "img.png"
    Image.new("RGB", (30, 30), (120, 10, 200)).save(image_path)
    out = tmp_path / "out"
    assert main(["show", "--model", "toy", "--image", str(image_path), "--question", "What color is the circle?",
                 "--out", str(out), "--panel", "40", "--tile", "30"]) == 0
    with Image.open(out / "tokens.png") as im:
        assert im.size == overlay_size(2, 1, 40)
