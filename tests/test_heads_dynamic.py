"""Dynamic head selection (spec heads.md §4.2 resource-aware, §4.3 consensus) with the documented fixes."""

from __future__ import annotations

import pytest
import torch

import finepruner.heads as fh
from finepruner.heads import dynamic


def random_maps(count: int, h: int = 32, n: int = 96, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sharp = torch.rand(h, 1, generator=g) * 4 + 0.2
        mass = torch.rand(h, 1, generator=g) * 0.8 + 0.05
        out.append(torch.softmax(torch.randn(h, n, generator=g) * sharp, -1) * mass)
    return out


def test_budget_regime_matches_original_cutoffs_at_576() -> None:
    assert [fh.budget_regime(576, t, None) for t in (192, 128, 64)] == ["high", "mid", "low"]
    assert [fh.budget_regime(576, None, r) for r in (166, 98, 30)] == ["high", "mid", "low"]
    assert fh.budget_regime(576, None, 165) == "mid" and fh.budget_regime(576, None, 97) == "low"
    # 7b with K=3 keeps R=152 for T=192: the original R rule calls it "mid"; the budget classifies it "high".
    assert fh.budget_regime(576, None, 152) == "mid"
    assert fh.budget_regime(576, 192, 152) == "high"  # budget takes precedence
    assert fh.budget_regime(288, 96, None) == "high"  # fractions of N
    with pytest.raises(ValueError, match="budget=T and/or kept_tokens=R"):
        fh.select(random_maps(1)[0], "dynamic")
    with pytest.raises(ValueError, match="kept_tokens must be an int"):
        fh.select(random_maps(1)[0], "dynamic", kept_tokens=0)


def test_head_count_rules_by_hand() -> None:
    s = torch.tensor([10.0, 9.0, 8.0, 2.0, 1.5, 1.0, 0.5, 0.0])
    # gaps 1,1,6,.5,.5,.5,.5: mean 1.4286, std 2.0702 -> threshold 3.085 -> first gap index 2 -> 3 heads
    # threshold rule: mean 4.0, std 4.243 -> s > 2.727 -> 3 heads
    # cumulative rule on s - min: shares .3125,.28125,.25,... cum <= .85 -> 3 entries + 1 = 4
    got = dynamic.head_count(s, (1, 8))
    assert (got["gap"], got["threshold"], got["cumulative"], got["count"]) == (3, 3, 4, 3)
    assert dynamic.head_count(s, (5, 8))["count"] == 5  # clamped to the preferred range
    # no significant gap -> the range maximum, as in the original
    assert dynamic.head_count(torch.arange(8.0).flip(0), (2, 6))["gap"] == 6


def test_cumulative_rule_is_offset_free() -> None:
    s = torch.tensor([10.0, 9.0, 8.0, 2.0, 1.5, 1.0, 0.5, 0.0])
    assert dynamic.head_count(s + 100, (1, 8)) == dynamic.head_count(s, (1, 8))


def test_combination_quality_is_scale_free_but_original_is_not() -> None:
    a = random_maps(1, h=16)[0]
    s = fh.score(a, "sparsity")
    sel = torch.tensor([0, 3, 5, 7])
    ours, orig = dynamic.combination_quality(a, s, sel)
    ours_big, orig_big = dynamic.combination_quality(a, s * 1e4, sel)
    assert ours == pytest.approx(ours_big, rel=1e-5)
    assert orig_big > orig + 1  # the original term grows with the score units (spec §4.2)
    assert 0 <= ours <= 1


def test_strategy_quality_is_scale_free_but_original_is_not() -> None:
    a = random_maps(1, h=16)[0]
    s = dynamic.component_scores(a, "hierarchical", original=False)
    ours, orig = dynamic.strategy_quality(s, a)
    ours_big, orig_big = dynamic.strategy_quality(s * 1000, a)
    assert ours == pytest.approx(ours_big, rel=1e-5) and 0 <= ours <= 1
    assert orig_big != pytest.approx(orig, rel=1e-3)


@pytest.mark.parametrize("budget", [192, 128, 64])
@pytest.mark.parametrize("bounds", [(1, None), (4, 10), (12, 12), (20, 32)])
def test_dynamic_counts_within_bounds(budget: int, bounds: tuple[int, int | None]) -> None:
    lo, hi = bounds
    for a in random_maps(3, n=576, seed=budget):
        d = fh.select_detailed(a, "dynamic", budget=budget, min_heads=lo, max_heads=hi)
        top = 32 if hi is None else hi
        assert lo <= d.num_heads <= top
        assert d.info["num_heads"] == d.num_heads == d.indices.numel()
        regime_candidates = dynamic._REGIMES[d.info["regime"]][0]
        assert d.info["strategy"] in regime_candidates
        assert set(d.info["candidates"]) == set(regime_candidates)
        assert torch.equal(d.indices, d.indices.sort().values) and d.indices.unique().numel() == d.num_heads
        # the winner's heads are its top-count heads
        s = d.scores
        assert set(d.indices.tolist()) == set(
            torch.sort(s, descending=True, stable=True).indices[: d.num_heads].tolist()
        )


def test_dynamic_heads_is_an_upper_bound_and_preferred_range_scales() -> None:
    a = random_maps(1)[0]
    assert fh.select(a, "dynamic", heads=5, budget=32).numel() <= 5
    small = random_maps(1, h=8)[0]
    d = fh.select_detailed(small, "dynamic", budget=192 / 576 * 96)
    assert d.info["preferred_range"] == (4, 6)  # (14, 26) scaled by 8/32, rounded
    assert 4 <= d.num_heads <= 6
    with pytest.raises(ValueError, match="min_heads <= max_heads"):
        fh.select(a, "dynamic", budget=64, min_heads=10, max_heads=5)


def test_dynamic_original_definitions_and_determinism() -> None:
    a = random_maps(1, n=576)[0]
    d1 = fh.select_detailed(a, "dynamic", budget=64, definitions="original")
    d2 = fh.select_detailed(a, "dynamic", budget=64, definitions="original")
    assert torch.equal(d1.indices, d2.indices) and 1 <= d1.num_heads <= 32


@pytest.mark.parametrize("bounds", [(1, None), (3, 8), (10, 10), (20, 30)])
def test_consensus_counts_within_bounds(bounds: tuple[int, int | None]) -> None:
    lo, hi = bounds
    for a in random_maps(3, seed=lo):
        d = fh.select_detailed(a, "consensus", min_heads=lo, max_heads=hi)
        assert lo <= d.num_heads <= (32 if hi is None else hi)
        cons, div = d.info["consensus"], d.info["diversity"]
        assert len(cons) + len(div) == d.num_heads == d.info["target"]
        assert not set(cons) & set(div)
        assert sorted(cons + div) == d.indices.tolist()
        assert torch.isfinite(d.scores[d.indices]).all()  # head-weight logits for the selected heads


def test_consensus_diversity_fill_runs_when_consensus_is_short() -> None:
    a = random_maps(1, seed=11)[0]
    d = fh.select_detailed(a, "consensus", min_heads=30)
    assert d.num_heads == 30 and len(d.info["diversity"]) > 0
    for h in d.info["diversity"]:  # diversity logits: 0.8 + 0.4 * mass / max mass
        mass = a.sum(-1)
        assert float(d.scores[h]) == pytest.approx(0.8 + 0.4 * float(mass[h] / mass.max()), rel=1e-5)


def test_farthest_point_fallback_uses_max_similarity() -> None:
    # h0 has the largest mass; h1 is a near-copy of h0; h2 is orthogonal to h0; h3 is half-way.
    a = torch.tensor(
        [[1.0, 0.0, 0.0], [0.9, 0.09, 0.0], [0.0, 0.0, 0.5], [0.3, 0.0, 0.3]],
    )
    # after {0, 2}: the original "1 - min similarity" would take the near-copy h1; the fix takes h3
    assert dynamic._diversity_fill(a, [], 3) == [0, 2, 3]


def test_consensus_strategies_option() -> None:
    a = random_maps(1)[0]
    d = fh.select_detailed(a, "consensus", strategies=("sum", "max_attention"))
    assert set(d.info["quality"]) == {"sum", "max_attention"}
    with pytest.raises(ValueError, match="strategies must be distinct names"):
        fh.select(a, "consensus", strategies=("sum", "bogus"))
    with pytest.raises(ValueError, match="unknown option"):
        fh.select(a, "consensus", budget=64)
