"""LLaVA-NeXT in ``finepruner bench`` and the per-family FLOPs (spec/models.md §1.1-1.2): the named NeXT
shapes' configuration and 2,928-token layout, synthetic inputs equal to the model's own packing, a
reduced ``next-medium`` end to end, FLOPs per crop for CLIP and SigLIP, and ``--methods a,b``."""

from __future__ import annotations

import json

import pytest
import torch

from finepruner.bench import cli as bench_cli
from finepruner.bench import flops as F
from finepruner.bench import runner, shapes
from finepruner.cli import main
from finepruner.engine.state import PruneStats
from finepruner.models.tiny_families import (
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    next_image_token_count,
)

#: ``next-medium`` at a fraction of its size: the same crops, pinpoints and 2,928 tokens, a 3-layer decoder.
REDUCED = shapes.Shape(text_hidden=64, text_layers=3, text_heads=4, text_intermediate=128, vision_hidden=32,
                       vision_layers=2, vision_heads=2, vision_intermediate=64, clip_text=(32, 1, 2, 32),
                       model_type="llava_next", pinpoints=((672, 672),), image=(672, 672))


@pytest.mark.parametrize("name", ["next-medium", "llava-next-7b"])
def test_next_shapes_give_2928_tokens_from_five_crops(name):
    config = shapes.shape_config(shapes.SHAPES[name])
    assert type(config).__name__ == "LlavaNextConfig"
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert shapes.synthetic_image_size(config) == (672, 672)
    assert next_image_token_count(config, 672, 672) == 576 + 48 * 48 + 48 == 2928
    assert shapes.anyres_crops(config, 672, 672) == 5
    assert runner.default_budgets(2928) == (320, 640, 960)


def test_next_medium_keeps_the_medium_decoder():
    medium, nxt = shapes.SHAPES["medium"], shapes.SHAPES["next-medium"]
    for field in ("text_hidden", "text_layers", "text_heads", "text_intermediate", "vision_hidden", "vision_layers"):
        assert getattr(medium, field) == getattr(nxt, field)
    assert shapes.shape_config(nxt).image_grid_pinpoints == [[672, 672]]
    assert shapes.shape_config(shapes.SHAPES["llava-next-7b"]).image_grid_pinpoints == [
        list(p) for p in shapes.NEXT_PINPOINTS]


@pytest.fixture
def reduced_shape(monkeypatch):
    monkeypatch.setitem(shapes.SHAPES, "next-reduced", REDUCED)
    return "next-reduced"


def test_synthetic_inputs_match_the_models_packing(reduced_shape):
    torch.set_num_threads(2)
    model = shapes.build_shape(reduced_shape, torch.float32, "cpu")
    inputs = shapes.synthetic_inputs(model, 2, 5, 4, "cpu", torch.float32)
    assert inputs["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert inputs["image_sizes"].tolist() == [[672, 672]] * 2
    assert inputs["input_ids"].shape == (2, 5 + 2928 + 4)
    assert shapes.synthetic_visual_tokens(model, inputs) == 2928 and shapes.synthetic_crops(inputs) == 10
    stats = runner.unpruned_stats(model, inputs)
    assert stats.crops == 10 and stats.visual_tokens[0] == 2928
    report = stats.flops
    vision = F.VisionShape.from_config(model.config)
    assert report["vision_crops"] == 10
    assert report["vision_tower"] == F.vision_flops(vision, 10)["total"]
    assert report["projector"] == F.projector_flops(vision, 10)


def test_reduced_next_bench_end_to_end(reduced_shape, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", reduced_shape, "--methods", "vanilla,fastv", "--tokens", "320", "--rounds", "1",
            "--warmup", "0", "--decode-steps", "1", "--threads", "2", "--quiet", "--system-tokens", "5",
            "--text-tokens", "4", "--json", str(out)]
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert document["meta"]["visual_tokens_per_sample"] == 2928 and document["meta"]["budgets"] == [320]
    by_label = {v["label"]: v for v in document["variants"]}
    assert set(by_label) == {"plain", "vanilla", "fastv@320"}
    assert all(v["status"] == "ok" for v in by_label.values())
    fastv = by_label["fastv@320"]
    assert fastv["visual_tokens"][0] == 2928 and fastv["visual_tokens"][-1] == 320  # per image, K=2
    assert fastv["flops"]["vision_crops"] == 5
    assert fastv["flops"]["language_model"] < by_label["vanilla"]["flops"]["language_model"]


def test_method_lists_split_on_commas():
    split = bench_cli.split_method_list
    assert split(["vanilla,fastv"]) == ["vanilla", "fastv"]
    assert split(["fastv:K=3,score_impl=eager,pdrop", "sparsevlm"]) == ["fastv:K=3,score_impl=eager", "pdrop",
                                                                        "sparsevlm"]
    assert split(["pdrop:layers=[8,16,24],ratio=0.5"]) == ["pdrop:layers=[8,16,24],ratio=0.5"]


def test_siglip_has_no_cls_and_crops_scale_the_vision_side():
    onevision, _, _ = build_tiny_llava_onevision(seed=0)
    next_model, _ = build_tiny_llava_next(seed=0)
    siglip = F.VisionShape.from_config(onevision.config)
    clip = F.VisionShape.from_config(next_model.config)
    assert not siglip.cls_token and siglip.tokens == siglip.patches == 16 and siglip.projected == 16
    assert clip.cls_token and clip.tokens == 17 and clip.projected == 16
    t, d, m = 16, 32, 64
    per_layer = 2 * (4 * t * d * d + 2 * t * t * d + 2 * t * d * m)
    embed = 2 * 16 * 3 * 8 * 8 * d
    assert F.vision_flops(siglip, 3)["total"] == 3 * (embed + 2 * per_layer)
    assert F.projector_flops(siglip, 3) == 3 * 2 * 16 * (32 * 64 + 64 * 64)
    layers = onevision.config.text_config.num_hidden_layers
    report = F.prefill_report(onevision.config, [100] * layers, [70] * layers, batch=1, crops=5)
    assert report["vision_crops"] == 5
    assert report["vision_tower"] == F.vision_flops(siglip, 5)["total"]
    assert report["total"] == report["language_model"] + report["vision_tower"] + report["projector"]
    inferred = F.prefill_report(onevision.config, [100] * layers, [32] * layers, batch=1)
    assert inferred["vision_crops"] == 2  # without crops: one per 16 tokens (LLaVA-1.5's rule)


def test_prune_stats_pass_their_crops():
    model, _ = build_tiny_llava_next(seed=0)
    layers = model.config.text_config.num_hidden_layers
    stats = PruneStats(sequence_length=[90] * layers, visual_tokens=[70] * layers, batch=2, config=model.config,
                       crops=6)
    assert stats.flops["vision_crops"] == 6
    assert PruneStats(sequence_length=[90] * layers, visual_tokens=[70] * layers, batch=2,
                      config=model.config).flops["vision_crops"] == 2 * 4  # inferred: round(70 / 16) per sample
