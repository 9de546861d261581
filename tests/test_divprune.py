"""DivPrune: kept sets against a plain reference of the spec (``methods_more.md`` §3), batches, errors."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.divprune import divprune_select
from tests.conftest import GEN, NUM_VISUAL, PROMPTS, assert_row_equals_alone, assert_same_generation, generate, single


def projected(model, inputs) -> torch.Tensor:
    """[n, V, D] projector outputs from a plain run of the vision side (no hooks)."""
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output


def reference_divprune(features: torch.Tensor, count: int) -> list[int]:
    """§3.1 written plainly for one image: D = 1 - cos (float64 here), the first pick maximises the
    second smallest entry of its column (the smallest being the token itself), then each pick maximises
    the minimum distance to the picks so far (first index on ties)."""
    x = features.double()
    x = x / x.norm(dim=-1, keepdim=True)
    size = x.shape[0]
    dist = (1.0 - x @ x.T).tolist()
    column_second = [sorted(dist[i][j] for i in range(size))[1] for j in range(size)]
    chosen = [max(range(size), key=lambda j: (column_second[j], -j))]
    while len(chosen) < count:
        rest = [j for j in range(size) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(dist[s][j] for s in chosen), -j)))
    assert len(set(chosen)) == count
    return sorted(chosen)


@pytest.mark.parametrize("tokens", [1, 7, 16, 33, 64])
def test_kept_set_equals_plain_reference(tiny, batch, tokens):
    model, _ = tiny
    features = projected(model, batch)
    with finepruner.apply(model, "divprune", tokens=tokens) as handle, torch.no_grad():
        model(**batch)
    assert handle.stats.visual_tokens == [tokens] * 4
    for row in range(3):
        assert handle.kept[0][row].tolist() == reference_divprune(features[row], tokens), (tokens, row)


@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_selection_llava_shape_equals_reference(tokens):
    """576 candidates with clusters of near-duplicates, as projected LLaVA tokens have."""
    generator = torch.Generator().manual_seed(tokens)
    centres = torch.randn(40, 32, generator=generator)
    features = centres[torch.randint(0, 40, (576,), generator=generator)]
    features = features + 0.3 * torch.rand(576, 1, generator=generator) * torch.randn(576, 32, generator=generator)
    kept = divprune_select(features[None], tokens)
    assert kept[0].tolist() == reference_divprune(features, tokens)


def test_exact_duplicates_never_repeat_a_token():
    """All remaining distances 0 (pitfall 3): still ``count`` distinct tokens, first indices first."""
    base = torch.randn(3, 8)
    features = base.repeat_interleave(4, dim=0)[None]  # 12 tokens, 3 distinct vectors
    kept = divprune_select(features, 7)[0].tolist()
    assert len(set(kept)) == 7
    assert {k // 4 for k in kept} == {0, 1, 2}  # the three distinct vectors come first
    half = torch.cat([torch.randn(5, 8), torch.zeros(3, 8)])[None]  # zero vectors: no NaN
    assert len(set(divprune_select(half, 8)[0].tolist())) == 8


def test_default_budget_is_the_official_ratio(tiny, batch):
    model, _ = tiny
    with finepruner.apply(model, "divprune") as handle, torch.no_grad():
        model(**batch)
    assert handle.kept[0].shape == (3, round(0.098 * NUM_VISUAL))
    with finepruner.apply(model, "divprune", subset_ratio=0.25) as handle, torch.no_grad():
        model(**batch)
    assert handle.kept[0].shape == (3, 16)


def test_keep_all_equals_transformers(tiny, batch):
    model, _ = tiny
    reference = generate(model, batch)
    with finepruner.apply(model, "divprune", tokens=NUM_VISUAL) as handle:
        pruned = generate(model, batch)
    assert_same_generation(pruned, reference)
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


def test_padded_batch_equals_each_sample_alone_and_kv_lengths(tiny, batch):
    model, processor = tiny
    new = GEN["max_new_tokens"]
    text = batch["input_ids"].shape[1] - NUM_VISUAL
    with finepruner.apply(model, "divprune", tokens=12) as handle:
        together = generate(model, batch)
        kept = handle.kept[0].clone()
        assert [layer.keys.shape[2] for layer in together.cache.layers] == [text + 12 + new - 1] * 4
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert torch.equal(handle.kept[0][0], kept[row])
            assert_row_equals_alone(alone, together, row)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 65}, "tokens=65 is not allowed.*1..64"),
        ({"tokens": 0}, r"tokens=0 .*allowed: an integer >= 1"),
        ({"subset_ratio": 1.5}, r"subset_ratio=1.5 .*allowed: 0 < subset_ratio <= 1"),
        ({"subset_ratio": 0.0}, "allowed: 0 < subset_ratio <= 1"),
        ({"tokens": 8, "subset_ratio": 0.5}, "tokens or subset_ratio, not both"),
        ({"tokens": 8, "positions": "shifted"}, "positions='shifted'.*allowed"),
        ({"tokens": 8, "K": 2}, "unknown parameter.*allowed: tokens, subset_ratio, positions"),
    ],
)
def test_bad_parameters(tiny, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "divprune", **params)
    assert "forward" not in vars(model.model.language_model)
