"""finepruner.heads ranking strategies, controls and the public API (spec heads.md §3, docs/heads.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import finepruner.heads as fh

RANKINGS = (
    "sum",
    "variance",
    "entropy",
    "max_attention",
    "attention_range",
    "sparsity",
    "top_k_sum",
    "weighted_quality",
    "gini_coefficient",
    "multi_objective",
    "graph_based",
)


def make_attn(h: int = 8, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Heads with clearly different sharpness and visual mass (post-softmax-like, rows sum to < 1)."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.3, 3.0, h)[torch.randperm(h, generator=g)]
    mass = torch.linspace(0.2, 0.9, h)[torch.randperm(h, generator=g)]
    logits = torch.randn(h, n, generator=g) * sharp[:, None]
    return torch.softmax(logits, dim=-1) * mass[:, None]


# ------------------------------------------------------------------------------------------------------
# Plain re-statements (numpy float64, loops) of our definitions on Q = A / sum A
# ------------------------------------------------------------------------------------------------------


def ref_ours(a: np.ndarray, name: str) -> np.ndarray:
    h, n = a.shape
    q = a / a.sum(axis=1, keepdims=True)
    out = np.zeros(h)
    for i in range(h):
        row, qi = a[i], q[i]
        if name == "sum":
            out[i] = row.sum()
        elif name == "variance":
            out[i] = row.var(ddof=1)
        elif name == "max_attention":
            out[i] = row.max()
        elif name == "attention_range":
            out[i] = row.max() - row.min()
        elif name == "top_k_sum":
            out[i] = np.sort(row)[::-1][:10].sum()
        elif name == "entropy":
            out[i] = -sum(x * math.log(x) for x in qi if x > 0)
        elif name == "sparsity":
            out[i] = (qi**2).sum()
        elif name == "weighted_quality":
            c = (qi > 0.01).sum()
            out[i] = 0.4 * qi.max() + 0.4 * (qi**2).sum() + 0.2 * (1.0 / c if c else 0.0)
        elif name == "gini_coefficient":
            xs = np.sort(qi)
            out[i] = sum((2 * (j + 1) - n - 1) * xs[j] for j in range(n)) / (n * xs.sum())
    return out


def mm(x: np.ndarray) -> np.ndarray:
    r = x.max() - x.min()
    return (x - x.min()) / r if r > 0 else np.zeros_like(x)


@pytest.mark.parametrize(
    "name",
    [
        "sum",
        "variance",
        "max_attention",
        "attention_range",
        "top_k_sum",
        "entropy",
        "sparsity",
        "weighted_quality",
        "gini_coefficient",
    ],
)
def test_simple_rankings_match_plain_restatement(name: str) -> None:
    a = make_attn()
    got = fh.score(a, name)
    assert got.dtype == torch.float32 and got.shape == (8,)
    want = ref_ours(a.double().numpy(), name)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)
    best = fh.strategy_info(name).best
    order = np.argsort(-want if best == "largest" else want, kind="stable")
    assert fh.select(a, name, heads=3).tolist() == sorted(order[:3].tolist())


def test_gini_equals_gini_of_raw_attention() -> None:
    a = make_attn()
    x = a.double().numpy()
    n = x.shape[1]
    raw = [sum((2 * (j + 1) - n - 1) * v for j, v in enumerate(np.sort(r))) / (n * r.sum()) for r in x]
    np.testing.assert_allclose(fh.score(a, "gini_coefficient").numpy(), raw, rtol=1e-4)


def test_multi_objective_and_graph_match_restatement() -> None:
    a = make_attn()
    x = a.double().numpy()
    q = x / x.sum(1, keepdims=True)
    h, n = q.shape
    ent = np.array([-(r * np.log(r)).sum() for r in q])
    kurt = np.array([((r - r.mean()) ** 4).mean() / ((r - r.mean()) ** 2).mean() ** 2 for r in q])
    z = q / np.linalg.norm(q, axis=1, keepdims=True)
    cos = z @ z.T
    avg = np.array([(cos[i].sum() - cos[i, i]) / (h - 1) for i in range(h)])
    sq = (q**2).sum(1)
    want = 0.4 * (0.7 * mm(ent) + 0.3 * mm(kurt)) + 0.3 * mm(1 / (avg + 1e-8)) + 0.3 * mm(sq)
    np.testing.assert_allclose(fh.score(a, "multi_objective").numpy(), want, atol=1e-4)

    feats = np.stack([sq, ent, q.max(1), q.var(1, ddof=1), (q > q.mean(1, keepdims=True)).mean(1)], 1)
    adj = (cos > 0.1).astype(float)
    np.fill_diagonal(adj, 0)
    adj = adj / (adj.sum(1, keepdims=True) + 1e-8)
    f1 = np.maximum(feats + adj @ feats, 0)
    f2 = np.maximum(f1 + adj @ f1, 0)
    np.testing.assert_allclose(fh.score(a, "graph_based").numpy(), f2.mean(1), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# definitions="original": a plain re-statement of ablation_a's double-softmax formulas (float32)
# ------------------------------------------------------------------------------------------------------


def original_scores(a: torch.Tensor, name: str) -> torch.Tensor:
    """ablation_a (b9395b7) formulas, written out per head, in float32."""
    h, n = a.shape
    p = torch.softmax(a, dim=-1)
    ent = torch.stack([-(p[i] * torch.log(p[i] + 1e-8)).sum() for i in range(h)])
    if name == "entropy":
        return ent
    if name == "sparsity":
        return torch.stack([(p[i] ** 2).sum() for i in range(h)])
    if name == "weighted_quality":
        return torch.stack(
            [
                0.4 * p[i].max() + 0.4 * (p[i] ** 2).sum() + 0.2 / ((p[i] > 0.01).sum().float() + 1e-8)
                for i in range(h)
            ]
        )
    if name == "gini_coefficient":
        out = []
        for i in range(h):
            xs = p[i].sort().values
            idx = torch.arange(1, n + 1).float()
            out.append(((2 * idx - n - 1) * xs).sum() / (n * xs.sum()))
        return torch.stack(out)

    def omm(x: torch.Tensor) -> torch.Tensor:
        return (x - x.min()) / (x.max() - x.min() + 1e-8)

    z = torch.nn.functional.normalize(p, dim=-1)
    sim = z @ z.T
    if name == "multi_objective":
        mean = p.mean(-1, keepdim=True)
        var = ((p - mean) ** 2).mean(-1)
        kurt = ((p - mean) ** 4).mean(-1) / (var**2 + 1e-8)
        div = 1 / ((sim.sum(-1) - 1) / (h - 1) + 1e-8)
        return 0.4 * (0.7 * omm(ent) + 0.3 * omm(kurt)) + 0.3 * omm(div) + 0.3 * omm((p**2).sum(-1))
    if name == "graph_based":
        f = torch.stack(
            [
                (p**2).sum(-1),
                ent,
                p.max(-1).values,
                p.var(-1),
                (p > p.mean(-1, keepdim=True)).float().mean(-1),
            ],
            -1,
        )
        adj = (sim > 0.1).float()
        adj.fill_diagonal_(0)
        adj = adj / (adj.sum(-1, keepdim=True) + 1e-8)
        f1 = torch.relu(f + adj @ f)
        return torch.relu(f1 + adj @ f1).mean(-1)
    raise KeyError(name)


@pytest.mark.parametrize(
    "name", ["entropy", "sparsity", "weighted_quality", "gini_coefficient", "multi_objective", "graph_based"]
)
def test_original_definitions_match_restatement(name: str) -> None:
    a = make_attn(n=96, seed=3) * 30  # larger values so the double softmax still separates heads in fp32
    got = fh.score(a, name, definitions="original")
    want = original_scores(a, name)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    best = fh.strategy_info(name).best
    order = torch.sort(want, descending=best == "largest", stable=True).indices
    assert fh.select(a, name, heads=4, definitions="original").tolist() == sorted(order[:4].tolist())


@pytest.mark.parametrize("name", ["sum", "variance", "max_attention", "attention_range", "top_k_sum"])
def test_raw_strategies_identical_under_both_definitions(name: str) -> None:
    a = make_attn()
    torch.testing.assert_close(fh.score(a, name), fh.score(a, name, definitions="original"))


def test_original_weighted_quality_is_degenerate_but_ours_is_not() -> None:
    # Spec §3.1 item 4: no double-softmax probability exceeds 0.01, so 1/(0 + 1e-8) swamps everything.
    a = make_attn(n=576)
    assert torch.all(fh.score(a, "weighted_quality", definitions="original") > 1e7)
    assert torch.all(fh.score(a, "weighted_quality") < 2)


# ------------------------------------------------------------------------------------------------------
# fp16 inputs, ties, uniform rows, single head
# ------------------------------------------------------------------------------------------------------


def test_fp16_input_is_upcast_before_statistics() -> None:
    a16 = make_attn(n=576).half()
    for name in RANKINGS:
        torch.testing.assert_close(fh.score(a16, name), fh.score(a16.float(), name))
        assert fh.score(a16, name).dtype == torch.float32


def test_fp16_original_pipeline_ties_but_ours_separates() -> None:
    g = torch.Generator().manual_seed(0)
    sharp = torch.tensor([0.5, 1.0, 2.0, 3.0])
    a16 = (torch.softmax(torch.randn(4, 576, generator=g) * sharp[:, None], -1) * 0.4).half()
    # The original pipeline: softmax and entropy in fp16 -> one distinct value for every head (spec §3.1).
    p16 = torch.softmax(a16, dim=-1)
    ent16 = -(p16 * torch.log(p16 + 1e-8)).sum(-1)
    assert ent16.dtype == torch.float16 and ent16.unique().numel() == 1
    ours = fh.score(a16, "entropy")
    assert ours.unique().numel() == 4
    assert fh.select(a16, "entropy", heads=1).tolist() == [3]  # the sharpest head is the most focused
    assert fh.score(a16, "entropy", definitions="original").unique().numel() == 4  # fp32 also separates


def test_ties_break_to_lowest_head_index() -> None:
    row = torch.softmax(torch.linspace(0, 2, 16), 0) * 0.5
    a = torch.stack([row * 0.5, row, row, row * 0.5, row])  # heads 1, 2, 4 identical and best by mass
    assert fh.select(a, "sum", heads=2).tolist() == [1, 2]
    assert fh.select_detailed(a, "sum", heads=3).ranked.tolist() == [1, 2, 4]
    # smallest-is-best: renormalised rows are identical, so all entropies tie
    assert fh.select(a, "entropy", heads=2).tolist() == [0, 1]
    assert fh.select(a, "hierarchical", heads=2, version="fixed").tolist() == [0, 1]


@pytest.mark.parametrize("name", RANKINGS)
def test_uniform_rows_tie_everywhere(name: str) -> None:
    a = torch.full((6, 32), 1 / 64)
    s = fh.score(a, name)
    assert torch.isfinite(s).all()
    assert s.unique().numel() == 1
    assert fh.select(a, name, heads=3).tolist() == [0, 1, 2]


def test_uniform_row_entropy_is_log_n_and_zero_row_is_handled() -> None:
    a = torch.zeros(2, 16)
    a[0] = 1 / 16
    s = fh.score(a, "entropy")  # the all-zero row is treated as uniform
    torch.testing.assert_close(s, torch.full((2,), math.log(16)))


@pytest.mark.parametrize("name", [*RANKINGS, "hierarchical", "all", "random", "dynamic", "consensus"])
def test_single_head_input(name: str) -> None:
    a = torch.rand(1, 10)
    opts = {"budget": 3} if name == "dynamic" else {}
    heads = None if name in ("all", "dynamic", "consensus") else 1
    assert fh.select(a, name, heads=heads, **opts).tolist() == [0]


# ------------------------------------------------------------------------------------------------------
# hierarchical (published b9395b7 and fixed 1b06659) against a plain re-statement
# ------------------------------------------------------------------------------------------------------


def hierarchical_reference(a: torch.Tensor, H: int, version: str) -> list[int]:
    """Re-statement of the two original versions on P = softmax(A) in float32."""
    p = torch.softmax(a, -1)
    nh, n = p.shape

    def ent(x: torch.Tensor) -> torch.Tensor:
        return -(x * torch.log(x + 1e-8)).sum(-1)

    def mm_pub(x: torch.Tensor) -> torch.Tensor:
        return (x - x.min()) / (x.max() - x.min() + 1e-8)

    def mm_fix(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) if x.max() == x.min() else (x - x.min()) / (x.max() - x.min())

    mmf = mm_pub if version == "published" else mm_fix
    if version == "fixed" and (nh <= H or nh <= 8):
        s = 0.5 * (p**2).sum(-1) + 0.3 * p.max(-1).values + 0.2 * p.var(-1)
        return sorted(torch.sort(s, descending=True, stable=True).indices[:H].tolist())
    k = min(nh, max(2 * H, 16)) if version == "published" else min(nh, max(2 * H, H + 4))
    coarse = 0.6 * (p**2).sum(-1) + 0.4 * (1 - mmf(ent(p)))
    ci = torch.sort(torch.sort(coarse, descending=True, stable=True).indices[:k]).values
    cp = p[ci]
    if version == "published":
        kl = torch.nn.functional.kl_div(torch.log(cp + 1e-8), torch.ones_like(cp) / n, reduction="none").sum(
            -1
        )
        div = torch.cdist(cp, cp).mean(-1)
    else:
        kl = (cp * torch.log(cp / (1 / n + 1e-8) + 1e-8)).sum(-1)
        z = torch.nn.functional.normalize(cp, dim=-1)
        div = torch.norm(z - z.mean(0, keepdim=True), dim=-1)
    stab = 1 / (cp.std(-1) + 1e-8)
    fine = 0.3 * mmf(ent(cp)) + 0.25 * mmf(kl) + 0.25 * mmf(div) + 0.2 * mmf(stab)
    return sorted(ci[torch.sort(fine, descending=True, stable=True).indices[:H]].tolist())


@pytest.mark.parametrize("version", ["published", "fixed"])
@pytest.mark.parametrize("H", [2, 4, 8, 10])
def test_hierarchical_original_matches_restatement(version: str, H: int) -> None:
    a = make_attn(h=24, n=64, seed=H) * 30
    got = fh.select(a, "hierarchical", heads=H, version=version, definitions="original")
    assert got.tolist() == hierarchical_reference(a, H, version)
    assert got.numel() == H


def test_hierarchical_versions_and_small_head_count() -> None:
    a = make_attn(h=8)
    # fixed version: 8 heads total -> single-stage score
    d = fh.select_detailed(a, "hierarchical", heads=3, version="fixed")
    assert d.info["stage"] == "single" and d.num_heads == 3
    assert fh.select(a, "hierarchical", heads=8).tolist() == list(range(8))
    with pytest.raises(ValueError, match="version"):
        fh.select(a, "hierarchical", heads=3, version="v2")


# ------------------------------------------------------------------------------------------------------
# Controls and API contract
# ------------------------------------------------------------------------------------------------------


def test_all_returns_every_head() -> None:
    a = make_attn()
    assert fh.select(a, "all").tolist() == list(range(8))
    assert fh.select(a, "all", heads=8).tolist() == list(range(8))


def test_random_is_deterministic_per_seed_and_leaves_global_rng_alone() -> None:
    a = make_attn(h=32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    x = fh.select(a, "random", heads=10, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(x, fh.select(a, "random", heads=10, seed=7))
    assert not torch.equal(x, fh.select(a, "random", heads=10, seed=8))
    assert x.dtype == torch.long and x.numel() == 10 and x.unique().numel() == 10
    assert torch.equal(x, x.sort().values)


def test_select_returns_sorted_long_and_batch_matches_single() -> None:
    g = torch.Generator().manual_seed(5)
    batch = torch.stack([make_attn(seed=s) for s in range(3)]) + 1e-4 * torch.rand(3, 8, 64, generator=g)
    for name in [*RANKINGS, "hierarchical", "random", "all", "dynamic", "consensus"]:
        opts = {"budget": 20} if name == "dynamic" else {}
        heads = None if name in ("all", "dynamic", "consensus") else 3
        out = fh.select_batch(batch, name, heads=heads, **opts)
        assert len(out) == 3
        for b in range(3):
            single = fh.select(batch[b], name, heads=heads, **opts)
            assert single.dtype == torch.long and torch.equal(single, single.sort().values)
            assert torch.equal(out[b], single), name


def test_strategies_lists_every_name_and_kinds() -> None:
    names = fh.strategies()
    for name in [*RANKINGS, "hierarchical", "dynamic", "consensus", "all", "random", "calibrated"]:
        assert name in names
    assert set(fh.strategies("ranking")) == set(RANKINGS)
    assert fh.strategy_info("entropy").best == "smallest"
    assert all(fh.strategy_info(n).best == "largest" for n in RANKINGS if n != "entropy")


def test_errors_say_what_is_allowed() -> None:
    a = make_attn()
    with pytest.raises(ValueError, match="allowed: sum"):
        fh.select(a, "nope", heads=2)
    with pytest.raises(ValueError, match="1 <= heads <= num_heads=8"):
        fh.select(a, "sum", heads=0)
    with pytest.raises(ValueError, match="num_heads=8"):
        fh.select(a, "sum", heads=9)
    with pytest.raises(ValueError, match="needs heads"):
        fh.select(a, "variance")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kk'\]; allowed: k, definitions"):
        fh.select(a, "top_k_sum", heads=2, kk=3)
    with pytest.raises(ValueError, match="definitions must be one of"):
        fh.score(a, "sparsity", definitions="fp16")
    with pytest.raises(ValueError, match="not a ranking"):
        fh.score(a, "hierarchical")
    with pytest.raises(ValueError, match="not a ranking"):
        fh.score(a, "random")
    with pytest.raises(ValueError, match=r"\[num_heads, num_visual\]"):
        fh.select(a[None], "sum", heads=2)
    with pytest.raises(ValueError, match="floating-point"):
        fh.select(torch.ones(2, 3, dtype=torch.long), "sum", heads=1)
    with pytest.raises(ValueError, match="seed must be an int"):
        fh.select(a, "random", heads=2, seed="x")


def test_top_k_sum_option_k() -> None:
    a = make_attn()
    want = torch.sort(a, dim=-1, descending=True).values[:, :64].sum(-1)
    torch.testing.assert_close(fh.score(a, "top_k_sum", k=100), want)  # k capped at N
    torch.testing.assert_close(fh.score(a, "top_k_sum", k=1), a.max(-1).values)
