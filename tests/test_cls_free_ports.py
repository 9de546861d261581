"""HiPrune and VisionZip on vision towers without [CLS]: Qwen2-VL / Qwen2.5-VL / Qwen3-VL, and HiPrune on
LLaVA-OneVision (SigLIP; buffers on the grids of the image's tokens, the anyres_max shrink included).

HiPrune (``methods_more.md`` §4.1, the official Qwen2.5-VL code): per image, on its merged grid, from the
attention each patch receives at the object block and at the last block (mean over heads, sum over the
queries of the block's segments, mean over each 2 x 2 merge unit). VisionZip (LightCompress's Qwen2.5-VL
port, §8): dominant merged tokens by the last block's received attention, contextual tokens merged from the
language model's input rows by the similarity of the last block's RoPE'd keys.

The references read the tower's own eager attention (``eager_attention_forward``: its weights and rotated
keys per attention segment, tagged by block) on each image alone, put them in raster order by matching the
merger's rows with the tower's un-permuted output (no window index), and select with plain loops.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import finepruner
from finepruner.models.tiny_families import (
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
    qwen_chat_inputs,
    tiny_image,
)
from tests.conftest import assert_row_equals_alone

BUILDERS = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen2_vl": build_tiny_qwen2_vl, "qwen3_vl": build_tiny_qwen3_vl}
#: images of different sizes and shapes (merged grids 4 x 6, 3 x 4, 4 x 2 at 28 px; others at 32 px)
IMAGES = [[tiny_image(168, 112, 1)], [tiny_image(112, 84, 3), tiny_image(56, 112, 4)], [tiny_image(224, 140, 5)]]
QUESTIONS = ["what color is the circle ?", "which one is on the left ?", "what is in the middle ?"]
_MODELS: dict[str, tuple] = {}


def tiny(name: str):
    if name not in _MODELS:
        _MODELS[name] = BUILDERS[name](seed=0, attn="eager", qk_scale=8.0)
    return _MODELS[name]


def inputs_for(processor, rows):
    return qwen_chat_inputs(processor, [QUESTIONS[r] for r in rows], [IMAGES[r] for r in rows])


def eager_signals(model, processor, image) -> dict:
    """One image alone, in raster order of its merged tokens: per block the received attention (mean over
    heads, sum over each segment's queries, mean per merge unit), the last block's received attention with
    the mean over queries, its rotated keys (mean per merge unit and over heads), the merged tokens, the grid."""
    processed = processor.image_processor([image], return_tensors="pt")
    visual = model.model.visual
    module = importlib.import_module(type(visual).__module__)
    blocks = {id(block.attn): index for index, block in enumerate(visual.blocks)}
    records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    original = module.eager_attention_forward

    def recording(attn, query, key, value, *args, **kwargs):
        out, weights = original(attn, query, key, value, *args, **kwargs)
        records.setdefault(blocks[id(attn)], []).append((weights.detach()[0].float(), key.detach()[0].float()))
        return out, weights

    merged: list[torch.Tensor] = []
    hook = visual.merger.register_forward_hook(lambda m, a, o: merged.append(o.detach()))
    module.eager_attention_forward = recording
    try:
        with torch.no_grad():
            pooled = visual(processed["pixel_values"], grid_thw=processed["image_grid_thw"]).pooler_output
    finally:
        module.eager_attention_forward = original
        hook.remove()
    order = torch.cdist(pooled.float(), merged[-1].float()).argmin(dim=1)  # raster token i = merger row order[i]
    assert torch.equal(torch.sort(order).values, torch.arange(len(order)))

    def unit_mean(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, 4, *values.shape[1:]).mean(dim=1)[order]

    summed = {b: unit_mean(torch.cat([w.mean(dim=0).sum(dim=0) for w, _ in chunks])) for b, chunks in records.items()}
    last = records[len(visual.blocks) - 1]
    assert len(last) == 1  # the last block attends over the whole image
    weights, keys = last[0]
    _, height, width = processed["image_grid_thw"][0].tolist()
    return {"received": summed, "mean": unit_mean(weights.mean(dim=0).mean(dim=0)),
            "keys": unit_mean(keys.mean(dim=0)), "merged": pooled, "width": width // 2, "depth": len(visual.blocks)}


def hiprune_reference(obj: torch.Tensor, deep: torch.Tensor, tokens: int, alpha: float, width: int) -> list[int]:
    """HiPrune's official rule on one image's merged grid (flat +-1 / +-width buffers clamped to [0, V-1])."""
    count = len(obj)
    anchors = sorted(range(count), key=lambda i: (-float(obj[i]), i))[:round(tokens * alpha / 5)]
    chosen = set(anchors)
    for a in anchors:
        chosen |= {min(max(a + step, 0), count - 1) for step in (-1, 1, -width, width)}
    rest = sorted((i for i in range(count) if i not in chosen), key=lambda i: (-float(deep[i]), i))
    return sorted(chosen | set(rest[:tokens - len(chosen)]))


def visionzip_reference(signals: dict, dominant: int, contextual: int) -> tuple[list[int], torch.Tensor, list[int]]:
    """LightCompress's Qwen VisionZip on one image: (dominant tokens, contextual tokens [c, D], their targets)."""
    scores, keys, values = signals["mean"], signals["keys"], signals["merged"].float()
    count = len(scores)
    top = sorted(sorted(range(count), key=lambda i: (-float(scores[i]), i))[:dominant])
    remaining = [i for i in range(count) if i not in top]
    step = max(1, len(remaining) // contextual) if contextual else 1
    targets = [remaining[k * step] for k in range(contextual)]
    members: dict[int, list[int]] = {t: [] for t in targets}
    unit = keys / keys.norm(dim=-1, keepdim=True)
    for r in remaining if targets else []:
        if r in members:
            continue
        similarity = torch.stack([unit[r] @ unit[t] for t in targets])
        members[targets[int(similarity.argmax())]].append(r)
    merged = [values[t] + (values[members[t]].mean(dim=0) if members[t] else 0) for t in targets]
    return top, torch.stack(merged) if merged else values[:0], targets


def generate(model, processor, inputs, method: str, new: int = 1, **params):
    with finepruner.apply(model, method, processor=processor, **params) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return handle, out


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("params", [{"tokens": 5, "alpha": 1.0}, {"tokens": 7, "alpha": 1.0}, {"tokens": 3},
                                    {"ratio": 0.5, "alpha": 0.5}, {"tokens": 6, "alpha": 1.0, "object_layer": 2}])
def test_hiprune_kept_sets_equal_the_official_rule_per_image(name, params):
    model, processor = tiny(name)
    depth = len(model.model.visual.blocks)
    layer = params.get("object_layer", max(1, round(16 * depth / 32)))  # 16 of 32 blocks, the official fraction
    for row in range(len(IMAGES)):
        handle, _ = generate(model, processor, inputs_for(processor, [row]), "hiprune", **params)
        expected, offset = [], 0
        for image in IMAGES[row]:
            signals = eager_signals(model, processor, image)
            count = len(signals["mean"])
            tokens = params.get("tokens") or max(1, round(count * params["ratio"]))
            picks = hiprune_reference(signals["received"][layer - 1], signals["received"][depth - 1], tokens,
                                      params.get("alpha", 0.1), signals["width"])
            expected += [p + offset for p in picks]
            offset += count
        assert handle.method._layers == (layer - 1, depth - 1)
        assert handle.kept[0][0].tolist() == expected


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("params", [{"dominant": 3, "contextual": 2}, {"dominant": 1, "contextual": 4},
                                    {"dominant": 4, "contextual": 0}, {"tokens": 7}, {"tokens": 8, "cls_token": False}])
def test_visionzip_equals_lightcompress_rule_per_image(name, params):
    model, processor = tiny(name)
    for row in range(len(IMAGES)):
        inputs = inputs_for(processor, [row])
        captured: list[torch.Tensor] = []

        def record(module, args, kwargs, into=captured):
            into.append((args[0] if args else kwargs["hidden_states"]).detach())

        hook = model.model.language_model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            handle, _ = generate(model, processor, inputs, "visionzip", **params)
        finally:
            hook.remove()
        kept, merged_tokens, offset = [], [], 0
        for image in IMAGES[row]:
            signals = eager_signals(model, processor, image)
            count = len(signals["mean"])
            if "tokens" in params:
                contextual = params["tokens"] * 5 // 32
                dominant = params["tokens"] - contextual
            else:
                dominant, contextual = params["dominant"], params["contextual"]
            top, merged, _ = visionzip_reference(signals, dominant, contextual)
            kept += [t + offset for t in top]
            merged_tokens.append(merged)
            offset += count
        assert handle.kept[0][0].tolist() == kept
        # the prefill's visual rows: each image's kept tokens, then its contextual tokens (its merged features)
        ids = inputs["input_ids"][0]
        start = int((ids == model.config.image_token_id).nonzero()[0, 0])
        hidden = captured[0][0]
        embeds = model.model.get_input_embeddings()(ids)
        with torch.no_grad():
            features = torch.cat(list(model.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
        position, first = start, 0
        for image, merged in zip(IMAGES[row], merged_tokens, strict=True):
            count = len(eager_signals(model, processor, image)["mean"])
            mine = [k - first for k in kept if first <= k < first + count]
            for k in mine:
                assert torch.allclose(hidden[position], features[first + k].to(hidden.dtype), atol=1e-5)
                position += 1
            for token in merged:
                assert torch.allclose(hidden[position].float(), token, atol=1e-4)
                position += 1
            first += count
            position += 2 if image is not IMAGES[row][-1] else 0  # <|vision_end|><|vision_start|> between images
        assert torch.equal(hidden[position], embeds[start + first + (2 * (len(IMAGES[row]) - 1))])


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize(("method", "params"), [("hiprune", {"tokens": 5, "alpha": 1.0}),
                                                ("visionzip", {"dominant": 3, "contextual": 2})])
def test_left_padded_batch_equals_each_sample_alone(name, method, params):
    model, processor = tiny(name)
    together_handle, together = generate(model, processor, inputs_for(processor, [0, 2]), method, new=3, **params)
    for row, sample in enumerate([0, 2]):
        handle, alone = generate(model, processor, inputs_for(processor, [sample]), method, new=3, **params)
        width = handle.kept[0].shape[1]
        assert together_handle.kept[0][row, :width].tolist() == handle.kept[0][0].tolist()
        assert_row_equals_alone(alone, together, row)


def test_hiprune_budget_and_depth_rules():
    model, processor = tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="pass tokens or ratio, not both"):
        finepruner.methods.create("hiprune", tokens=4, ratio=0.5)
    with pytest.raises(ValueError, match="ratio=1.5 is the kept fraction"):
        finepruner.methods.create("hiprune", ratio=1.5)
    with pytest.raises(ValueError, match="object_layer=3 but the vision tower has 2 layers"):
        finepruner.apply(model, "hiprune", tokens=4, object_layer=3, processor=processor)
    method = finepruner.methods.create("hiprune", ratio=0.334)
    assert [method.kept(v) for v in (576, 24, 12)] == [192, 8, 4]  # round(V * ratio), official


def test_visionzip_cls_token_is_refused_without_cls():
    model, processor = tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        finepruner.apply(model, "visionzip", tokens=4, cls_token=True, processor=processor)


# -- OneVision (SigLIP, no [CLS]; anyres_max shrink) ----------------------------------------------------------
def onevision_received(fam, inputs, layers: tuple[int, int]) -> list[dict]:
    """Per image, in its token order: the attention each patch receives at the two encoder layers (eager, mean
    over heads and all queries), packed by the model's own ``pack_image_features`` (with its bilinear shrink),
    and the newline mask."""
    from tests.test_vision_families import crop_batch, crop_parts, newlines_of, pack_reference

    pixels, crops = crop_batch(fam.eager, inputs)
    with torch.no_grad():
        out = fam.eager.model.vision_tower(pixels, output_attentions=True)
    received = [out.attentions[layer].mean(dim=(1, 2)) for layer in layers]
    newlines = newlines_of(fam, inputs)
    images = []
    for image, _, part in crop_parts(crops):
        images.append({"object": pack_reference(fam, image, received[0][part], inputs),
                       "deep": pack_reference(fam, image, received[1][part], inputs), "newline": newlines[image]})
    return images


def token_grids(newline: torch.Tensor, side: int) -> list[list[list[int]]]:
    """The image's token grids, plainly: the base crop's side x side tokens, then the tile grid whose rows
    each end with a newline (none for a one-crop image: a trailing newline)."""
    flags = newline.tolist()
    grids = [[list(range(r * side, (r + 1) * side)) for r in range(side)]]
    rows, row = [], []
    for index in range(side * side, len(flags)):
        if flags[index]:
            if row:
                rows.append(row)
            row = []
        else:
            row.append(index)
    if rows:
        grids.append(rows)
    return grids


def onevision_reference(signals: dict, tokens: int, alpha: float, side: int, wrap: str) -> list[int]:
    """HiPrune on one OneVision image: anchors by object-layer score among the non-newline tokens, buffers at
    +-1 and +-row of the anchor's cell on its token grid (flat cell index clamped to the grid, or dropped
    across an edge with ``"grid"``), registers by deep-layer score; newline tokens kept, not counted."""
    newline = signals["newline"].tolist()
    candidates = [i for i in range(len(newline)) if not newline[i]]
    place = {}
    for grid in token_grids(signals["newline"], side):
        cells = [t for row in grid for t in row]
        for f, t in enumerate(cells):
            place[t] = (cells, f, len(grid[0]))
    anchors = sorted(candidates, key=lambda i: (-float(signals["object"][i]), i))[:round(tokens * alpha / 5)]
    chosen = set(anchors)
    for a in anchors:
        cells, f, cols = place[a]
        for step in (-1, 1, -cols, cols):
            q = f + step
            if wrap == "grid" and (not 0 <= q < len(cells) or (step == -1 and f % cols == 0)
                                   or (step == 1 and f % cols == cols - 1)):
                continue
            chosen.add(cells[min(max(q, 0), len(cells) - 1)])
    rest = sorted((i for i in candidates if i not in chosen), key=lambda i: (-float(signals["deep"][i]), i))
    chosen |= set(rest[:tokens - len(chosen)])
    return sorted(chosen | {i for i in range(len(newline)) if newline[i]})


@pytest.mark.parametrize("name", ["llava_onevision", "onevision_shrunk"])
@pytest.mark.parametrize(("tokens", "alpha", "wrap"), [(10, 1.0, "official"), (12, 0.45, "grid"), (7, 0.1, "official")])
def test_hiprune_on_onevision_equals_plain_token_grid_reference(name, tokens, alpha, wrap):
    from tests.test_vision_families import LAYOUT_IMAGES, family

    fam = family(name)
    config = fam.model.config.vision_config
    side = config.image_size // config.patch_size
    method = finepruner.methods.create("hiprune", tokens=tokens, alpha=alpha, wrap=wrap)
    shrunk = 0
    with finepruner.apply(fam.model, method) as handle:
        for image in LAYOUT_IMAGES:
            inputs = fam.build(["USER: <image>\nwhat is it ? ASSISTANT:"], [[image]])
            signals = onevision_received(fam, inputs, method._layers)[0]
            with torch.no_grad():
                fam.model(**inputs)
            assert [i for i in handle.kept[0][0].tolist() if i >= 0] == onevision_reference(
                signals, tokens, alpha, side, wrap)
            shrunk += int(len(token_grids(signals["newline"], side)) > 1 and name == "onevision_shrunk")
    assert name == "llava_onevision" or shrunk  # the shrunk grids are exercised


@pytest.mark.parametrize("name", ["llava_onevision", "onevision_shrunk"])
def test_hiprune_onevision_padded_batch_equals_each_sample_alone(name):
    from tests.test_vision_families import assert_batch_equals_each_sample_alone, family

    assert_batch_equals_each_sample_alone(family(name), "hiprune", tokens=10, alpha=1.0)


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_hiprune_instance_applies_again_after_binding(name):
    """A HiPrune instance bound once (its signals renamed per layer, ``received_attention@l``) is accepted
    by a second ``apply`` on the same family (the benchmark and the sweep re-apply one instance)."""
    from finepruner.methods import create
    from tests.test_vision_families import family

    fam = family(name)
    method = create("hiprune", tokens=10, alpha=1.0)
    for _ in range(2):
        with finepruner.apply(fam.model, method):
            pass
    assert all(n.startswith("received_attention@") for n in method.needs_vision)
