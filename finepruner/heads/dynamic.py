"""Dynamic head selection: the per-image number of heads (spec heads.md §4).

* :func:`select_dynamic` -- the resource-aware selector (v2, commit 790e112, spec §4.2): candidate
  strategies by token budget, head count = median of three rules, best candidate by combination quality.
* :func:`select_consensus` -- the consensus-plus-diversity selector (v3, HEAD 954fc48, spec §4.3).

Both follow the original algorithms step by step; the bugs listed in spec §4 / §5 item 10 are fixed and
every fix is marked ``FIX`` below and listed in docs/heads.md ("Dynamic selectors"). ``definitions``
selects ``Q`` (default) or the original double softmax ``P`` for the component scores, as in
:mod:`finepruner.heads.strategies`.
"""

from __future__ import annotations

import math

import torch

from finepruner.heads import statistics as st
from finepruner.heads.selection import Selection, order_heads, sorted_long, top_heads
from finepruner.heads.strategies import check_definitions

# Component scores of the dynamic module (primed names in spec §4): name -> description.
COMPONENTS = (
    "sparsity",
    "hierarchical",
    "graph_based",
    "top_k_sum",
    "max_attention",
    "attention_range",
    "multi_objective",
    "sum",
)
CONSENSUS_DEFAULT = ("sparsity", "hierarchical", "attention_range")  # 954fc48 "方案1"

# v2 regimes for a 32-head model (spec §4.2). Thresholds are the fractions of N=576 that the original
# R / T cut-offs correspond to, so they reproduce the original exactly at N=576.
_REGIMES = {
    "high": (("sparsity", "hierarchical"), (14, 26)),
    "mid": (("sparsity", "hierarchical", "top_k_sum", "max_attention"), (8, 26)),
    "low": (("graph_based", "multi_objective", "attention_range"), (6, 18)),
}
_REFERENCE_HEADS = 32
_REFERENCE_VISUAL = 576


def component_scores(attn: torch.Tensor, name: str, original: bool) -> torch.Tensor:
    """The dynamic module's variants of the §3 scores (spec §4.1 step 2, §4.2), ``[H]``, larger = better."""
    h, n = attn.shape
    if name in ("sparsity", "hierarchical", "multi_objective"):
        p = st.double_softmax(attn) if original else st.renormalise(attn)
        mm = st.minmax_original if original else st.minmax
        ent = st.entropy_original(p) if original else st.entropy(p)
        if name == "sparsity":
            return 0.7 * st.sum_of_squares(p) + 0.3 * st.maximum(p)
        if name == "hierarchical":
            return 0.4 * st.sum_of_squares(p) + 0.3 * (1 - mm(ent)) + 0.3 * st.kl_uniform_to(p)
        return 0.4 * mm(ent) + 0.3 * mm(st.sum_of_squares(p)) + 0.3 * mm(st.maximum(p))
    if name == "graph_based":
        if h <= 1:
            return st.total(attn)
        return 0.6 * st.cosine_matrix(attn).sum(dim=-1) + 0.4 * st.variance(attn)
    if name == "top_k_sum":
        return st.top_k_sum(attn, max(1, min(64, n // 4)))
    if name == "max_attention":
        return st.maximum(attn)
    if name == "attention_range":
        return st.value_range(attn)
    if name == "sum":
        return st.total(attn)
    raise ValueError(f"unknown component strategy {name!r}; allowed: {COMPONENTS}")


def _head_bounds(
    total_heads: int, heads: int | None, min_heads: int, max_heads: int | None
) -> tuple[int, int]:
    """Validate and return ``[lo, hi]``: ``min_heads`` .. ``min(max_heads, heads)``."""
    hi = total_heads if max_heads is None else max_heads
    if heads is not None:
        hi = min(hi, heads)
    for label, value in (("min_heads", min_heads), ("max_heads", hi)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an int, got {value!r}")
    if not 1 <= min_heads <= hi <= total_heads:
        raise ValueError(
            f"need 1 <= min_heads <= max_heads (and heads) <= num_heads={total_heads}; "
            f"got min_heads={min_heads}, max_heads={max_heads}, heads={heads}"
        )
    return min_heads, hi


# --------------------------------------------------------------------------------------------------------
# v2: resource-aware selector
# --------------------------------------------------------------------------------------------------------


def budget_regime(num_visual: int, budget: float | None, kept_tokens: int | None) -> str:
    """``"high"`` / ``"mid"`` / ``"low"`` from the layer-averaged budget T (preferred) or the kept count R.

    Original: ``R >= 166`` -> high, ``R >= 98`` -> mid (7b, K=2, N=576; spec §1.2, §4.2). FIX: compared as
    fractions of N (``T/N >= 192/576``, ``128/576``; or ``R/N >= 166/576``, ``98/576``), so other K, model
    sizes and N classify by their budget; identical to the original for 7b, K=2, N=576.
    """
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= num_visual:
            raise ValueError(f"budget must be a number in (0, num_visual={num_visual}], got {budget!r}")
        frac, cuts = budget / num_visual, (192, 128)
    elif kept_tokens is not None:
        if (
            isinstance(kept_tokens, bool)
            or not isinstance(kept_tokens, int)
            or not 0 < kept_tokens <= num_visual
        ):
            raise ValueError(
                f"kept_tokens must be an int in [1, num_visual={num_visual}], got {kept_tokens!r}"
            )
        frac, cuts = kept_tokens / num_visual, (166, 98)
    else:
        raise ValueError("strategy 'dynamic' needs the token budget: pass budget=T and/or kept_tokens=R")
    if frac >= cuts[0] / _REFERENCE_VISUAL:
        return "high"
    if frac >= cuts[1] / _REFERENCE_VISUAL:
        return "mid"
    return "low"


def _scaled_range(lo: int, hi: int, total_heads: int) -> tuple[int, int]:
    """The original preferred range, given for 32 heads, scaled to ``total_heads``."""
    scale = total_heads / _REFERENCE_HEADS
    lo_s = max(1, min(total_heads, round(lo * scale)))
    hi_s = max(lo_s, min(total_heads, round(hi * scale)))
    return lo_s, hi_s


def head_count(scores: torch.Tensor, preferred: tuple[int, int]) -> dict[str, int]:
    """v2 head count: median of the gap, threshold and cumulative-85% rules, clamped to ``preferred``."""
    lo, hi = preferred
    s = scores.sort(descending=True).values
    n = s.numel()
    if n > 3:
        gaps = s[:-1] - s[1:]
        significant = torch.nonzero(gaps > gaps.mean() + 0.8 * gaps.std()).flatten()
        gap_count = int(significant[0]) + 1 if significant.numel() else hi
    else:
        gap_count = n
    threshold_count = int((s > s.mean() - 0.3 * (s.std() if n > 1 else 0.0)).sum())
    # FIX: the original divides the raw scores by their sum, so the rule depends on the scores' offset
    # (graph' scores ~[5, 25] always give ~0.85 H). Measure the cumulative share above the worst head.
    excess = s - s[-1]
    if n > 1 and float(excess.sum()) > 0:
        cumulative_count = int((torch.cumsum(excess / excess.sum(), 0) <= 0.85).sum()) + 1
    else:
        cumulative_count = n if n > 1 else 1
    median = sorted((gap_count, threshold_count, cumulative_count))[1]
    count = min(max(lo, min(median, hi)), n)
    return {"gap": gap_count, "threshold": threshold_count, "cumulative": cumulative_count, "count": count}


def combination_quality(
    attn: torch.Tensor, scores: torch.Tensor, selected: torch.Tensor
) -> tuple[float, float]:
    """Quality of a head combination: (scale-free ours, original) (spec §4.2).

    Original: ``0.3 (1 - mean offdiag cos) + 0.3 (std(s_sel) + range(s_sel))/2 + 0.4 mean var * mean max``;
    the second term is in the strategy's own score units and the third is ~1e-8, so the candidate with the
    largest score scale wins. FIX: the score term is divided by the range of that strategy's scores over
    all heads, and the attention term ``c_h = var(A_h) max(A_h)`` becomes ``mean_sel c / max_all c``;
    all three terms then lie in [0, 1] and are comparable across strategies.
    """
    sel_attn = attn[selected]
    sel_scores = scores[selected]
    k = selected.numel()
    diversity = 1 - float(st.mean_offdiagonal(st.cosine_matrix(sel_attn)).mean()) if k > 1 else 0.5
    spread = (float(sel_scores.std()) if k > 1 else 0.0) + float(sel_scores.max() - sel_scores.min())
    original = (
        0.3 * diversity
        + 0.3 * spread / 2
        + 0.4 * float(st.variance(sel_attn).mean() * st.maximum(sel_attn).mean())
    )
    full_range = float(scores.max() - scores.min())
    spread_free = spread / 2 / full_range if full_range > 0 else 0.0
    concentration = st.variance(attn) * st.maximum(attn)
    top = float(concentration.max())
    conc_free = float(concentration[selected].mean()) / top if top > 0 else 0.0
    return 0.3 * diversity + 0.3 * spread_free + 0.4 * conc_free, original


def select_dynamic(
    attn: torch.Tensor,
    heads: int | None = None,
    budget: float | None = None,
    kept_tokens: int | None = None,
    min_heads: int = 1,
    max_heads: int | None = None,
    definitions: str = "renormalised",
) -> Selection:
    """Resource-aware dynamic selection (spec §4.2) with scale-free strategy comparison.

    Steps: (1) regime from the budget -> candidate strategies and a preferred head range (scaled to the
    model's head count); (2) per candidate, head count = median(gap, threshold, cumulative) clamped to the
    preferred range and then to ``[min_heads, min(max_heads, heads)]``; (3) the candidate with the highest
    scale-free combination quality wins (ties: the earlier candidate). ``info`` records everything.
    """
    original = check_definitions(definitions)
    total_heads, num_visual = attn.shape
    lo_user, hi_user = _head_bounds(total_heads, heads, min_heads, max_heads)
    regime = budget_regime(num_visual, budget, kept_tokens)
    candidates, reference_range = _REGIMES[regime]
    preferred = _scaled_range(*reference_range, total_heads)

    results: dict[str, dict] = {}
    best_name, best_quality = None, -math.inf
    for name in candidates:
        scores = component_scores(attn, name, original)
        counts = head_count(scores, preferred)
        count = min(max(counts["count"], lo_user), hi_user)  # user bounds take precedence
        ranked = top_heads(scores, count)
        quality, quality_original = combination_quality(attn, scores, ranked)
        results[name] = {
            **counts,
            "count": count,
            "quality": quality,
            "quality_original": quality_original,
            "ranked": ranked,
            "scores": scores,
        }
        if quality > best_quality:
            best_name, best_quality = name, quality
    best = results[best_name]
    info = {
        "regime": regime,
        "preferred_range": preferred,
        "strategy": best_name,
        "num_heads": best["count"],
        "candidates": {
            name: {
                key: r[key]
                for key in ("gap", "threshold", "cumulative", "count", "quality", "quality_original")
            }
            for name, r in results.items()
        },
    }
    return Selection(sorted_long(best["ranked"]), best["ranked"], best["scores"], info)


# --------------------------------------------------------------------------------------------------------
# v3: consensus plus diversity
# --------------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    """``num / |den|`` clamped to [0, 1]; 0/0 -> 0, x/0 -> 1."""
    if den == 0:
        return 0.0 if num == 0 else 1.0
    return min(max(num / abs(den), 0.0), 1.0)


def strategy_quality(scores: torch.Tensor, attn: torch.Tensor) -> tuple[float, float]:
    """Quality of one strategy's scores on this image: (scale-free ours, original) (spec §4.3 step 1).

    Original: ``0.4 std(s) + 0.3 (1 - clamp(range/mean, 0, 1)) + 0.3 |cos(s, sum A)|``. ``std(s)`` is in
    score units (sparsity' ~1e-5, hierarchical' ~0.1), and ``|cos|`` of two positive vectors is ~1 for every
    strategy. FIX: coefficient of variation ``clamp(std/|mean|, 0, 1)`` and the Pearson correlation with
    ``sum A``; all terms are in [0, 1] and invariant to rescaling the scores.
    """
    n = scores.numel()
    sd = float(scores.std()) if n > 1 else 0.0
    mean = float(scores.mean())
    rng = float(scores.max() - scores.min())
    mass = st.total(attn)
    cos = float(torch.nn.functional.cosine_similarity(scores, mass, dim=0).abs())
    original = 0.4 * sd + 0.3 * (1 - min(max(rng / (mean + st.ORIGINAL_EPS), 0.0), 1.0)) + 0.3 * cos
    sc, ms = scores - scores.mean(), mass - mass.mean()
    denom = float(sc.norm() * ms.norm())
    corr = abs(float((sc * ms).sum())) / denom if denom > 0 else 0.0
    ours = 0.4 * _ratio(sd, mean) + 0.3 * (1 - _ratio(rng, mean)) + 0.3 * min(corr, 1.0)
    return ours, original


def _selection_count(quality: float, total_heads: int) -> int:
    """``n_s``: 60% / 100% / 130% of ``num_heads // 2`` for quality > 0.7 / > 0.4 / otherwise (spec §4.3)."""
    base = max(1, total_heads // 2)
    if quality > 0.7:
        return max(1, int(base * 0.6))
    if quality > 0.4:
        return base
    return min(total_heads, int(base * 1.3))


def _consensus_threshold(consistency: float) -> float:
    base = 0.25
    if consistency > 0.6:
        return min(0.4, base * (1 + consistency * 0.8))
    if consistency < 0.2:
        return max(0.1, base * consistency * 1.5)
    return base * 0.9


def attention_complexity(attn: torch.Tensor, original: bool = False) -> float:
    """``0.4 (1 - mean offdiag cos) + 0.3 mean Ent / log N + 0.3 clamp(dispersion, 0, 1)`` (spec §4.3 step 3).

    The entropy is that of Q (of the double softmax P when ``original``; then it is ~log N for every
    head). FIX: the original dispersion ``mean var(A) / mean(A)`` has the units of A (~1e-3, so the term
    is ~0); ours is the scale-free ``mean var(A) / mean(A)^2``.
    """
    h, n = attn.shape
    diversity = 1 - float(st.mean_offdiagonal(st.cosine_matrix(attn)).mean()) if h > 1 else 0.5
    if original:
        ent = st.entropy_original(st.double_softmax(attn))
    else:
        ent = st.entropy(st.renormalise(attn))
    norm_entropy = float(ent.mean()) / math.log(n) if n > 1 else 0.0
    mean_var, mean_a = float(st.variance(attn).mean()), float(attn.mean())
    dispersion = mean_var / mean_a**2 if mean_a > 0 else 0.0
    return 0.4 * diversity + 0.3 * norm_entropy + 0.3 * min(max(dispersion, 0.0), 1.0)


def _gap_head_count(votes: torch.Tensor, complexity: float, total_heads: int) -> tuple[int, int]:
    """``g`` = 1 + first significant gap in the sorted votes; ``T`` adjusted by complexity (spec §4.3)."""
    v = votes.sort(descending=True).values
    gaps = v[:-1] - v[1:]
    g = max(1, total_heads // 4)
    if gaps.numel() >= 2:
        significant = torch.nonzero(gaps > gaps.mean() + 0.5 * gaps.std()).flatten()
        if significant.numel():
            g = int(significant[0]) + 1
    if complexity > 0.7:
        t = int(g * (1.2 + 0.3 * complexity))
    elif complexity < 0.3:
        t = int(g * (0.7 + 0.6 * complexity))
    else:
        t = g
    return g, max(1, min(t, total_heads))


def _diversity_fill(attn: torch.Tensor, consensus: list[int], count: int) -> list[int]:
    """Greedy fill with heads unlike the consensus (spec §4.3 step 5); ties -> lowest head index."""
    total_heads = attn.shape[0]
    available = [h for h in range(total_heads) if h not in set(consensus)]
    if count <= 0 or not available:
        return []
    z = torch.nn.functional.normalize(attn, p=2, dim=-1)
    sim = z @ z.T
    picked: list[int] = []
    if consensus:
        from_consensus = 1 - sim[:, consensus].mean(dim=-1)
        remaining = list(available)
        while remaining and len(picked) < count:
            if picked:
                scores = [
                    0.6 * float(from_consensus[h]) + 0.4 * (1 - float(sim[h, picked].mean()))
                    for h in remaining
                ]
            else:
                scores = [float(from_consensus[h]) for h in remaining]
            best = remaining[max(range(len(remaining)), key=lambda i: (scores[i], -i))]
            picked.append(best)
            remaining.remove(best)
        return picked
    if len(available) <= count:
        return available
    # Farthest-point fallback. FIX: the original maximises 1 - *min* similarity to the selected set, i.e.
    # a head far from *some* selected head; farthest-point selection maximises 1 - *max* similarity
    # (far from *every* selected head).
    mass = st.total(attn[available])
    picked = [available[int(torch.argmax(mass))]]
    remaining = [h for h in available if h != picked[0]]
    while remaining and len(picked) < count:
        scores = [1 - float(sim[h, picked].max()) for h in remaining]
        best = remaining[max(range(len(remaining)), key=lambda i: (scores[i], -i))]
        picked.append(best)
        remaining.remove(best)
    return picked


def select_consensus(
    attn: torch.Tensor,
    heads: int | None = None,
    min_heads: int = 1,
    max_heads: int | None = None,
    strategies: tuple[str, ...] | list[str] = CONSENSUS_DEFAULT,
    definitions: str = "renormalised",
) -> Selection:
    """Consensus-plus-diversity selection (spec §4.3, HEAD 954fc48) with the bugs fixed.

    Steps: (1) per strategy a scale-free quality ``q_s`` and a selection of ``n_s`` heads; (2) consistency
    (mean pairwise Jaccard) -> vote threshold ``tau``; quality-weighted votes ``v_h``; (3) complexity-adjusted
    head count ``T`` clamped to ``[min_heads, min(max_heads, heads)]``; (4) consensus heads
    ``v_h >= tau sum q`` ranked by ``v_h + 0.1 tot_h``; (5) diversity fill to ``T`` heads; (6) head weights
    (``Selection.scores``: pre-softmax logits, NaN for unselected heads).
    """
    original = check_definitions(definitions)
    total_heads = attn.shape[0]
    lo_user, hi_user = _head_bounds(total_heads, heads, min_heads, max_heads)
    names = tuple(strategies)
    if not names or any(name not in COMPONENTS for name in names) or len(set(names)) != len(names):
        raise ValueError(
            f"consensus: strategies must be distinct names from {COMPONENTS}, got {strategies!r}"
        )

    picks: dict[str, torch.Tensor] = {}
    quality: dict[str, float] = {}
    quality_original: dict[str, float] = {}
    votes = torch.zeros(total_heads, dtype=torch.float32, device=attn.device)
    tie_break = torch.zeros_like(votes)
    for name in names:
        scores = component_scores(attn, name, original)
        q, quality_original[name] = strategy_quality(scores, attn)
        quality[name] = q
        chosen = top_heads(scores, _selection_count(q, total_heads))
        picks[name] = chosen
        votes[chosen] += q
        # FIX: the original adds q * raw score, mixing units across strategies; use min-max scaled scores.
        tie_break[chosen] += q * st.minmax(scores)[chosen]

    sets = {name: set(idx.tolist()) for name, idx in picks.items()}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    consistency = (
        sum(len(sets[a] & sets[b]) / len(sets[a] | sets[b]) for a, b in pairs) / len(pairs) if pairs else 0.0
    )
    tau = _consensus_threshold(consistency)

    complexity = attention_complexity(attn, original)
    g, target = _gap_head_count(votes, complexity, total_heads)
    target = min(max(target, lo_user), hi_user)

    total_quality = sum(quality.values())
    candidates = torch.nonzero(votes >= tau * total_quality).flatten()
    consensus_order = candidates[order_heads((votes + 0.1 * tie_break)[candidates])]
    consensus = consensus_order[:target].tolist()
    diversity = _diversity_fill(attn, consensus, target - len(consensus))

    logits = torch.full((total_heads,), float("nan"), dtype=torch.float32, device=attn.device)
    mass = st.total(attn)
    top_mass = float(mass.max())
    for h in consensus:
        chosen_by = [quality[name] for name in names if h in sets[name]]
        logits[h] = 1 + 0.5 * sum(chosen_by) / len(chosen_by) if chosen_by else 1.2
    for h in diversity:
        logits[h] = 0.8 + 0.4 * float(mass[h]) / (top_mass + st.ORIGINAL_EPS)

    ranked = torch.tensor(consensus + diversity, dtype=torch.long, device=attn.device)
    info = {
        "num_heads": len(consensus) + len(diversity),
        "consensus": consensus,
        "diversity": diversity,
        "target": target,
        "gap_count": g,
        "complexity": complexity,
        "consistency": consistency,
        "threshold": tau,
        "quality": quality,
        "quality_original": quality_original,
        "strategy_counts": {name: int(idx.numel()) for name, idx in picks.items()},
    }
    return Selection(sorted_long(ranked), ranked, logits, info)
