"""Head aggregation (spec heads.md §1.3, §2.3) and calibrated heads / heads.json."""

from __future__ import annotations

import json

import pytest
import torch

import finepruner.heads as fh


def make_attn(h: int = 8, n: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sharp = torch.rand(h, 1, generator=g) * 3 + 0.3
    return torch.softmax(torch.randn(h, n, generator=g) * sharp, -1) * (torch.rand(h, 1, generator=g) + 0.1)


# ------------------------------------------------------------------------------------------------------
# aggregate
# ------------------------------------------------------------------------------------------------------


def test_mean_aggregation_and_fastv_equivalence() -> None:
    a = make_attn()
    idx = fh.select(a, "sum", heads=3)
    torch.testing.assert_close(fh.aggregate(a, idx), a[idx].mean(0))
    torch.testing.assert_close(fh.aggregate(a, fh.select(a, "all")), a.mean(0))  # H = all heads = FastV


def test_softmax_weighted_matches_original_formula() -> None:
    a = make_attn().half()
    s = fh.score(a, "variance")
    idx = torch.sort(s, descending=True).indices[:4]  # the original's topk order
    # _simplified.py: weights = softmax(head_scores[idx]); (A[idx] * w[:, None]).sum(0)
    w = torch.softmax(s[idx], dim=0)
    want = (a.float()[idx] * w.unsqueeze(-1)).sum(dim=0)
    got = fh.aggregate(a, idx.sort().values, mode="softmax_weighted", scores=s)
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32


def test_batched_aggregation_with_different_counts() -> None:
    batch = torch.stack([make_attn(seed=s) for s in range(3)])
    heads = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3, 4, 5])]
    out = fh.aggregate(batch, heads)
    assert out.shape == (3, 32)
    for b in range(3):
        torch.testing.assert_close(out[b], batch[b, heads[b]].mean(0))
    scores = torch.randn(3, 8)
    out = fh.aggregate(batch, heads, mode="softmax_weighted", scores=scores)
    for b in range(3):
        w = torch.softmax(scores[b, heads[b]], 0)
        torch.testing.assert_close(out[b], (batch[b, heads[b]] * w[:, None]).sum(0))
    shared = fh.aggregate(batch, torch.tensor([1, 6]))
    torch.testing.assert_close(shared, batch[:, [1, 6]].mean(1))
    selected = fh.select_batch(batch, "sparsity", heads=2)
    torch.testing.assert_close(fh.aggregate(batch, selected)[1], batch[1, selected[1]].mean(0))


def test_aggregate_uses_selection_scores_of_dynamic_selectors() -> None:
    a = make_attn(h=32, n=96)
    d = fh.select_detailed(a, "consensus")
    w = torch.softmax(d.scores[d.indices], 0)
    torch.testing.assert_close(
        fh.aggregate(a, d.indices, "softmax_weighted", scores=d.scores), (a[d.indices] * w[:, None]).sum(0)
    )


def test_aggregate_errors() -> None:
    a = make_attn()
    with pytest.raises(ValueError, match="mode must be one of"):
        fh.aggregate(a, [0], mode="max")
    with pytest.raises(ValueError, match="needs scores"):
        fh.aggregate(a, [0], mode="softmax_weighted")
    with pytest.raises(ValueError, match="duplicate"):
        fh.aggregate(a, [1, 1])
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        fh.aggregate(a, [8])
    with pytest.raises(ValueError, match="at least one"):
        fh.aggregate(a, torch.tensor([], dtype=torch.long))


# ------------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------------


def test_accumulator_mean_scores_and_ranking() -> None:
    samples = [make_attn(seed=s) for s in range(5)]
    acc = fh.HeadStatsAccumulator(num_heads=8, strategy="entropy", num_layers=32, layer=1)
    acc.update(samples[0])
    acc.update(torch.stack(samples[1:]).half())  # batched, fp16
    res = acc.result()
    per_sample = torch.stack(
        [fh.score(samples[0], "entropy")] + [fh.score(s.half(), "entropy") for s in samples[1:]]
    )
    mean = per_sample.double().mean(0)
    assert res.n_samples == 5 and res.num_visual == 32 and res.best == "smallest"
    assert res.scores == pytest.approx(mean.tolist(), rel=1e-6)
    assert res.scores_std == pytest.approx(
        per_sample.double().std(0, unbiased=False).tolist(), rel=1e-4, abs=1e-9
    )
    assert list(res.ranked_heads) == torch.sort(mean, stable=True).indices.tolist()  # low entropy first
    assert res.top(3).tolist() == sorted(res.ranked_heads[:3])


def test_heads_json_round_trip_and_select(tmp_path) -> None:
    acc = fh.HeadStatsAccumulator(8, "top_k_sum", num_layers=32, layer=1, k=4)
    for s in range(3):
        acc.update(make_attn(seed=s))
    res = acc.result()
    path = tmp_path / "heads.json"
    res.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "finepruner-heads" and data["options"] == {"k": 4}
    for field in (
        "num_layers",
        "num_heads",
        "num_visual",
        "layer",
        "strategy",
        "n_samples",
        "scores",
        "ranked_heads",
    ):
        assert field in data
    loaded = fh.load_head_set(path, num_heads=8, layer=1, num_layers=32, num_visual=32)
    assert loaded == res and loaded.source == str(path)
    a = make_attn(seed=9)
    assert fh.select(a, "calibrated", heads=3, head_set=path).tolist() == res.top(3).tolist()
    assert fh.select(a, "calibrated", heads=3, head_set=loaded).tolist() == res.top(3).tolist()


@pytest.mark.parametrize(
    ("field", "kwargs", "message"),
    [
        ("num_heads", {"num_heads": 40}, "'num_heads' is 8 in the file, but the model has 40"),
        ("layer", {"layer": 2}, "'layer' is 1 in the file, but the model has 2"),
        ("num_layers", {"num_layers": 40}, "'num_layers' is 32"),
        ("num_visual", {"num_visual": 2880}, "'num_visual' is 32"),
    ],
)
def test_mismatching_shape_raises_naming_file_and_field(tmp_path, field, kwargs, message) -> None:
    acc = fh.HeadStatsAccumulator(8, "sum", num_layers=32, layer=1)
    acc.update(make_attn())
    path = tmp_path / "heads.json"
    acc.result().save(path)
    with pytest.raises(ValueError, match=message) as err:
        fh.load_head_set(path, **kwargs)
    assert str(path) in str(err.value)


def test_malformed_file_and_wrong_head_count(tmp_path) -> None:
    acc = fh.HeadStatsAccumulator(8, "sum")
    acc.update(make_attn())
    path = tmp_path / "heads.json"
    acc.result().save(path)
    data = json.loads(path.read_text())
    data["ranked_heads"] = [0] * 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json: field 'ranked_heads' must be a permutation"):
        fh.load_head_set(bad)
    with pytest.raises(ValueError, match="field 'num_heads' is 8 in the file"):
        fh.select(make_attn(h=16), "calibrated", heads=2, head_set=path)
    with pytest.raises(ValueError, match="needs head_set"):
        fh.select(make_attn(), "calibrated", heads=2)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="junk.json: not valid JSON"):
        fh.load_head_set(tmp_path / "junk.json")


def test_accumulator_validation() -> None:
    with pytest.raises(ValueError, match="ranking strategy"):
        fh.HeadStatsAccumulator(8, "hierarchical")
    with pytest.raises(ValueError, match="unknown option"):
        fh.HeadStatsAccumulator(8, "sum", k=3)
    acc = fh.HeadStatsAccumulator(8, "sum")
    with pytest.raises(ValueError, match="no samples"):
        acc.result()
    with pytest.raises(ValueError, match="expects 8"):
        acc.update(make_attn(h=4))
    acc.update(make_attn())
    with pytest.raises(ValueError, match="visual tokens"):
        acc.update(make_attn(n=16))
