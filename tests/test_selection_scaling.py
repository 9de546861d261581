"""The scalable pre-LLM selections keep exactly the sets of the straightforward loops they replaced.

Each reference below is the implementation as it was before the speed-ups (issue #13 item 5), copied
unchanged: VisPruner's de-duplication gathering an |A| x |B| block per round, CDPruner's greedy DPP on the
full kernel with a mask per step, DivPrune's greedy on the full distance matrix, SparseVLM's recycling on
one sequential-sum ``cdist`` call. Inputs are random, of several sizes and budgets, batched, with tied
attention, duplicated and discrete features (similarity ties) and exhausted DPP kernels, where a
different operation order would change the picks.

Two speed-ups change the rounding, not the mathematics, and are compared accordingly:

* The similarity of DivPrune, CDPruner and VisPruner is ``divprune.symmetric_gram`` (each pair's dot product once,
  by row panels, from 576 tokens on) instead of one matmul: the same dot products, rounded by the BLAS
  in another blocking. The greedy loops themselves are compared with the references bit for bit on the
  same similarity matrix (including exhausted kernels). Against the one-matmul references the kept sets
  must be equal wherever the picks are decided by more than rounding: random, clustered, duplicated and
  discrete features with kernels of full rank, and ``exact`` features (four entries of +-1/2: unit
  norm, every dot product a multiple of 1/4, exact in any summation order), whose many exact ties are
  then exact ties in both paths, so the first-index tie-breaking is checked too. An exhausted kernel's
  later picks follow rounding-level gains (the official code divides by the square root of a
  non-positive gain there); only their count and distinctness are checked against the one matmul.
* SparseVLM's distances are ``torch.pdist`` (the official ``(x1 - x2).norm(-1)``: exact differences,
  a vectorised sum of squares) instead of ``cdist``'s sequential sum: the same value of each pair up to
  rounding, exactly symmetric, exactly 0 between duplicates. The clusterings are equal to the
  reference's on all inputs here; the distances themselves are equal where the sums are exact
  (discrete and ``exact`` features) and within a few ulps elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from finepruner.methods import cdpruner, divprune, dpp_blocked, sparsevlm_recycling, vispruner

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
    ``discrete`` (small integers: many exactly equal similarities); ``exact`` (unit vectors with four
    entries +-1/2: every similarity a multiple of 1/4, computed exactly in any summation order)."""
    if kind == "exact":
        signs = torch.randint(0, 2, (batch, size, 4), generator=generator).float() - 0.5
        places = torch.rand(batch, size, width, generator=generator).argsort(dim=-1)[..., :4]
        return torch.zeros(batch, size, width).scatter_(2, places, signs)
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
#: With ``exact``: the kinds compared across the one-matmul and the symmetric gram.
GRAM_KINDS = (*KINDS, "exact")


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


@pytest.mark.parametrize("rounds", ["host", "batched"])
@pytest.mark.parametrize(("size", "tokens", "candidates", "head"),
                         [(70, 20, 24, 8), (200, 17, 3, 2), (200, 199, 24, 8), (300, 20, 32, 8), (577, 64, 24, 8),
                          (577, 64, 3, 1), (577, 192, 3, 8), (900, 151, 24, 8), (700, 30, 24, 2)])
def test_vispruner_equals_plain_rounds(size, tokens, candidates, head, rounds, monkeypatch):
    """``candidates=3`` refills the candidate lists and falls back to the exact maximum over B often;
    ``(300, 20)`` ends with fewer alive tokens than candidates (refills shorter than a list); 70 tokens take the plain
    rounds; from 576 residual tokens the gram is ``symmetric_gram``'s (the reference: one matmul). ``head``
    (``HEAD``) 1 or 2 sends most A-tokens of a host round to their whole list; ``batched`` runs the tensor
    rounds that other devices take on the CPU."""
    monkeypatch.setattr(vispruner, "CANDIDATES", candidates)
    monkeypatch.setattr(vispruner, "HEAD", head)
    if rounds == "batched":
        monkeypatch.setattr(vispruner, "deduplicate", vispruner.deduplicate_batched)
    generator = torch.Generator().manual_seed(size * 1000 + tokens)
    for index, kind in enumerate(GRAM_KINDS):
        features = features_of(kind, 2, size, 24, generator)
        attention = attention_of(2, size, generator, tied=index % 2 == 1)
        ratio = (0.5, 0.25, 0.0, 0.5, 0.25)[index]
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
                          (577, 96, 128, "batch"), (577, 160, 128, "sample"), (900, 256, 200, "batch")])
def test_cdpruner_equals_full_kernel_loop(size, width, tokens, normalize):
    """On the same similarity matrix the greedy is the reference's, bit for bit: ``width < tokens``
    exhausts the kernel's rank, and later picks follow rounding-level gains, so they match only when every
    operation is the reference's. Against the one-matmul kernel (577 and 900 tokens: the symmetric gram's
    panels) the kept sets are equal where the kernel has full rank, and the picks stay distinct where not."""
    generator = torch.Generator().manual_seed(size + width + tokens)
    for kind in GRAM_KINDS:
        projected = features_of(kind, 2, size, width, generator)
        embeds = projected[..., :8] + 0.1 * torch.randn(2, size, 8, generator=generator)
        texts = [torch.randn(3, 8, generator=generator) for _ in range(2)]
        relevance = cdpruner.relevance_scores(embeds, texts, normalize)
        similarity = cdpruner.cosine_similarity(projected)
        kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
        expected = reference_dpp(kernel, tokens)
        kept = cdpruner.dpp_select(similarity, relevance, tokens)
        assert torch.equal(kept, expected), kind
        assert torch.equal(cdpruner.dpp_greedy(cdpruner.similarity_kernel(projected, relevance), tokens), expected)
        assert torch.equal(cdpruner.dpp_select(similarity[:1], relevance[:1], tokens), expected[:1]), kind  # one sample
        if tokens <= width:  # an exhausted kernel's later picks follow rounding, which a batched matmul may differ in
            assert torch.equal(cdpruner.dpp_greedy(kernel[1:], tokens), expected[1:]), kind
        assert all(len(set(row)) == tokens for row in kept.tolist())
        one_matmul = reference_dpp(reference_kernel(projected, relevance), tokens)
        if tokens <= width and kind != "duplicates" or kind == "exact":
            assert torch.equal(kept, one_matmul), kind
    assert torch.equal(cdpruner.dpp_greedy_plain(kernel, tokens), expected)


def test_symmetric_gram_is_the_matmul_up_to_rounding():
    """Exactly symmetric; bit for bit one matmul where every dot product is exact; duplicated rows give
    equal rows; otherwise within float32 rounding of the matmul."""
    generator = torch.Generator().manual_seed(7)
    for kind in GRAM_KINDS:
        x = features_of(kind, 2, 1000, 48, generator)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        gram = divprune.symmetric_gram(x)
        assert torch.equal(gram, gram.transpose(1, 2)), kind
        torch.testing.assert_close(gram, x @ x.transpose(1, 2), rtol=0, atol=1e-5)
        if kind == "exact":
            assert torch.equal(gram, x @ x.transpose(1, 2))
    x = features_of("duplicates", 1, 900, 64, generator)
    gram = divprune.symmetric_gram(x)
    first, second = [pair for pair in torch.nonzero(torch.cdist(x[0], x[0]) == 0).tolist() if pair[0] < pair[1]][0]
    assert torch.equal(gram[0, first], gram[0, second])


@pytest.mark.parametrize(("size", "width", "tokens", "block", "active"),
                         [(300, 64, 40, 4, 8), (300, 24, 60, 8, 16), (400, 96, 90, 3, 5), (1100, 200, 150, 32, 256),
                          (1500, 64, 40, 32, 256), (600, 128, 300, 32, 64)])
def test_cdpruner_blocked_greedy_keeps_the_one_matmul_sets(size, width, tokens, block, active):
    """``dpp_blocked.dpp_greedy_blocked`` (blocks of at most ``block`` picks, ``active`` candidates followed
    pick by pick; small ones end blocks and refill often): on full-rank kernels (``exact`` features
    included) the kept sets of the one-matmul loop; on an exhausted kernel (``width < tokens``), whose later
    picks follow rounding-level gains computed another way here, distinct picks."""
    generator = torch.Generator().manual_seed(size + width + block)
    for kind in GRAM_KINDS:
        projected = features_of(kind, 1, size, width, generator)
        embeds = projected[..., :8] + 0.1 * torch.randn(1, size, 8, generator=generator)
        relevance = cdpruner.relevance_scores(embeds, [torch.randn(3, 8, generator=generator)])
        normed = projected / projected.norm(dim=-1, keepdim=True)
        kept = dpp_blocked.dpp_greedy_blocked(normed[0], relevance[0], tokens, block, active)
        assert len(set(kept[0].tolist())) == tokens, kind
        if tokens <= width:  # an exhausted kernel's later picks follow rounding-level gains
            assert torch.equal(kept, reference_dpp(reference_kernel(projected, relevance), tokens)), kind


@pytest.mark.parametrize(("size", "width", "tokens"), [(500, 256, 200), (900, 512, 400)])
def test_cdpruner_blocked_greedy_is_the_greedy_in_float64(size, width, tokens):
    """In float64 (rounding far below the gaps between gains) the blocked picks are the one-by-one loop's."""
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, width, generator=generator, dtype=torch.float64) + 0.4
    x = x / x.norm(dim=-1, keepdim=True)
    weights = torch.rand(size, generator=generator, dtype=torch.float64)
    expected = reference_dpp((weights[:, None] * (x @ x.T) * weights[None, :])[None], tokens)
    assert torch.equal(dpp_blocked.dpp_greedy_blocked(x, weights, tokens, 16, 48), expected)
    assert torch.equal(dpp_blocked.dpp_greedy_blocked(x, weights, tokens), expected)


@pytest.mark.parametrize(("block", "active"), [(3, 5), (4, 2), (32, 256)])
def test_cdpruner_blocked_greedy_breaks_exact_ties_by_the_first_index(block, active):
    """``exact`` features with equal relevance: every gain starts at exactly 1 and the picks orthogonal to
    all earlier ones keep exactly 1, so nearly every pick is a tie across the followed set's boundary; each
    is the smallest index among the tied, as ``argmax`` in the one-by-one loop."""
    generator = torch.Generator().manual_seed(3)
    x = features_of("exact", 1, 300, 256, generator)[0]
    weights = torch.ones(300)
    expected = reference_dpp((x @ x.T)[None], 20)
    assert torch.equal(dpp_blocked.dpp_greedy_blocked(x, weights, 20, block, active), expected)


def test_cdpruner_large_samples_select_by_blocks(monkeypatch):
    """``dpp_select_projected`` uses the blocked greedy for one sample from ``BLOCKED_FROM`` tokens on, the
    symmetric gram for a batch; a NaN similarity (a token with no direction) takes the plain loop's rules."""
    monkeypatch.setattr(cdpruner, "BLOCKED_FROM", 200)
    generator = torch.Generator().manual_seed(11)
    projected = features_of("random", 2, 300, 64, generator)
    relevance = cdpruner.relevance_scores(projected[..., :8], [torch.randn(3, 8, generator=generator)] * 2)
    expected = reference_dpp(reference_kernel(projected, relevance), 50)
    assert torch.equal(cdpruner.dpp_select_projected(projected[:1], relevance[:1], 50), expected[:1])
    assert torch.equal(cdpruner.dpp_select_projected(projected, relevance, 50), expected)
    calls = []
    monkeypatch.setattr(cdpruner, "dpp_greedy_blocked", lambda *args: calls.append(args) or None)
    cdpruner.dpp_select_projected(projected[:1], relevance[:1], 50)
    assert len(calls) == 1  # one sample of 300 >= 200 tokens: the blocked greedy (its None: the gram path)
    projected[0, 3] = 0.0  # no direction: NaN similarities, the plain loop's NaN rules
    assert torch.equal(cdpruner.dpp_select_projected(projected[:1], relevance[:1], 50),
                       reference_dpp(reference_kernel(projected[:1], relevance[:1]), 50))


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
    for kind in GRAM_KINDS:
        features = features_of(kind, 2, size, 20, generator)
        features[:, ::11] = 0.0  # zero vectors: distance 1 to everything
        expected = reference_divprune(features, tokens)
        assert torch.equal(divprune.divprune_select(features, tokens), expected), kind
        for row in range(2):  # one sample: its own loop
            assert torch.equal(divprune.divprune_select(features[row : row + 1], tokens), expected[row : row + 1]), kind
    assert torch.equal(divprune.divprune_select_plain(features, tokens), expected)


def test_divprune_non_finite_features_follow_the_plain_loop():
    generator = torch.Generator().manual_seed(6)
    features = features_of("random", 2, 100, 8, generator)
    features[0, 3, 2] = math.nan
    features[1, 9, 0] = math.inf
    assert torch.equal(divprune.divprune_select(features, 30), reference_divprune(features, 30))


# -- SparseVLM's recycling ------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "width"), [(40, 8), (300, 24), (700, 64), (766, 32)])
def test_sparsevlm_recycling_equals_one_cdist_call(size, width):
    generator = torch.Generator().manual_seed(size)
    for kind in GRAM_KINDS:
        x = features_of(kind, 2, size, width, generator) * 3.0
        noise = torch.rand(2, size, generator=generator)
        clusters = size // 10 + 1
        got = sparsevlm_recycling.cluster_and_merge(x, clusters, noise)
        expected = reference_cluster_and_merge(x, clusters, noise)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), kind
        dist = sparsevlm_recycling.euclidean_distances(x)
        sequential = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        assert torch.equal(dist, dist.transpose(1, 2)) and not dist.diagonal(dim1=1, dim2=2).any()
        if kind in ("discrete", "exact"):
            assert torch.equal(dist, sequential), kind
        torch.testing.assert_close(dist, sequential, rtol=1e-5, atol=0)
        official = (x[:, :64, None] - x[:, None]).norm(dim=-1)  # the official formula, its first rows
        torch.testing.assert_close(dist[:, :64], official, rtol=1e-6, atol=0)
