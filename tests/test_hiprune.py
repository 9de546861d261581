"""HiPrune: kept sets against a plain reference of the spec (``methods_more.md`` §4.1) on the eager vision
attention, batches, keep-all, the captured signal, errors."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.engine.vision import VisionCapture
from finepruner.methods.hiprune import anchor_count, default_object_layer, hiprune_select
from finepruner.models.adapter import LlavaAdapter
from tests.conftest import NUM_VISUAL, PROMPTS, assert_row_equals_alone, assert_same_generation, generate, single

GRID = 8  # the tiny model's 8 x 8 patch grid


def received(model, inputs, layer: int) -> list[float]:
    """Attention received per patch at encoder layer ``layer`` from ``output_attentions`` (eager tower), as
    loops: mean over heads and over all queries, patch columns."""
    with torch.no_grad():
        attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[layer][0]
    heads, length = attn.shape[0], attn.shape[1]
    return [sum(attn[h, q, 1 + i].item() for h in range(heads) for q in range(length)) / (heads * length)
            for i in range(NUM_VISUAL)]


def reference_keep(g_obj: list[float], g_deep: list[float], tokens: int, alpha: float, wrap: str) -> list[int]:
    """The spec's rule written plainly for one image."""
    count = round(tokens * alpha / 5)
    anchors = sorted(range(NUM_VISUAL), key=lambda i: (-g_obj[i], i))[:count]
    s1 = set(anchors)
    for a in anchors:
        for step in (-1, 1, -GRID, GRID):
            n = a + step
            if wrap == "grid":
                if not 0 <= n < NUM_VISUAL or (step == -1 and a % GRID == 0) or (step == 1 and a % GRID == GRID - 1):
                    continue
            s1.add(min(max(n, 0), NUM_VISUAL - 1))
    rest = sorted((i for i in range(NUM_VISUAL) if i not in s1), key=lambda i: (-g_deep[i], i))
    return sorted(s1 | set(rest[: tokens - len(s1)]))


class Recorder:
    """Wraps a HiPrune instance and records what its selection kept."""

    def __init__(self, method) -> None:
        self.method, self.kept = method, None
        original = method.select

        def select(stage_index, stage, ctx):
            self.kept = original(stage_index, stage, ctx)
            return self.kept

        method.select = select


@pytest.mark.parametrize(
    ("params", "layer"),
    [({"tokens": 16}, 0), ({"tokens": 32, "alpha": 0.5}, 0), ({"tokens": 50, "alpha": 0.5, "object_layer": 2}, 1),
     ({"tokens": 25, "alpha": 1.0, "object_layer": 3}, 2), ({"tokens": 25, "alpha": 1.0, "wrap": "grid"}, 0),
     ({"tokens": 8}, 0)],
)
def test_kept_set_equals_plain_reference(tiny, tiny_eager, params, layer):
    model, processor = tiny
    assert len(model.model.vision_tower.encoder.layers) == 3  # object layer default: round(9 * 3 / 24) = 1
    tokens, alpha, wrap = params["tokens"], params.get("alpha", 0.1), params.get("wrap", "official")
    for row in range(3):
        inputs = single(processor, row)
        g_obj, g_deep = received(tiny_eager[0], inputs, layer), received(tiny_eager[0], inputs, -2)
        expected = reference_keep(g_obj, g_deep, tokens, alpha, wrap)
        recorder = Recorder(finepruner.methods.create("hiprune", **params))
        with finepruner.apply(model, recorder.method) as handle, torch.no_grad():
            model(**inputs)
        assert recorder.kept[0].tolist() == expected, (params, row)
        assert handle.stats.visual_tokens == [tokens] * 4


def test_anchors_and_buffers_on_a_constructed_grid():
    """Anchor 7 (row end) and 56 (last row start): official clamps/wraps, grid drops."""
    obj = torch.zeros(1, NUM_VISUAL)
    obj[0, 7], obj[0, 56] = 2.0, 1.0
    deep = -torch.arange(NUM_VISUAL, dtype=torch.float32)[None]  # registers: lowest indices first
    assert anchor_count(10, 1.0) == 2
    official = hiprune_select(obj, deep, 10, 1.0, GRID, "official")[0].tolist()
    assert official == sorted({7, 6, 8, 0, 15, 56, 55, 57, 48, 63})  # 7-8 clamps to 0, 56+8 to 63
    grid = hiprune_select(obj, deep, 10, 1.0, GRID, "grid")[0].tolist()
    assert grid == sorted({7, 6, 15, 56, 57, 48} | {0, 1, 2, 3})


def test_captured_received_attention_equals_eager(tiny, tiny_eager, batch):
    model, _ = tiny
    hooks = [len(layer.self_attn._forward_hooks) for layer in model.model.vision_tower.encoder.layers]
    capture = VisionCapture(LlavaAdapter(model), ("received_attention@0", "received_attention"))
    try:
        with torch.no_grad():
            model.model.vision_tower(batch["pixel_values"])
        seen = capture.take(3, NUM_VISUAL, None)
    finally:
        capture.remove()
    with torch.no_grad():
        attn = tiny_eager[0].model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    for layer in (0, 1):
        assert (seen.received_attention[layer] - attn[layer].mean(dim=(1, 2))[:, 1:]).abs().max().item() <= 1e-6
    assert seen.feature_layer == 1 and sorted(seen.received_attention) == [0, 1]
    assert [len(layer.self_attn._forward_hooks) for layer in model.model.vision_tower.encoder.layers] == hooks


def test_keep_all_equals_transformers(tiny, batch):
    model, _ = tiny
    reference = generate(model, batch)
    with finepruner.apply(model, "hiprune", tokens=NUM_VISUAL) as handle:
        pruned = generate(model, batch)
    assert_same_generation(pruned, reference)
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


@pytest.mark.parametrize(
    "params", [{"tokens": 12}, {"tokens": 12, "alpha": 1.0}, {"tokens": 20, "alpha": 1.0, "wrap": "grid"}]
)
def test_padded_batch_equals_each_sample_alone(tiny, batch, params):
    model, processor = tiny
    with finepruner.apply(model, "hiprune", **params) as handle:
        together = generate(model, batch)
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert handle.stats.visual_tokens == [params["tokens"]] * 4
            assert_row_equals_alone(alone, together, row)


def test_default_object_layer_scales_with_depth():
    assert [default_object_layer(d) for d in (24, 32, 12, 4, 3, 1)] == [9, 12, 4, 2, 1, 1]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 65}, r"tokens=65 is not allowed.*1\.\.64"),
        ({"tokens": 0}, r"tokens=0 is not allowed; allowed: an integer >= 1"),
        ({"alpha": 1.5}, r"alpha=1.5; allowed: a number in \[0, 1\]"),
        ({"tokens": 3, "alpha": 1.0}, r"alpha=1.0 gives 1 anchors.*allowed: alpha with"),
        ({"object_layer": 0}, r"object_layer=0; allowed: None .* 1\.\.depth"),
        ({"object_layer": 4}, r"object_layer=4 but the vision tower has 3 layers; allowed: object_layer in 1\.\.3"),
        ({"wrap": "torus"}, r"wrap='torus'; allowed: \('official', 'grid'\)"),
        ({"positions": "shifted"}, "positions='shifted'"),
    ],
)
def test_bad_parameters(tiny, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "hiprune", **params)
    assert "forward" not in vars(model.model.language_model)


def test_two_images_per_sample_is_a_clear_error(tiny):
    from tests.conftest import noise_images

    model, processor = tiny
    inputs = processor(images=noise_images(2), text=["USER: <image> <image> what ? ASSISTANT:"], return_tensors="pt")
    with finepruner.apply(model, "hiprune", tokens=16), torch.no_grad(), pytest.raises(ValueError, match="2 images"):
        model(**inputs)
