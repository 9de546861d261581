"""The strategy registry: name -> :class:`Strategy` (kind, best end, options and defaults).

Built once at import and exposed read-only (``MappingProxyType``); nothing mutates it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch

from finepruner.heads import dynamic, prior_art, strategies
from finepruner.heads.calibration import as_head_set
from finepruner.heads.selection import Selection, sorted_long

Kind = Literal["ranking", "selector", "control"]
HeadsPolicy = Literal["required", "cap", "optional", "ignored"]


@dataclass(frozen=True)
class Strategy:
    """One head-selection strategy.

    Attributes:
        name: registry key.
        kind: ``"ranking"`` (per-head scores, top-H), ``"selector"`` (an algorithm that returns a set),
            ``"control"`` (``all``, ``random``, ``calibrated``).
        best: which end of the score is selected for rankings (``"largest"`` / ``"smallest"``), else None.
        options: allowed keyword options and their defaults.
        heads: how ``heads=`` is used: ``"required"`` (exactly H heads), ``"cap"`` (optional upper bound
            on a dynamically chosen count), ``"optional"`` (exactly H heads if given, else the strategy's
            own default count), ``"ignored"`` (validated if given, otherwise unused).
        summary: one line for listings and docs.
        score_fn: ``f(attn32, **options) -> [..., H]`` for rankings.
        select_fn: ``f(attn32 [H, N], heads, **options) -> Selection`` for the others.
        per_sample: options that ``select_batch`` may receive with a leading batch dimension (one value
            per sample, e.g. ``gravity`` [B, N]); it passes row ``b`` to sample ``b``.
    """

    name: str
    kind: Kind
    best: Literal["largest", "smallest"] | None
    options: Mapping[str, Any]
    heads: HeadsPolicy
    summary: str
    score_fn: Callable[..., torch.Tensor] | None = None
    select_fn: Callable[..., Selection] | None = None
    per_sample: tuple[str, ...] = ()


def _all(attn: torch.Tensor, heads: int | None) -> Selection:
    idx = torch.arange(attn.shape[0], device=attn.device)
    return Selection(idx, idx.clone(), None, {"num_heads": attn.shape[0]})


def _random(attn: torch.Tensor, heads: int, seed: int = 0) -> Selection:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"random: seed must be an int, got {seed!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ranked = torch.randperm(attn.shape[0], generator=generator)[:heads].to(attn.device)
    return Selection(sorted_long(ranked), ranked, None, {"seed": seed})


def _calibrated(attn: torch.Tensor, heads: int, head_set: Any = None) -> Selection:
    if head_set is None:
        raise ValueError("strategy 'calibrated' needs head_set= (a HeadSet or the path of a heads.json)")
    hs = as_head_set(head_set, attn.shape[0])
    ranked = torch.tensor(hs.ranked_heads[:heads], dtype=torch.long, device=attn.device)
    scores = torch.tensor(hs.scores, dtype=torch.float32, device=attn.device)
    return Selection(sorted_long(ranked), ranked, scores, {"source": hs.source, "strategy": hs.strategy})


_DEF = {"definitions": "renormalised"}


def _ranking(name: str, fn: Callable[..., torch.Tensor], best: str, summary: str, **extra: Any) -> Strategy:
    return Strategy(
        name, "ranking", best, MappingProxyType({**extra, **_DEF}), "required", summary, score_fn=fn
    )


_ENTRIES = (
    _ranking("sum", strategies.score_sum, "largest", "visual attention mass sum_j A (fastv+finepruner)"),
    _ranking("variance", strategies.score_variance, "largest", "unbiased variance of A"),
    _ranking(
        "entropy",
        strategies.score_entropy,
        "smallest",
        "entropy of Q (original: of softmax(A)); low = focused",
    ),
    _ranking("max_attention", strategies.score_max_attention, "largest", "max_j A"),
    _ranking("attention_range", strategies.score_attention_range, "largest", "max_j A - min_j A"),
    _ranking("sparsity", strategies.score_sparsity, "largest", "sum_j Q^2 (original: sum softmax(A)^2)"),
    _ranking("top_k_sum", strategies.score_top_k_sum, "largest", "sum of the top-k values of A (k=10)", k=10),
    _ranking(
        "weighted_quality",
        strategies.score_weighted_quality,
        "largest",
        "0.4 max + 0.4 sum of squares + 0.2 / #(p > threshold)",
        threshold=0.01,
    ),
    _ranking("gini_coefficient", strategies.score_gini_coefficient, "largest", "Gini coefficient of Q"),
    _ranking(
        "multi_objective",
        strategies.score_multi_objective,
        "largest",
        "entropy/kurtosis + dissimilarity + sparsity, min-max combined",
    ),
    _ranking(
        "graph_based",
        strategies.score_graph_based,
        "largest",
        "head features smoothed over a cosine-similarity graph",
        similarity_threshold=0.1,
    ),
    Strategy(
        "hierarchical",
        "selector",
        None,
        MappingProxyType({"version": "published", **_DEF}),
        "required",
        "coarse (sparsity + entropy) then fine (entropy, KL, spread, stability) selection",
        select_fn=strategies.select_hierarchical,
    ),
    Strategy(
        "dynamic",
        "selector",
        None,
        MappingProxyType({"budget": None, "kept_tokens": None, "min_heads": 1, "max_heads": None, **_DEF}),
        "cap",
        "resource-aware dynamic selection (v2, spec §4.2)",
        select_fn=dynamic.select_dynamic,
    ),
    Strategy(
        "consensus",
        "selector",
        None,
        MappingProxyType(
            {"min_heads": 1, "max_heads": None, "strategies": dynamic.CONSENSUS_DEFAULT, **_DEF}
        ),
        "cap",
        "consensus plus diversity dynamic selection (v3, spec §4.3)",
        select_fn=dynamic.select_consensus,
    ),
    Strategy(
        "sparsevlm_priority",
        "selector",
        None,
        MappingProxyType({"gravity": "rope", **_DEF}),
        "optional",
        "SparseVLM v2.0 priority heads: top round(14/32 H) by RoPE-corrected visual attention sum",
        select_fn=prior_art.select_priority,
        per_sample=("gravity",),
    ),
    Strategy("all", "control", None, MappingProxyType({}), "ignored", "every head (= FastV)", select_fn=_all),
    Strategy(
        "random",
        "control",
        None,
        MappingProxyType({"seed": 0}),
        "required",
        "H heads drawn uniformly with a local torch.Generator(seed)",
        select_fn=_random,
    ),
    Strategy(
        "calibrated",
        "control",
        None,
        MappingProxyType({"head_set": None}),
        "required",
        "the top-H heads of a calibrated heads.json",
        select_fn=_calibrated,
    ),
)

def _unique(entries: tuple[Strategy, ...]) -> dict[str, Strategy]:
    """``{name: strategy}``; a name used twice is a ``ValueError`` naming it."""
    out: dict[str, Strategy] = {}
    for entry in entries:
        if entry.name in out:
            raise ValueError(f"head-selection strategy name {entry.name!r} is used twice")
        out[entry.name] = entry
    return out


REGISTRY: Mapping[str, Strategy] = MappingProxyType(_unique(_ENTRIES))
