"""VisPruner and CDPruner on Qwen2.5-VL / Qwen2-VL: the ports for a tower without [CLS] (``spec/models.md`` §4, §5.2).

The received-attention signal is checked against the tower's own eager attention weights (recorded from its
``eager_attention_forward``), put in raster order by matching the merger's rows with the tower's un-permuted
output (independent of the window index the capture uses); kept sets against plain per-image references.
"""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.cdpruner import cosine_similarity, dpp_select, image_relevance
from finepruner.methods.vispruner import vispruner_select
from finepruner.models.tiny_families import build_tiny_qwen2_5_vl, build_tiny_qwen2_vl, qwen_chat_inputs, tiny_image

IMAGES = [[tiny_image(168, 112, 1)], [tiny_image(112, 84, 3), tiny_image(56, 112, 4)]]
QUESTIONS = ["what color is the circle ?", "which one is on the left ?"]
_MODELS: dict[str, tuple] = {}


def tiny(name: str):
    if name not in _MODELS:
        build = build_tiny_qwen2_5_vl if name == "qwen2_5_vl" else build_tiny_qwen2_vl
        _MODELS[name] = build(seed=0, attn="eager", qk_scale=8.0)
    return _MODELS[name]


def inputs_for(processor, rows):
    return qwen_chat_inputs(processor, [QUESTIONS[r] for r in rows], [IMAGES[r] for r in rows])


def _modeling(model):
    import importlib

    return importlib.import_module(type(model.model.visual).__module__)


def reference_signals(model, image) -> tuple[torch.Tensor, torch.Tensor]:
    """(received attention [V], merged features [V, D]) of one image alone, from the tower's eager weights."""
    processed = model_processor_cache[id(model)].image_processor([image], return_tensors="pt")
    module = _modeling(model)
    weights: list[torch.Tensor] = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        out, w = original(*args, **kwargs)
        weights.append(w.detach())
        return out, w

    merged: list[torch.Tensor] = []
    hook = model.model.visual.merger.register_forward_hook(lambda m, a, o: merged.append(o.detach()))
    module.eager_attention_forward = recording
    try:
        with torch.no_grad():
            pooled = model.model.visual(processed["pixel_values"], grid_thw=processed["image_grid_thw"]).pooler_output
    finally:
        module.eager_attention_forward = original
        hook.remove()
    last = weights[-1][0]  # the last block: full attention over the image, [heads, N, N]
    received = last.float().mean(dim=0).mean(dim=0).view(-1, 4).mean(dim=1)  # tower order, per merge unit
    distance = torch.cdist(pooled.float(), merged[-1].float())
    order = distance.argmin(dim=1)  # raster token i is row order[i] of the merger's (window-ordered) output
    assert torch.equal(torch.sort(order).values, torch.arange(len(order)))
    return received[order], pooled


model_processor_cache: dict[int, object] = {}


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_vispruner_signal_and_kept_sets_equal_per_image_references(name):
    model, processor = tiny(name)
    model_processor_cache[id(model)] = processor
    tokens = 4
    for row in range(len(IMAGES)):
        inputs = inputs_for(processor, [row])
        with finepruner.apply(model, "vispruner", tokens=tokens, processor=processor) as handle, torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        expected, offset = [], 0
        for image in IMAGES[row]:
            received, features = reference_signals(model, image)
            picks = vispruner_select(received[None], features[None], tokens, 0.5)[0]
            expected.append(picks + offset)
            offset += received.shape[0]
        assert handle.kept[0][0].tolist() == torch.cat(expected).tolist()


def test_the_capture_equals_the_eager_weights_after_unpermuting_windows():
    model, processor = tiny("qwen2_5_vl")
    model_processor_cache[id(model)] = processor
    from finepruner.models.adapters import adapter_for

    adapter = adapter_for(model)
    capture = adapter.make_vision_capture(("cls_attention", "patch_features"))
    inputs = inputs_for(processor, [0])
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        image = capture.take_images()[0]
    finally:
        capture.remove()
    order = adapter.window_order(inputs["image_grid_thw"])
    assert not torch.equal(order, torch.arange(order.numel()))  # the window permutation is exercised
    received, features = reference_signals(model, IMAGES[0][0])
    assert (image.cls_attention - received).abs().max().item() <= 1e-6
    assert torch.allclose(image.patch_features, features)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_cdpruner_uses_llm_relevance_per_image(name):
    """CDPruner on Qwen: relevance from the language model's input embeddings of the instruction (sign +1),
    kernel on the merged tokens, DPP per image (CDPruner#7; openvino.genai's rule)."""
    model, processor = tiny(name)
    tokens = 4
    inputs = inputs_for(processor, [1])
    with finepruner.apply(model, "cdpruner", tokens=tokens, processor=processor) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    text = handle.instructions[0]
    assert text.replace(" ", "") == QUESTIONS[1].replace(" ", "")  # the user turn, without the template's tail
    embedding = model.model.get_input_embeddings()
    with torch.no_grad():
        text_embeds = embedding(torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"]))
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    expected, offset = [], 0
    for image in features:
        relevance = image_relevance(image[None], [text_embeds], torch.ones(1, image.shape[0], dtype=torch.bool), 1)
        picks = dpp_select(cosine_similarity(image[None].float()), relevance, tokens)[0]
        expected.append(picks.sort().values + offset)
        offset += image.shape[0]
    assert handle.kept[0][0].tolist() == torch.cat(expected).tolist()


def test_methods_needing_cls_are_refused_naming_the_reason():
    """PruMerge(+) and VisionZip's [CLS] vector (``cls_token=True``) need a [CLS] row; VisionZip without it and
    HiPrune run on Qwen (``tests/test_cls_free_ports.py``)."""
    model, _ = tiny("qwen2_5_vl")
    for method, params in (("prumerge", {}), ("prumerge_plus", {}), ("visionzip", {"tokens": 4, "cls_token": True})):
        with pytest.raises(ValueError, match="no \\[CLS\\] token"):
            finepruner.apply(model, method, **params)
    with pytest.raises(ValueError, match="relevance='clip' needs a CLIP vision tower"):
        finepruner.apply(model, "cdpruner", tokens=4, relevance="clip")
