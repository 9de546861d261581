"""VisionZip: dominant and contextual token values against a plain reference of the spec (``methods_more.md``
§1.2), budget splits, batches, keep-all, errors."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.visionzip import split_budget
from tests.conftest import (
    GEN,
    NUM_VISUAL,
    PROMPTS,
    assert_row_equals_alone,
    assert_same_generation,
    generate,
    logits_with_visual_tokens,
    single,
)


def eager_vision(model, inputs):
    with torch.no_grad():
        return model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)


def reference_tokens(model, inputs, dominant: int, contextual: int, cls_token: bool) -> torch.Tensor:
    """The tokens VisionZip sends to the LLM for one image, from the eager vision outputs, written as loops:
    [CLS] (optional) and dominant patches in index order, then ``H[t] + mean(H[members])`` per target."""
    out = eager_vision(model, inputs)
    layers = model.model.vision_tower.encoder.layers
    index = len(layers) - 2
    hidden = out.hidden_states[-2][0].double()  # [1 + V, Dv], [CLS] first
    attn = out.attentions[-2][0]  # [heads, 1 + V, 1 + V]
    scores = [sum(attn[h, 0, 1 + i].item() for h in range(attn.shape[0])) for i in range(NUM_VISUAL)]
    layer = layers[index]
    with torch.no_grad():
        raw = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))[0, 1:]
    heads = layer.self_attn.num_heads
    keys = raw.view(NUM_VISUAL, heads, -1).double().mean(dim=1)
    order = sorted(range(NUM_VISUAL), key=lambda i: (-scores[i], i))
    patches = sorted(order[: dominant - int(cls_token)])
    rows = ([hidden[0]] if cls_token else []) + [hidden[1 + i] for i in patches]
    remaining = [i for i in range(NUM_VISUAL) if i not in patches]
    if contextual:
        step = max(1, len(remaining) // contextual)
        targets = [remaining[p * step] for p in range(contextual)]
        members: dict[int, list[int]] = {t: [] for t in targets}
        for r in remaining:
            if r in targets:
                continue
            sims = [torch.nn.functional.cosine_similarity(keys[r], keys[t], dim=0).item() for t in targets]
            members[targets[sims.index(max(sims))]].append(r)
        for t in targets:
            merged = hidden[1 + t].clone()
            if members[t]:
                merged += sum(hidden[1 + m] for m in members[t]) / len(members[t])
            rows.append(merged)
    return torch.stack(rows).float()


def reference_logits(model, inputs, dominant: int, contextual: int, cls_token: bool) -> torch.Tensor:
    """Last-token logits with the image span replaced by the projected reference tokens (contiguous)."""
    tokens = reference_tokens(model, inputs, dominant, contextual, cls_token)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(tokens)
    return logits_with_visual_tokens(model, inputs, projected)


def test_published_splits():
    assert [split_budget(n) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    stage = finepruner.methods.create("visionzip", tokens=64).plan(32, 576)[0]
    assert (stage.layer, stage.keep, stage.insert) == (0, 0, 64)
    stage = finepruner.methods.create("visionzip", tokens=192, cls_token=False).plan(32, 576)[0]
    assert (stage.keep, stage.insert) == (162, 30)
    assert finepruner.methods.create("visionzip").plan(32, 576)[0].insert == 144


@pytest.mark.parametrize(
    ("params", "split"),
    [({"tokens": 16}, (14, 2)), ({"tokens": 32}, (27, 5)), ({"dominant": 6, "contextual": 7}, (6, 7)),
     ({"dominant": 1, "contextual": 3}, (1, 3)), ({"tokens": 20, "cls_token": False}, (17, 3)),
     ({"dominant": 9, "contextual": 0}, (9, 0)), ({"dominant": 0, "contextual": 4, "cls_token": False}, (0, 4))],
)
def test_tokens_equal_plain_reference(tiny, tiny_eager, params, split):
    model, processor = tiny
    cls_token = params.get("cls_token", True)
    for row in range(3):
        inputs = single(processor, row)
        expected = reference_logits(tiny_eager[0], inputs, *split, cls_token)
        with finepruner.apply(model, "visionzip", **params) as handle, torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        assert handle.stats.visual_tokens == [sum(split)] * 4
        assert (logits - expected).abs().max().item() <= 1e-4, (params, row)


def test_cls_token_changes_the_output(tiny):
    model, processor = tiny
    inputs = single(processor, 0)
    logits = {}
    for cls_token in (True, False):
        with finepruner.apply(model, "visionzip", tokens=16, cls_token=cls_token), torch.no_grad():
            logits[cls_token] = model(**inputs).logits[:, -1]
    assert (logits[True] - logits[False]).abs().max().item() > 1e-3


def test_keep_all_equals_transformers(tiny, batch):
    """Every patch dominant, no [CLS], no contextual token: plain transformers."""
    model, _ = tiny
    reference = generate(model, batch)
    with finepruner.apply(model, "visionzip", dominant=NUM_VISUAL, contextual=0, cls_token=False) as handle:
        pruned = generate(model, batch)
    assert_same_generation(pruned, reference)
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


@pytest.mark.parametrize(("params", "count"), [({"tokens": 12}, 12), ({"tokens": 12, "positions": "original"}, 12),
                                               ({"tokens": 12, "cls_token": False}, 12)])
def test_padded_batch_equals_each_sample_alone_and_kv_lengths(tiny, batch, params, count):
    model, processor = tiny
    new = GEN["max_new_tokens"]
    text = batch["input_ids"].shape[1] - NUM_VISUAL
    with finepruner.apply(model, "visionzip", **params) as handle:
        together = generate(model, batch)
        assert [layer.keys.shape[2] for layer in together.cache.layers] == [text + count + new - 1] * 4
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert handle.stats.visual_tokens == [count] * 4
            assert_row_equals_alone(alone, together, row)


def test_beam_search_repeats_the_encoded_samples(tiny, batch):
    model, _ = tiny
    with finepruner.apply(model, "visionzip", tokens=16) as handle:
        generate(model, batch, num_beams=2, num_return_sequences=2)
    assert handle.stats.visual_tokens == [16] * 4


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 66}, r"tokens=66 is not allowed.*1\.\.65"),
        ({"tokens": 65, "cls_token": False}, r"tokens=65 is not allowed.*1\.\.64"),
        ({"tokens": 0}, r"tokens=0; allowed: an integer >= 1"),
        ({"tokens": 16, "dominant": 8, "contextual": 8}, "tokens or"),
        ({"dominant": 8}, "dominant and contextual together"),
        ({"dominant": 0, "contextual": 4}, r"dominant=0; allowed: an integer >= 1"),
        ({"dominant": 4, "contextual": -1}, r"contextual=-1; allowed: an integer >= 0"),
        ({"dominant": 0, "contextual": 0, "cls_token": False}, "at least one token"),
        ({"dominant": 66, "contextual": 0}, r"dominant must be at most 65"),
        ({"dominant": 60, "contextual": 6}, r"only 5 patches are left.*contextual in 0\.\.5"),
        ({"tokens": 16, "cls_token": "yes"}, r"cls_token='yes'; allowed: True \(official\) or False"),
        ({"tokens": 16, "positions": "shifted"}, "positions='shifted'"),
    ],
)
def test_bad_parameters(tiny, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "visionzip", **params)
    assert "forward" not in vars(model.model.language_model)


def test_two_images_per_sample_is_a_clear_error(tiny):
    from tests.conftest import noise_images

    model, processor = tiny
    inputs = processor(images=noise_images(2), text=["USER: <image> <image> what ? ASSISTANT:"], return_tensors="pt")
    with finepruner.apply(model, "visionzip", tokens=16), torch.no_grad(), pytest.raises(ValueError, match="2 images"):
        model(**inputs)


def test_captured_signals_equal_eager_reference(tiny, tiny_eager, batch):
    """The feature-layer hook gives the [CLS] row summed over heads, the head-mean keys and the [CLS] vector."""
    from finepruner.methods.base import PruningMethod, Stage

    class Recorder(PruningMethod):
        name = "recorder"
        default_positions = "renumber"
        needs_vision = ("cls_attention_sum", "feature_keys", "cls_feature")

        def plan(self, num_layers, num_visual):
            return [Stage(layer=0, keep=num_visual)]

        def select(self, stage_index, stage, ctx):
            self.seen = ctx.vision
            return ctx.visual_ids.clone()

    model, _ = tiny
    out = eager_vision(tiny_eager[0], batch)
    layer = model.model.vision_tower.encoder.layers[-2]
    with torch.no_grad():
        raw = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))[:, 1:]
    recorder = Recorder()
    with finepruner.apply(model, recorder), torch.no_grad():
        model(**batch)
    seen = recorder.seen
    assert (seen.cls_attention_sum - out.attentions[-2][:, :, 0, 1:].sum(1)).abs().max().item() <= 1e-6
    keys = raw.view(*raw.shape[:2], layer.self_attn.num_heads, -1).mean(dim=2)
    assert (seen.feature_keys - keys).abs().max().item() <= 1e-5
    assert (seen.cls_feature[:, 0] - out.hidden_states[-2][:, 0]).abs().max().item() <= 1e-6
