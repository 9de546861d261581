"""The scalable pre-LLM selections keep exactly the sets of the straightforward loops they replaced.

Each reference below is the implementation as it was before the speed-up (issue #13 item 5), copied
unchanged: VisPruner's de-duplication gathering an |A| x |B| block per round, CDPruner's greedy DPP on the
full kernel with a mask per step, DivPrune's greedy on the full distance matrix, SparseVLM's recycling on
one ``cdist`` call. Inputs are random, of
several sizes and budgets, batched, with tied attention, duplicated and discrete features (similarity
ties) and exhausted DPP kernels, where a different operation order would change the picks.
"""

from __future__ import annotations

import math

import pytest
import torch

from finepruner.methods import cdpruner, divprune, sparsevlm_recycling, vispruner

# -- the references: the code before the speed-up -----------------------------------------------------


def reference_vispruner(cls_attention, features, tokens, important_ratio=0.5):
    batch, num_visual, width = features.shape
    num_important = int(tokens * important_ratio)
    num_diverse = tokens - num_important
    order = cls_attention.argsort(dim=-1, descending=True, stable=True)
    important, residual = order[:, :num_important], order[:, num_important:]
    normed = features.to(torch.promote_types(features.dtype, torch.float32))
    normed = normed / normed.norm(dim=-1, keepdim=True)
    if num_diverse > 0:
        start = normed.gather(1, residual[..., None].expand(-1, -1, width))
        gram = start @ start.transpose(1, 2)  # [B, R0, R0]
        rows = torch.arange(batch, device=features.device)[:, None, None]
        places = torch.arange(residual.shape[1], device=features.device).expand(batch, -1)
        while True:
            length = places.shape[1]
            drop = min(8, length - num_diverse, (length + 1) // 2)
            if drop <= 0:
                break
            first, second = places[:, 0::2], places[:, 1::2]
            best = gram[rows, first[:, :, None], second[:, None, :]].amax(dim=-1)  # [B, |A|]
            survivors = best.argsort(dim=-1, descending=True, stable=True)[:, drop:]
            places = torch.cat([first.gather(1, survivors), second], dim=1)
        residual = residual.gather(1, places)
    selected = torch.cat([important, residual], dim=1) if num_diverse > 0 else important
    return selected.sort(dim=-1).values


def reference_dpp(kernel, count):
    batch, size, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    vectors = kernel.new_zeros(batch, count, size)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picked = torch.zeros(batch, size, dtype=torch.bool, device=kernel.device)
    chosen = kernel.new_empty(batch, count, dtype=torch.long)
    for step in range(count):
        j = gains.masked_fill(picked, -math.inf).argmax(dim=-1)
        chosen[:, step] = j
        gain = gains[rows, j]
        row = kernel[rows, j]
        if step:
            past = vectors[:, :step]
            row = row - (past[rows, :, j].unsqueeze(1) @ past).squeeze(1)
        positive = gain > 0
        e = row / gain.clamp_min(torch.finfo(gain.dtype).tiny).sqrt().unsqueeze(-1)
        e = torch.where(positive.unsqueeze(-1), e, torch.zeros_like(e))
        vectors[:, step] = e
        gains = gains - e.square()
        picked[rows, j] = True
    return chosen.sort(dim=-1).values


def reference_kernel(projected, relevance):
    normed = (projected / projected.norm(dim=-1, keepdim=True)).float()
    similarity = normed @ normed.transpose(1, 2)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def reference_divprune(features, count):
    batch, size, _ = features.shape
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    distances = 1.0 - x @ x.transpose(1, 2)
    distances.diagonal(dim1=1, dim2=2).fill_(math.inf)
    rows = torch.arange(batch, device=features.device)
    picked = torch.zeros(batch, size, dtype=torch.bool, device=features.device)
    chosen = torch.empty(batch, count, dtype=torch.long, device=features.device)
    first = distances.amin(dim=1).argmax(dim=-1)
    chosen[:, 0] = first
    picked[rows, first] = True
    nearest = distances[rows, first]
    for step in range(1, count):
        j = nearest.masked_fill(picked, -math.inf).argmax(dim=-1)
        chosen[:, step] = j
        picked[rows, j] = True
        nearest = torch.minimum(nearest, distances[rows, j])
    return chosen.sort(dim=-1).values


def reference_cluster_and_merge(x, clusters, noise):
    batch, count, width = x.shape
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / (width**0.5)
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.to(x.device, torch.float32) * 1e-6
    higher = density[:, None, :] > density[:, :, None]
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(higher, dist, dist_max).min(dim=-1).values
    centres = (delta * density).topk(clusters, dim=-1).indices
    assign = dist.gather(1, centres[..., None].expand(-1, -1, count)).argmin(dim=1)
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(batch, -1))
    ones = torch.ones_like(assign, dtype=x.dtype)
    sizes = torch.zeros(batch, clusters, device=x.device).scatter_add_(1, assign, ones)
    weight = 1.0 / (sizes + 1e-6).gather(1, assign)
    merged = torch.zeros(batch, clusters, width, device=x.device)
    merged.scatter_add_(1, assign[..., None].expand(-1, -1, width), x * weight[..., None])
    return merged, centres, assign


# -- inputs -------------------------------------------------------------------------------------------


def features_of(kind: str, batch: int, size: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``random``; ``clusters`` (near-duplicates around a few centres); ``duplicates`` (exact copies);
    ``discrete`` (small integers: many exactly equal similarities)."""
    if kind == "random":
        return torch.randn(batch, size, width, generator=generator)
    if kind == "clusters":
        centres = torch.randn(batch, max(2, size // 12), width, generator=generator)
        pick = torch.randint(0, centres.shape[1], (batch, size), generator=generator)
        scale = 0.2 * torch.rand(batch, size, 1, generator=generator)
        noise = scale * torch.randn(batch, size, width, generator=generator)
        return centres.gather(1, pick[..., None].expand(-1, -1, width)) + noise
    if kind == "duplicates":
        base = torch.randn(batch, max(1, size // 3), width, generator=generator)
        pick = torch.randint(0, base.shape[1], (batch, size), generator=generator)
        return base.gather(1, pick[..., None].expand(-1, -1, width))
    return torch.randint(-1, 2, (batch, size, width), generator=generator).float() + 0.0


KINDS = ("random", "clusters", "duplicates", "discrete")


def attention_of(batch: int, size: int, generator: torch.Generator, tied: bool) -> torch.Tensor:
    values = torch.rand(batch, size, generator=generator) ** 4
    return (values * 8).round() / 8 if tied else values  # tied: only 9 distinct values


# -- VisPruner ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the loops are many small operations, and the test machine's two cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("size", "tokens", "candidates"),
                         [(70, 20, 24), (200, 17, 3), (200, 199, 24), (300, 20, 32), (577, 64, 24), (577, 64, 3),
                          (577, 192, 3), (900, 151, 24)])
def test_vispruner_equals_plain_rounds(size, tokens, candidates, monkeypatch):
    """``candidates=3`` refills the candidate lists and falls back to the exact maximum over B often;
    ``(300, 20)`` ends with fewer alive tokens than candidates (padded refills); 70 tokens take the plain
    rounds."""
    monkeypatch.setattr(vispruner, "CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(size * 1000 + tokens)
    for index, kind in enumerate(KINDS):
        features = features_of(kind, 2, size, 24, generator)
        attention = attention_of(2, size, generator, tied=index % 2 == 1)
        ratio = (0.5, 0.25, 0.0, 0.5)[index]
        expected = reference_vispruner(attention, features, tokens, ratio)
        assert torch.equal(vispruner.vispruner_select(attention, features, tokens, ratio), expected), kind
    assert torch.equal(vispruner.vispruner_select_plain(attention, features, tokens, ratio), expected)


def test_vispruner_rows_of_a_batch_equal_each_sample_alone():
    generator = torch.Generator().manual_seed(3)
    features = features_of("clusters", 3, 400, 16, generator)
    attention = attention_of(3, 400, generator, tied=True)
    together = vispruner.vispruner_select(attention, features, 100, 0.5)
    for row in range(3):
        alone = vispruner.vispruner_select(attention[row : row + 1], features[row : row + 1], 100, 0.5)
        assert torch.equal(together[row : row + 1], alone)


def test_vispruner_non_finite_features_follow_the_plain_rounds():
    """A zero feature has no direction (NaN similarities): the plain rounds' NaN ordering decides."""
    generator = torch.Generator().manual_seed(4)
    features = features_of("random", 2, 300, 8, generator)
    features[:, 5] = 0.0
    attention = attention_of(2, 300, generator, tied=False)
    assert torch.equal(vispruner.vispruner_select(attention, features, 60, 0.5),
                       reference_vispruner(attention, features, 60, 0.5))


# -- CDPruner -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "width", "tokens", "normalize"),
                         [(50, 64, 20, "sample"), (200, 16, 40, "batch"), (200, 8, 30, "sample"),
                          (577, 96, 128, "batch")])
def test_cdpruner_equals_full_kernel_loop(size, width, tokens, normalize):
    """``width < tokens`` exhausts the kernel's rank: later picks follow rounding-level gains, so they
    match only when every operation is the reference's."""
    generator = torch.Generator().manual_seed(size + width + tokens)
    for kind in KINDS:
        projected = features_of(kind, 2, size, width, generator)
        embeds = projected[..., :8] + 0.1 * torch.randn(2, size, 8, generator=generator)
        texts = [torch.randn(3, 8, generator=generator) for _ in range(2)]
        relevance = cdpruner.relevance_scores(embeds, texts, normalize)
        kernel = reference_kernel(projected, relevance)
        expected = reference_dpp(kernel, tokens)
        kept = cdpruner.dpp_select(cdpruner.cosine_similarity(projected), relevance, tokens)
        assert torch.equal(kept, expected), kind
        assert torch.equal(cdpruner.dpp_greedy(cdpruner.similarity_kernel(projected, relevance), tokens), expected)
        assert all(len(set(row)) == tokens for row in kept.tolist())
    assert torch.equal(cdpruner.dpp_greedy_plain(kernel, tokens), expected)


def test_cdpruner_keep_all_and_non_finite_kernels():
    generator = torch.Generator().manual_seed(5)
    projected = features_of("duplicates", 2, 60, 12, generator)
    relevance = cdpruner.relevance_scores(projected[..., :6], [torch.randn(1, 6, generator=generator)] * 2)
    kernel = reference_kernel(projected, relevance)
    assert torch.equal(cdpruner.dpp_greedy(kernel, 60), reference_dpp(kernel, 60))
    projected[:, 7] = 0.0  # no direction: NaN similarities, the plain loop's NaN rules
    kernel = reference_kernel(projected, relevance)
    assert torch.equal(cdpruner.dpp_select(cdpruner.cosine_similarity(projected), relevance, 20),
                       reference_dpp(kernel, 20))
    assert torch.equal(cdpruner.dpp_greedy(kernel, 20), reference_dpp(kernel, 20))


# -- DivPrune -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "tokens"), [(1, 1), (2, 2), (40, 40), (200, 17), (577, 64), (577, 192), (1200, 300)])
def test_divprune_equals_full_distance_loop(size, tokens):
    generator = torch.Generator().manual_seed(size + tokens)
    for kind in KINDS:
        features = features_of(kind, 2, size, 20, generator)
        features[:, ::11] = 0.0  # zero vectors: distance 1 to everything
        expected = reference_divprune(features, tokens)
        assert torch.equal(divprune.divprune_select(features, tokens), expected), kind
    assert torch.equal(divprune.divprune_select_plain(features, tokens), expected)


def test_divprune_non_finite_features_follow_the_plain_loop():
    generator = torch.Generator().manual_seed(6)
    features = features_of("random", 2, 100, 8, generator)
    features[0, 3, 2] = math.nan
    features[1, 9, 0] = math.inf
    assert torch.equal(divprune.divprune_select(features, 30), reference_divprune(features, 30))


# -- SparseVLM's recycling ------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "width"), [(40, 8), (300, 24), (700, 64)])
def test_sparsevlm_recycling_equals_one_cdist_call(size, width):
    generator = torch.Generator().manual_seed(size)
    for kind in KINDS:
        x = features_of(kind, 2, size, width, generator) * 3.0
        noise = torch.rand(2, size, generator=generator)
        clusters = size // 10 + 1
        got = sparsevlm_recycling.cluster_and_merge(x, clusters, noise)
        expected = reference_cluster_and_merge(x, clusters, noise)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), kind
    assert torch.equal(sparsevlm_recycling.euclidean_distances(x),
                       torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist"))
