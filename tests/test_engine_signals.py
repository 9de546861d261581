"""Cheap attention signal and kept sets against straightforward references from eager attention."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.engine.signals import last_query_attention
from finepruner.models.tiny import build_tiny_llava
from tests.conftest import PROMPTS, noise_images

NUM_VISUAL = 64


def eager_outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_attentions=True, output_hidden_states=True)


def visual_positions(inputs, row):
    return (inputs["input_ids"][row] == 4).nonzero()[:, 0]


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_last_query_attention_equals_eager_row(kv_heads):
    model, processor = build_tiny_llava(seed=1, qk_scale=8.0, attn_implementation="eager", text_kv_heads=kv_heads)
    inputs = processor(images=noise_images(3), text=PROMPTS, return_tensors="pt", padding=True)
    out = eager_outputs(model, inputs)
    lm = model.model.language_model
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length)[None].expand(3, -1)
    for index, layer in enumerate(lm.layers):
        hidden = out.hidden_states[index]
        embeddings = lm.rotary_emb(hidden, position_ids=positions)
        cheap = last_query_attention(layer, hidden, embeddings, inputs["attention_mask"])
        eager = out.attentions[index][:, :, -1, :]
        assert cheap.dtype == torch.float32
        assert (cheap - eager).abs().max().item() <= 1e-5


def test_fastv_kept_set_equals_eager_reference(tiny_eager, tiny, batch):
    eager_model, _ = tiny_eager
    out = eager_outputs(eager_model, batch)
    model, _ = tiny
    for K, tokens in [(1, 8), (2, 16), (3, 40)]:
        with finepruner.apply(model, "fastv", tokens=tokens, K=K) as handle, torch.no_grad():
            model(**batch)
        for row in range(3):
            vis = visual_positions(batch, row)
            scores = out.attentions[K - 1][row, :, -1, vis].mean(0)
            reference = scores.topk(tokens).indices.sort().values
            assert torch.equal(handle.kept[0][row], reference)


def reference_pdrop(model, inputs, row, layers, keeps):
    """PDrop at batch 1, written plainly: full eager attention matrices, renumbered positions."""
    lm = model.model.language_model
    mask = inputs["attention_mask"][row].bool()
    ids = inputs["input_ids"][row][mask][None]
    with torch.no_grad():
        hidden = model.model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"][row : row + 1]).pooler_output
        hidden[ids == 4] = features[0]
        visual = (ids[0] == 4).nonzero()[:, 0]
        original = torch.arange(len(visual))
        kept_sets = []
        for index, layer in enumerate(lm.layers):
            if index in layers:
                attn = layer.self_attn
                length = hidden.shape[1]
                positions = torch.arange(length)[None]
                cos, sin = lm.rotary_emb(hidden, position_ids=positions)
                x = layer.input_layernorm(hidden)
                q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
                rot = lambda t: torch.cat((-t[..., t.shape[-1] // 2 :], t[..., : t.shape[-1] // 2]), -1)  # noqa: E731
                q = q * cos[:, None] + rot(q) * sin[:, None]
                k = k * cos[:, None] + rot(k) * sin[:, None]
                logits = (q @ k.transpose(-1, -2)) * attn.scaling
                causal = torch.ones(length, length, dtype=torch.bool).tril()
                probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
                scores = probs[0, :, -1, visual].mean(0)
                keep = keeps[layers.index(index)]
                local = scores.topk(keep).indices.sort().values
                kept_sets.append(original[local])
                original = original[local]
                keep_positions = torch.ones(length, dtype=torch.bool)
                keep_positions[visual] = False
                keep_positions[visual[local]] = True
                hidden = hidden[:, keep_positions]
                visual = (keep_positions.cumsum(0) - 1)[visual[local]]
            length = hidden.shape[1]
            positions = torch.arange(length)[None]
            additive = torch.full((length, length), float("-inf")).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=additive, position_embeddings=lm.rotary_emb(hidden, positions))
    return kept_sets


def test_pdrop_kept_sets_equal_plain_reference(tiny_eager, batch):
    model, _ = tiny_eager
    layers, ratios = [1, 2, 3], [0.5, 0.25, 0.125]
    keeps = [int(NUM_VISUAL * r) for r in ratios]
    with finepruner.apply(model, "pdrop", layers=layers, ratios=ratios) as handle, torch.no_grad():
        model(**batch)
    for row in range(3):
        reference = reference_pdrop(model, batch, row, layers, keeps)
        for stage in range(3):
            assert torch.equal(handle.kept[stage][row], reference[stage])


def test_pdrop_budget_mapping_llava_shape():
    from finepruner.methods.pdrop import average_visual_tokens, budget_schedule

    for tokens, keeps in [(192, [312, 156, 78]), (128, [184, 92, 46]), (64, [56, 28, 14])]:
        layers, got = budget_schedule(tokens, 32, 576)
        assert layers == [2, 10, 20] and got == keeps
        assert average_visual_tokens(layers, got, 32, 576) == tokens
    with pytest.raises(ValueError, match="layer average"):
        budget_schedule(30, 32, 576)


def test_fastv_average_budget_matches_spec():
    from finepruner.methods.fastv import average_matched_keep

    assert [average_matched_keep(n, 2, 32, 576) for n in (192, 128, 64)] == [166, 98, 30]
    assert [average_matched_keep(n, 3, 32, 576) for n in (192, 128, 64)] == [152, 82, 11]


def test_random_is_seeded_and_batch_invariant(tiny, batch):
    model, _ = tiny
    runs = []
    for seed in (0, 0, 1):
        with finepruner.apply(model, "random", tokens=10, seed=seed) as handle, torch.no_grad():
            model(**batch)
        runs.append(handle.kept[0])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fastv", {"tokens": 65}, "tokens=65 is not allowed.*1..64"),
        ("fastv", {"tokens": 0}, "1..64"),
        ("fastv", {"K": 0}, "K=0 is out of range; allowed: integers 1..3"),
        ("fastv", {"K": 4}, "K=4 is out of range"),
        ("fastv", {"tokens": 8, "ratio": 0.5}, "not both"),
        ("fastv", {"tokens": 8, "budget": "mean"}, "budget="),
        ("fastv", {"tokens": 10, "budget": "average"}, "cannot be a layer average"),
        ("fastv", {"tokenz": 8}, "unknown parameter.*tokenz.*allowed: tokens, ratio, K, budget, positions"),
        ("fastv", {"tokens": 8, "positions": "shifted"}, "positions='shifted'"),
        ("pdrop", {"layers": [1, 2], "ratios": [0.5]}, "2 layers but 1 ratios"),
        ("pdrop", {"layers": [2, 1]}, "strictly increasing"),
        ("pdrop", {"layers": [1, 4]}, "out of range"),
        ("pdrop", {"ratios": [0.5, 0.7, 0.1]}, "non-increasing"),
        ("random", {"tokens": 100}, "1..64"),
        ("nope", {}, "unknown method .nope.; available: .*fastv"),
        ("vanilla", {"tokens": 8}, "unknown parameter"),
    ],
)
def test_bad_parameters_raise_clear_errors(tiny, name, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, name, **params)
    assert "forward" not in vars(model.model.language_model)


def test_available_methods():
    assert {"vanilla", "random", "fastv", "pdrop"} <= set(finepruner.methods.available())
