"""DART: kept sets against a plain reference of the spec (``methods_more.md`` §2.2), budgets, batches, errors."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.dart import pick_counts
from finepruner.models.tiny import build_tiny_llava
from tests.conftest import (
    GEN,
    IMAGE_TOKEN_ID,
    NUM_VISUAL,
    PROMPTS,
    assert_row_equals_alone,
    assert_same_generation,
    generate,
    single,
)


def reference_dart(model, inputs, K: int, tokens: int, order: str = "ascending", exact: bool = False) -> list[int]:
    """§2.2 written plainly for one unpadded prompt, from an ordinary transformers forward (no engine):
    keys of layer K-1 after RoPE from its KV cache, heads concatenated; hidden = layer K-1's output
    through the final norm. Returns the kept image tokens as indices 0..V-1."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True, output_hidden_states=True)
        keys = out.cache.layers[K - 1].keys[0]  # [kv_heads, L, head_dim]
        keys = keys.transpose(0, 1).reshape(keys.shape[1], -1).double()
        hidden = model.model.language_model.norm(out.hidden_states[K])[0].double()
    ids = inputs["input_ids"][0].tolist()
    image = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID]
    text = list(range(image[-1] + 1, len(ids)))
    norm = [float(keys[i].abs().sum()) for i in range(len(ids))]
    image_pivots = sorted(image, key=lambda i: (-norm[i], i))[:4]
    text_pivots = sorted(text, key=lambda i: (-norm[i], i))[:4]
    pivots = sorted(image_pivots + text_pivots) if order == "ascending" else list(set(image_pivots + text_pivots))
    if exact:
        share, extra = divmod(tokens - 4, 8)
        counts = [share + (p < extra) for p in range(8)]
    else:
        counts = [tokens // 8] * 8
    pool = [i for i in image if i not in image_pivots]
    kept = list(image_pivots)
    for pivot, count in zip(pivots, counts, strict=True):
        cos = {j: float(torch.nn.functional.cosine_similarity(hidden[pivot], hidden[j], dim=0)) for j in pool}
        picks = sorted(pool, key=lambda j: (cos[j], j))[:count]
        kept += picks
        pool = [j for j in pool if j not in picks]
    assert len(set(kept)) == len(kept)
    return sorted(image.index(i) for i in kept)


def test_budget_mapping_llava_shape():
    """N+4 by default (196 / 132 / 68), exactly N with count_pivots_in_budget."""
    for tokens, kept in [(192, 196), (128, 132), (64, 68)]:
        method = finepruner.methods.create("dart", tokens=tokens)
        assert method.plan(32, 576)[0].keep == kept
        assert method.plan(32, 576)[0].layer == 2 and method.plan(32, 576)[0].score_layer == 1
        exact = finepruner.methods.create("dart", tokens=tokens, count_pivots_in_budget=True)
        assert exact.plan(32, 576)[0].keep == tokens
    assert pick_counts(18, 8, 4, True) == [2, 2, 2, 2, 2, 2, 1, 1]
    assert finepruner.methods.create("dart").plan(32, 576)[0].keep == 132  # official default M = 128


@pytest.mark.parametrize(("K", "tokens"), [(1, 8), (2, 16), (2, 40), (3, 56), (2, 5)])
def test_kept_set_equals_plain_reference(tiny, batch, K, tokens):
    """Padded batch through generate (positions from the mask, as each prompt alone) and a plain forward
    of each prompt alone without a cache (keys rotated from k_proj): both equal the reference."""
    model, processor = tiny
    expected = [reference_dart(model, single(processor, row), K, tokens) for row in range(3)]
    assert all(len(kept) == 4 + 8 * (tokens // 8) for kept in expected)
    with finepruner.apply(model, "dart", tokens=tokens, K=K) as handle:
        generate(model, batch, max_new_tokens=1)
        together = handle.kept[0].clone()
        for row in range(3):
            assert together[row].tolist() == expected[row], (K, tokens, row)
            with torch.no_grad():
                model(**single(processor, row), use_cache=False)
            assert handle.kept[0][0].tolist() == expected[row]


@pytest.mark.parametrize(("order", "exact", "tokens"), [("set", False, 24), ("ascending", True, 18), ("set", True, 30)])
def test_options_equal_reference(tiny, order, exact, tokens):
    model, processor = tiny
    params = {"tokens": tokens, "pivot_order": order, "count_pivots_in_budget": exact}
    for row in range(3):
        inputs = single(processor, row)
        expected = reference_dart(model, inputs, 2, tokens, order, exact)
        with finepruner.apply(model, "dart", **params) as handle, torch.no_grad():
            model(**inputs)
        assert handle.kept[0][0].tolist() == expected, (params, row)


def test_grouped_query_attention_keys_equal_reference():
    """Fewer key/value heads than query heads: the cached keys (kv heads concatenated) are the signal."""
    model, processor = build_tiny_llava(seed=2, qk_scale=8.0, attn_implementation="sdpa", text_kv_heads=2)
    expected = [reference_dart(model, single(processor, row), 2, 24) for row in range(3)]
    with finepruner.apply(model, "dart", tokens=24) as handle, torch.no_grad():
        for row in range(3):
            model(**single(processor, row))
            assert handle.kept[0][0].tolist() == expected[row]


def test_pivot_order_matters(tiny):
    """CPython's set order of the pivots is not ascending here, and the kept sets differ."""
    model, processor = tiny
    kept = {}
    for order in ("ascending", "set"):
        with finepruner.apply(model, "dart", tokens=40, pivot_order=order) as handle, torch.no_grad():
            model(**single(processor, 1))
        kept[order] = handle.kept[0][0].tolist()
    assert kept["ascending"] != kept["set"]


def test_keep_all_equals_transformers(tiny, batch):
    model, _ = tiny
    reference = generate(model, batch)
    with finepruner.apply(model, "dart", tokens=NUM_VISUAL, count_pivots_in_budget=True) as handle:
        pruned = generate(model, batch)
    assert_same_generation(pruned, reference)
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_padded_batch_equals_each_sample_alone_and_kv_lengths(tiny, batch, positions):
    model, processor = tiny
    new = GEN["max_new_tokens"]
    length = batch["input_ids"].shape[1]
    kept_count = 4 + 8 * (16 // 8)
    with finepruner.apply(model, "dart", tokens=16, positions=positions) as handle:
        together = generate(model, batch)
        kept = handle.kept[0].clone()
        lengths = [layer.keys.shape[2] for layer in together.cache.layers]
        assert lengths == [length + new - 1] * 2 + [length - NUM_VISUAL + kept_count + new - 1] * 2
        assert handle.stats.visual_tokens == [NUM_VISUAL, NUM_VISUAL, kept_count, kept_count]
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert torch.equal(handle.kept[0][0], kept[row])
            assert_row_equals_alone(alone, together, row)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 64}, r"keeps 68 image tokens .* 64 visual tokens .*allowed tokens: 1..63"),
        ({"tokens": 65, "count_pivots_in_budget": True}, "allowed tokens: 4..64"),
        ({"tokens": 3, "count_pivots_in_budget": True}, "must be >= pivot_image_tokens"),
        ({"tokens": 0}, r"tokens=0; allowed: an integer >= 1"),
        ({"K": 0}, "K=0 is out of range; allowed: integers 1..3"),
        ({"K": 4}, "allowed: integers 1..3"),
        ({"tokens": 16, "pivot_order": "python"}, r"pivot_order='python'; allowed: \('ascending', 'set'\)"),
        ({"pivot_image_tokens": 0, "pivot_text_tokens": 0}, "must be >= 1"),
        ({"pivot_text_tokens": -1}, "pivot_text_tokens=-1; allowed: an integer >= 0"),
        ({"count_pivots_in_budget": "yes"}, "allowed: True, False"),
        ({"tokens": 16, "positions": "shifted"}, "positions='shifted'"),
    ],
)
def test_bad_parameters(tiny, params, message):
    model, _ = tiny
    params = {"tokens": 16, **params}
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "dart", **params)
    assert "forward" not in vars(model.model.language_model)


def test_too_few_text_tokens_is_a_clear_error(tiny):
    model, processor = tiny
    inputs = single(processor, 0)
    with finepruner.apply(model, "dart", tokens=16, pivot_text_tokens=40), torch.no_grad():
        with pytest.raises(ValueError, match="pivot_text_tokens=40 but a prompt has only"):
            model(**inputs)
