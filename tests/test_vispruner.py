"""VisPruner and the vision-side signals: kept sets against a plain reference of the spec (§4.2, §7.7)."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.engine.vision import VISION_SIGNALS, cls_attention
from finepruner.methods.base import PruningMethod, Stage
from finepruner.methods.vispruner import vispruner_select
from tests.conftest import GEN, NUM_VISUAL, PROMPTS, assert_row_equals_alone, assert_same_generation, generate, single


def eager_vision(model, inputs):
    """Eager vision tower outputs with attentions (the expensive route the hooks avoid)."""
    with torch.no_grad():
        return model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)


def reference_vispruner(attention: list[float], features: torch.Tensor, tokens: int, ratio: float) -> list[int]:
    """The spec's pseudo-code for one image, written plainly (lists, loops); ``min(.., ceil(R/2))`` is the
    documented extension for odd or small residual lists (§7.7)."""
    important_count = int(tokens * ratio)
    diverse = tokens - important_count
    order = sorted(range(len(attention)), key=lambda i: -attention[i])
    important, residual = order[:important_count], order[important_count:]
    normed = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0:
        length = len(residual)
        drop = min(8, length - diverse, (length + 1) // 2)
        if drop <= 0:
            break
        first, second = residual[0::2], residual[1::2]
        best = (normed[first] @ normed[second].T).max(dim=1).values.tolist()  # each A's best match in B
        ranked = sorted(range(len(first)), key=lambda k: -best[k])
        residual = [first[k] for k in ranked[drop:]] + second
    kept = important + (residual if diverse > 0 else [])
    assert len(kept) == tokens and len(set(kept)) == tokens
    return sorted(kept)


class Recorder(PruningMethod):
    """Keeps every token at layer 0 and records the vision signals it received."""

    name = "recorder"
    default_positions = "renumber"
    needs_vision = VISION_SIGNALS

    def plan(self, num_layers, num_visual):
        return [Stage(layer=0, keep=num_visual)]

    def select(self, stage_index, stage, ctx):
        self.seen = ctx.vision
        return ctx.visual_ids.clone()


def test_cls_attention_equals_eager(tiny_eager, batch):
    model, _ = tiny_eager
    out = eager_vision(model, batch)
    for index, layer in enumerate(model.model.vision_tower.encoder.layers):
        cheap = cls_attention(layer.self_attn, layer.layer_norm1(out.hidden_states[index]))
        eager = out.attentions[index][:, :, 0, 1:].mean(dim=1)
        assert cheap.dtype == torch.float32
        assert (cheap - eager).abs().max().item() <= 1e-7


def test_captured_signals_equal_eager_reference(tiny, tiny_eager, batch):
    """The hooks see what LLaVA computes: penultimate [CLS] attention, features, projector outputs."""
    model, _ = tiny
    out = eager_vision(tiny_eager[0], batch)
    recorder = Recorder()
    with finepruner.apply(model, recorder) as handle, torch.no_grad():
        capture = handle._vision
        model(**batch)
    seen = recorder.seen
    features = out.hidden_states[-2][:, 1:]
    assert (seen.cls_attention - out.attentions[-2][:, :, 0, 1:].mean(1)).abs().max().item() <= 1e-7
    assert torch.allclose(seen.patch_features, features, atol=1e-6)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(features)
        normed = model.model.vision_tower.post_layernorm(features)
    assert torch.allclose(seen.projected_features, projected, atol=1e-6)
    assert torch.allclose(seen.post_layernorm_features, normed, atol=1e-5)
    masks = batch["attention_mask"].bool()
    assert seen.prompt_ids == [batch["input_ids"][r][masks[r]].tolist() for r in range(3)]
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4
    assert capture is not None and handle._vision is None
    for module in model.modules():  # no hook of the capture is left behind
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            assert getattr(hook, "__self__", None) is not capture


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.0, 1.0])
def test_kept_set_equals_plain_reference(tiny, tiny_eager, batch, ratio):
    model, _ = tiny
    out = eager_vision(tiny_eager[0], batch)
    attention = out.attentions[-2][:, :, 0, 1:].mean(1)
    features = out.hidden_states[-2][:, 1:]
    for tokens in (1, 7, 16, 33, 50, 63, 64):
        with finepruner.apply(model, "vispruner", tokens=tokens, important_ratio=ratio) as handle, torch.no_grad():
            model(**batch)
        for row in range(3):
            expected = reference_vispruner(attention[row].tolist(), features[row], tokens, ratio)
            assert handle.kept[0][row].tolist() == expected, (tokens, row)


@pytest.mark.parametrize("tokens", [64, 66, 128, 192, 191, 32, 4])
def test_selection_llava_shape_equals_reference(tokens):
    """576 candidates, heavy-tailed inputs; includes odd residual counts (66, 191), where the official
    code raises and the documented extension applies."""
    torch.manual_seed(tokens)
    attention = torch.distributions.StudentT(2.0).sample((2, 576)).abs()
    features = torch.randn(2, 576, 48)
    # near-duplicates at well separated distances (no float ties)
    noise = torch.randn(2, 83, 48) * torch.linspace(0.05, 1.0, 83)[None, :, None]
    features[:, ::7] = features[:, 1::7] + noise
    kept = vispruner_select(attention, features, tokens, 0.5)
    assert kept.shape == (2, tokens)
    for row in range(2):
        assert kept[row].tolist() == reference_vispruner(attention[row].tolist(), features[row], tokens, 0.5)


def test_keep_all_equals_transformers(tiny, batch):
    model, _ = tiny
    reference = generate(model, batch)
    with finepruner.apply(model, "vispruner", tokens=NUM_VISUAL) as handle:
        pruned = generate(model, batch)
    assert_same_generation(pruned, reference)
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


def test_padded_batch_equals_each_sample_alone_and_kv_lengths(tiny, batch):
    model, processor = tiny
    new = GEN["max_new_tokens"]
    text = batch["input_ids"].shape[1] - NUM_VISUAL
    with finepruner.apply(model, "vispruner", tokens=12, important_ratio=0.5) as handle:
        together = generate(model, batch)
        kept = handle.kept[0].clone()
        assert [layer.keys.shape[2] for layer in together.cache.layers] == [text + 12 + new - 1] * 4
        assert handle.stats.visual_tokens == [12] * 4
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert torch.equal(handle.kept[0][0], kept[row])
            assert_row_equals_alone(alone, together, row)


def test_beam_search_repeats_the_encoded_samples(tiny, batch):
    """generate encodes images once, then repeats samples for beams: signals follow."""
    model, _ = tiny
    with finepruner.apply(model, "vispruner", tokens=10) as handle:
        generate(model, batch)
        plain = handle.kept[0].clone()
        generate(model, batch, num_beams=2, num_return_sequences=2)
    assert torch.equal(handle.kept[0], plain.repeat_interleave(2, dim=0))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 65}, "tokens=65 is not allowed.*1..64"),
        ({"tokens": 0}, "1..64"),
        ({"tokens": 8, "important_ratio": 1.5}, "important_ratio=1.5"),
        ({"tokens": 8, "positions": "shifted"}, "positions='shifted'"),
    ],
)
def test_bad_parameters(tiny, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "vispruner", **params)
    assert "forward" not in vars(model.model.language_model)


def test_default_budget_and_no_pixel_values(tiny, batch):
    model, _ = tiny
    with finepruner.apply(model, "vispruner") as handle, torch.no_grad():
        model(**batch)
    assert handle.kept[0].shape == (3, NUM_VISUAL // 4)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    with finepruner.apply(model, "vispruner", tokens=8), torch.no_grad():
        # images encoded outside the handle: no signals were captured, so the error says what to pass
        with pytest.raises(RuntimeError, match="pass pixel_values"):
            model(**inputs, mm_encoder_outputs={"image": features})
