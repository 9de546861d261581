"""bench shapes and FLOPs of the Qwen-VL families (windowed vision tower, mergers, deepstack mergers)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import finepruner
from finepruner.bench.flops import MergerVisionShape, merger_vision_flops
from finepruner.bench.shapes import QWEN_SHAPES, build_shape, synthetic_crops, synthetic_inputs, synthetic_visual_tokens
from finepruner.models.adapters import adapter_class, adapter_for
from finepruner.models.tiny_families import (
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
    qwen_inputs,
    tiny_image,
)


@pytest.mark.parametrize(("name", "params"), [("qwen2.5-vl-7b", 8_292_166_656), ("qwen3-vl-8b", 8_767_123_696)])
def test_named_shapes_have_the_released_checkpoints_sizes(name, params):
    """Parameter counts of the configs (on the meta device): Qwen2.5-VL-7B-Instruct 8.29 B, Qwen3-VL-8B 8.77 B."""
    shape = QWEN_SHAPES[name]
    with torch.device("meta"):
        model = getattr(transformers, adapter_class(shape.model_type).model_class)(shape.config())
    assert sum(p.numel() for p in model.parameters()) == params


def test_window_attention_pairs_by_hand():
    shape = MergerVisionShape(hidden=8, intermediate=16, layers=3, patch=14, temporal_patch=2, channels=3, merge=2,
                              out_hidden=4, gated=True, window=2, full_layers=(2,))
    report = merger_vision_flops(shape, [(1, 8, 12)])  # 96 patches: merged 4 x 6 -> 2 x 3 windows of 16 patches
    windowed, full = 6 * 16 ** 2, 96 ** 2
    assert report["attention"] == 2 * 2 * 8 * (2 * windowed + full)
    assert report["merger"] == 2 * 24 * (32 * 32 + 32 * 4)
    assert report["total"] == report["embedding"] + 3 * report["per_layer"] + report["attention"]


@pytest.mark.parametrize("build", [build_tiny_qwen2_5_vl, build_tiny_qwen2_vl, build_tiny_qwen3_vl])
def test_tower_flops_equal_torchs_flop_counter(build):
    """Our tower + merger count equals torch's FLOP counter over the real tower run (eager attention per
    window or image), and PruneStats reports it for a prefill."""
    model, processor = build(seed=0, attn="eager")
    size = 32 if build is build_tiny_qwen3_vl else 28
    images = [tiny_image(size * 6, size * 4, 1), tiny_image(size * 3, size * 3, 2)]
    prompt = "<|vision_start|><|image_pad|><|vision_end|> what ?"
    inputs = qwen_inputs(processor, [prompt, prompt], [[images[0]], [images[1]]])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    adapter = adapter_for(model)
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    ours = adapter.vision_flops(model.config, [], 2, None, grids)
    assert ours["total"] + ours["merger"] == counter.get_total_flops()
    with finepruner.apply(model, "fastv", tokens=4, K=2) as handle, torch.no_grad():
        model(**inputs)
    flops = handle.stats.flops
    assert handle.stats.vision_grids == grids and flops["vision_crops"] == 2
    assert flops["vision_tower"] == ours["total"] and flops["projector"] == ours["merger"]


def test_synthetic_bench_inputs_match_the_processor_layout():
    model = build_shape("qwen-medium", torch.float32, "meta")
    inputs = synthetic_inputs(model, 2, 10, 20, "cpu", torch.float32)
    assert synthetic_visual_tokens(model, inputs) == 1296 and synthetic_crops(inputs) == 2  # 36 x 36, one per sample
    assert inputs["pixel_values"].shape == (2 * 72 * 72, 3 * 2 * 14 * 14)
    assert bool((inputs["mm_token_type_ids"] == (inputs["input_ids"] == model.config.image_token_id)).all())
