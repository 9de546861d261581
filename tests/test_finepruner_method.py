"""The head-guided ``finepruner`` method (and head selection in PDrop) against plain references."""

from __future__ import annotations

import json

import pytest
import torch

import finepruner
from finepruner import heads as head_lib

NUM_VISUAL = 64


@pytest.fixture(scope="module")
def eager_rows(tiny_eager, batch):
    """Per layer: eager attention of the last prompt token to the visual tokens, [B, H, V]."""
    model, _ = tiny_eager
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    visual = torch.stack([(row == 4).nonzero()[:, 0] for row in batch["input_ids"]])
    return [a[:, :, -1, :].gather(2, visual[:, None, :].expand(-1, a.shape[1], -1)) for a in out.attentions]


def run(model, batch, name, **params):
    with finepruner.apply(model, name, **params) as handle, torch.no_grad():
        logits = model(**batch).logits
    return handle, logits


def test_all_heads_equals_fastv_exactly(tiny, batch):
    model, _ = tiny
    fastv, fastv_logits = run(model, batch, "fastv", tokens=16)
    head, head_logits = run(model, batch, "finepruner", tokens=16, strategy="all")
    assert torch.equal(fastv.kept[0], head.kept[0])
    assert torch.equal(fastv_logits, head_logits)


@pytest.mark.parametrize(
    ("strategy", "heads", "options"),
    [
        ("sum", 2, {}),
        ("sparsity", 1, {}),
        ("entropy", 3, {}),
        ("max_attention", 2, {"definitions": "original"}),
        ("top_k_sum", 2, {"options": {"k": 5}}),
        ("hierarchical", 2, {}),
    ],
)
def test_kept_set_equals_reference(tiny, batch, eager_rows, strategy, heads, options):
    model, _ = tiny
    K, tokens = 2, 12
    handle, _ = run(model, batch, "finepruner", tokens=tokens, K=K, strategy=strategy, heads=heads, **options)
    strategy_options = dict(options.get("options", {}))
    if "definitions" in options:
        strategy_options["definitions"] = options["definitions"]
    for row in range(3):
        attn = eager_rows[K - 1][row]
        chosen = head_lib.select(attn, strategy, heads=heads, **strategy_options)
        reference = attn[chosen].mean(0).topk(tokens).indices.sort().values
        assert torch.equal(handle.heads[0][row], chosen)
        assert torch.equal(handle.kept[0][row], reference)


def test_softmax_weighted_aggregation(tiny, batch, eager_rows):
    model, _ = tiny
    handle, _ = run(model, batch, "finepruner", tokens=10, strategy="variance", heads=3,
                    aggregation="softmax_weighted")
    for row in range(3):
        attn = eager_rows[1][row]
        scores = head_lib.score(attn, "variance")
        chosen = handle.heads[0][row]
        weights = scores[chosen].softmax(0)
        reference = (weights[:, None] * attn[chosen]).sum(0).topk(10).indices.sort().values
        assert torch.equal(handle.kept[0][row], reference)


def test_random_heads_deterministic_per_seed(tiny, batch):
    model, _ = tiny
    first, _ = run(model, batch, "finepruner", tokens=10, strategy="random", heads=2, seed=3)
    second, _ = run(model, batch, "finepruner", tokens=10, strategy="random", heads=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.heads[0], second.heads[0], strict=True))


def test_dynamic_head_counts_within_bounds(tiny, batch):
    model, _ = tiny
    handle, _ = run(model, batch, "finepruner", tokens=10, strategy="dynamic",
                    options={"min_heads": 2, "max_heads": 3})
    counts = [len(h) for h in handle.heads[0]]
    assert all(2 <= c <= 3 for c in counts)
    consensus, _ = run(model, batch, "finepruner", tokens=10, strategy="consensus", heads=3)
    assert all(1 <= len(h) <= 3 for h in consensus.heads[0])


def test_calibrated_head_set_round_trip(tiny, batch, eager_rows, tmp_path):
    model, _ = tiny
    accumulator = head_lib.HeadStatsAccumulator(4, "sum", num_visual=NUM_VISUAL, num_layers=4, layer=1)
    accumulator.update(eager_rows[1])
    path = tmp_path / "heads.json"
    accumulator.result().save(path)
    handle, _ = run(model, batch, "finepruner", tokens=10, heads=2, heads_from=str(path))
    fixed = head_lib.load_head_set(path).top(2)
    assert all(torch.equal(h, fixed) for h in handle.heads[0])
    for row in range(3):
        reference = eager_rows[1][row][fixed].mean(0).topk(10).indices.sort().values
        assert torch.equal(handle.kept[0][row], reference)
    data = json.loads(path.read_text())
    data["num_heads"] = 8
    data["scores"] = data["scores"] * 2
    data["scores_std"] = data["scores_std"] * 2
    data["ranked_heads"] = list(range(8))
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_heads"):
        finepruner.apply(model, "finepruner", tokens=10, heads=2, heads_from=str(bad))


def test_pdrop_with_selected_heads(tiny, batch):
    model, _ = tiny
    plain, _ = run(model, batch, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125])
    every, _ = run(model, batch, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125], strategy="all")
    assert all(torch.equal(a, b) for a, b in zip(plain.kept, every.kept, strict=True))
    guided, _ = run(model, batch, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125], strategy="sum", heads=1)
    assert len(guided.heads) == 3 and all(len(h[0]) == 1 for h in guided.heads)


def test_alias_and_listing():
    assert "finepruner" in finepruner.methods.available()
    assert finepruner.methods.get("fastv+finepruner") is finepruner.methods.get("finepruner")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 8, "heads": 5}, "heads=5 is not allowed; this model has 4 heads"),
        ({"tokens": 8, "heads": 2, "strategy": "loudest"}, "unknown head-selection strategy 'loudest'"),
        ({"tokens": 8, "strategy": "sparsity"}, "needs heads=H"),
        ({"tokens": 8, "heads": 2, "aggregation": "max"}, "aggregation='max'"),
        ({"tokens": 8, "heads": 2, "options": {"kk": 1}}, "unknown option"),
    ],
)
def test_bad_input(tiny, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "finepruner", **params)


def test_attention_rows_exported_for_plots(tiny, batch, eager_rows):
    model, _ = tiny
    handle, _ = run(model, batch, "finepruner", tokens=10, strategy="sum", heads=2)
    assert handle.attention[0].shape == (3, 4, NUM_VISUAL)
    assert (handle.attention[0] - eager_rows[1]).abs().max().item() <= 1e-5
