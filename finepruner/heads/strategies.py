"""Ranking strategies and the two-stage ``hierarchical`` selector (spec heads.md §3, "ablation_a").

Every score function takes float32 attention ``[..., H, N]`` (last-prompt-token attention to the visual
tokens) and returns ``[..., H]``. Which end is "best" is recorded in the registry
(:mod:`finepruner.heads.registry`) and follows the original code (docs/heads.md, table "Direction").

``definitions`` chooses the distribution that the distribution-based statistics are computed on:

* ``"renormalised"`` (default): ``Q = A / sum_j A`` (the attention renormalised over the visual tokens), with
  scale-free guards instead of the original epsilons where the epsilon would swamp the statistic;
* ``"original"``: ``P = softmax(A)`` and the original formulas and epsilons verbatim, in float32
  (spec heads.md §3, §3.1 item 1).

Strategies defined on the raw attention in the original (sum, variance, max_attention, attention_range,
top_k_sum) have no double softmax; they are identical under both definitions.
"""

from __future__ import annotations

import torch

from finepruner.heads import statistics as st
from finepruner.heads.selection import Selection, sorted_long, top_heads

DEFINITIONS = ("renormalised", "original")
HIERARCHICAL_VERSIONS = ("published", "fixed")


def check_definitions(definitions: str) -> bool:
    """Validate ``definitions``; return True for ``"original"``."""
    if definitions not in DEFINITIONS:
        raise ValueError(f"definitions must be one of {DEFINITIONS}, got {definitions!r}")
    return definitions == "original"


def distribution(attn: torch.Tensor, definitions: str) -> torch.Tensor:
    """``Q`` (renormalised) or ``P`` (double softmax) per head."""
    return st.double_softmax(attn) if check_definitions(definitions) else st.renormalise(attn)


# --------------------------------------------------------------------------------------------------------
# Raw-attention strategies (same under both definitions)
# --------------------------------------------------------------------------------------------------------


def score_sum(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """``sum_j A``: the head's visual attention mass (spec §2.1, §3). Best = largest."""
    check_definitions(definitions)
    return st.total(attn)


def score_variance(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """Unbiased ``var_j A`` (spec §3). Best = largest."""
    check_definitions(definitions)
    return st.variance(attn)


def score_max_attention(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """``max_j A`` (spec §3). Best = largest."""
    check_definitions(definitions)
    return st.maximum(attn)


def score_attention_range(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """``max_j A - min_j A`` (spec §3). Best = largest."""
    check_definitions(definitions)
    return st.value_range(attn)


def score_top_k_sum(attn: torch.Tensor, k: int = 10, definitions: str = "renormalised") -> torch.Tensor:
    """Sum of the top-``min(k, N)`` values of ``A``; ``k=10`` in ablation_a, 64 elsewhere (spec §3, §2.3)."""
    check_definitions(definitions)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k_sum: k must be a positive int, got {k!r}")
    return st.top_k_sum(attn, k)


# --------------------------------------------------------------------------------------------------------
# Distribution strategies (Q by default, P = softmax(A) for definitions="original")
# --------------------------------------------------------------------------------------------------------


def score_entropy(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """Entropy of the head's distribution (spec §3). Best = **smallest** (focused head)."""
    if check_definitions(definitions):
        return st.entropy_original(st.double_softmax(attn))
    return st.entropy(st.renormalise(attn))


def score_sparsity(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """``sum_j Q^2`` (ours) / ``sum_j P^2`` (original) (spec §3). Best = largest."""
    return st.sum_of_squares(distribution(attn, definitions))


def score_weighted_quality(
    attn: torch.Tensor, threshold: float = 0.01, definitions: str = "renormalised"
) -> torch.Tensor:
    """``0.4 max p + 0.4 sum p^2 + 0.2 coverage`` with ``c = #(p > threshold)`` (spec §3). Best = largest.

    Original: ``coverage = 1/(c + 1e-8)``, so a head with no token above 1% (every head under the double
    softmax, spec §3.1 item 4) gets 1e8 and the flattest heads win. Ours: ``coverage = 1/c`` and 0 when
    ``c = 0`` (a head with no significant token earns no focus credit).
    """
    original = check_definitions(definitions)
    p = distribution(attn, definitions)
    count = (p > threshold).sum(dim=-1).to(p.dtype)
    if original:
        coverage = 1.0 / (count + st.ORIGINAL_EPS)
    else:
        coverage = torch.where(count > 0, 1.0 / count.clamp_min(1.0), torch.zeros_like(count))
    return 0.4 * st.maximum(p) + 0.4 * st.sum_of_squares(p) + 0.2 * coverage


def score_gini_coefficient(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """Gini coefficient of the head's distribution (spec §3). Best = largest (most unequal).

    Gini is scale-invariant, so ours equals the Gini of the raw attention ``A``; the original uses ``P``.
    """
    return st.gini(distribution(attn, definitions))


def score_multi_objective(attn: torch.Tensor, definitions: str = "renormalised") -> torch.Tensor:
    """``0.4 (0.7 mm(Ent) + 0.3 mm(kurt)) + 0.3 mm(1/(s+1e-8)) + 0.3 mm(sum p^2)`` (spec §3). Best = largest.

    ``s`` is the head's mean cosine similarity to the other heads. Ours: scale-free kurtosis ``m4/m2^2``
    (the original ``+1e-8`` in the denominator swamps ``m2^2``), the exact off-diagonal mean (the original
    subtracts 1 for the self-similarity and divides by ``H-1``; 0 for one head), and min-max scaling that
    maps a constant metric to 0 instead of adding 1e-8.
    """
    original = check_definitions(definitions)
    p = distribution(attn, definitions)
    h = p.shape[-2]
    sim = st.cosine_matrix(p)
    if original:
        mm = st.minmax_original
        ent = st.entropy_original(p)
        kurt = st.kurtosis_original(p)
        avg_sim = (sim.sum(dim=-1) - 1) / (h - 1) if h > 1 else torch.zeros_like(ent)
    else:
        mm = st.minmax
        ent = st.entropy(p)
        kurt = st.kurtosis(p)
        avg_sim = st.mean_offdiagonal(sim)
    info_richness = 0.7 * mm(ent) + 0.3 * mm(kurt)
    diversity = 1.0 / (avg_sim + st.ORIGINAL_EPS)
    return 0.4 * info_richness + 0.3 * mm(diversity) + 0.3 * mm(st.sum_of_squares(p))


def score_graph_based(
    attn: torch.Tensor, similarity_threshold: float = 0.1, definitions: str = "renormalised"
) -> torch.Tensor:
    """Two rounds of mean-neighbour message passing over head features (spec §3). Best = largest.

    Features ``f = [sum p^2, Ent(p), max p, var p, mean(p > mean p)]``; adjacency ``1[cos > 0.1]`` without
    self-loops, row-normalised; ``f1 = relu(f + Af)``, ``f2 = relu(f1 + Af1)``; score = mean of ``f2``.
    The same under both definitions except ``p`` (and the entropy's ``log(p + 1e-8)`` in the original).
    The entropy feature dominates the mean, so this favours flat heads (spec §3.1 item 3).
    """
    original = check_definitions(definitions)
    p = distribution(attn, definitions)
    ent = st.entropy_original(p) if original else st.entropy(p)
    feats = torch.stack(
        [st.sum_of_squares(p), ent, st.maximum(p), st.variance(p), st.fraction_above_mean(p)], dim=-1
    )
    adj = (st.cosine_matrix(p) > similarity_threshold).to(p.dtype)
    adj = adj * (1 - torch.eye(adj.shape[-1], dtype=p.dtype, device=p.device))
    adj = adj / (adj.sum(dim=-1, keepdim=True) + st.ORIGINAL_EPS)
    f1 = torch.relu(feats + adj @ feats)
    f2 = torch.relu(f1 + adj @ f1)
    return f2.mean(dim=-1)


# --------------------------------------------------------------------------------------------------------
# hierarchical: a two-stage selector (depends on H, so it is not a ranking)
# --------------------------------------------------------------------------------------------------------


def select_hierarchical(
    attn: torch.Tensor, heads: int, version: str = "published", definitions: str = "renormalised"
) -> Selection:
    """Coarse-then-fine selection (spec §3, rows "hierarchical").

    ``version="published"`` is b9395b7, the code behind the published tables; ``"fixed"`` is 1b06659.
    Fine-stage ties are broken by head index (the coarse set is re-sorted by index first).
    """
    if version not in HIERARCHICAL_VERSIONS:
        raise ValueError(f"hierarchical: version must be one of {HIERARCHICAL_VERSIONS}, got {version!r}")
    original = check_definitions(definitions)
    p = distribution(attn, definitions)
    total_heads = p.shape[0]
    ent_fn = st.entropy_original if original else st.entropy
    ent = ent_fn(p)
    sq = st.sum_of_squares(p)

    if version == "published":
        mm = st.minmax_original if original else st.minmax
        coarse_k = min(total_heads, max(2 * heads, 16))
    else:
        mm = st.minmax  # the fix maps a constant metric to 0 and drops the 1e-8
        if total_heads <= heads or total_heads <= 8:
            single = 0.5 * sq + 0.3 * st.maximum(p) + 0.2 * st.variance(p)
            ranked = top_heads(single, heads)
            return Selection(
                sorted_long(ranked), ranked, single, {"stage": "single", "coarse_k": total_heads}
            )
        coarse_k = min(total_heads, max(2 * heads, heads + 4))

    coarse_scores = 0.6 * sq + 0.4 * (1 - mm(ent))
    coarse = sorted_long(top_heads(coarse_scores, coarse_k))
    cp = p[coarse]
    if version == "published":
        kl = st.kl_uniform_to(cp)
        spread = torch.cdist(cp, cp, p=2).mean(dim=-1)
    else:
        kl = st.kl_to_uniform_original(cp) if original else st.kl_to_uniform(cp)
        z = torch.nn.functional.normalize(cp, p=2, dim=-1)
        spread = torch.linalg.vector_norm(z - z.mean(dim=0, keepdim=True), dim=-1)
    stability = 1.0 / (st.std(cp) + st.ORIGINAL_EPS)
    fine = 0.3 * mm(ent_fn(cp)) + 0.25 * mm(kl) + 0.25 * mm(spread) + 0.2 * mm(stability)
    ranked = coarse[top_heads(fine, heads)]
    head_scores = torch.full((total_heads,), float("nan"), dtype=p.dtype, device=p.device)
    head_scores[coarse] = fine
    return Selection(sorted_long(ranked), ranked, head_scores, {"stage": "two-stage", "coarse_k": coarse_k})
