"""Token ranking with a selected subset of attention heads (FinePruner-Head, spec ``heads.md`` §1.3).

Shared by every attention-scored method that accepts ``heads=``/``strategy=``: per sample, the heads are
chosen from that sample's last-query attention to the visual tokens (``finepruner.heads``), and the
token scores average only those heads (or weight them by a softmax of their scores).

Prior art (spec methods_more.md §7): ``strategy="sparsevlm_priority"`` divides the attention by the
RoPE-only logit of the last query and each visual token (computed here from the score layer's rotary
tables) before selecting and averaging heads, as SparseVLM v2.0; ``weighting="hawk"`` scores tokens by
``Σ_h w_h · A_h/‖A_h‖₂`` with the calibrated per-head weights of a ``heads.json`` (HAWK's soft selection).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finepruner import heads as head_lib
from finepruner.heads.prior_art import GRAVITY_MODES
from finepruner.heads.selection import top_heads
from finepruner.methods.base import StageContext, top_k_sorted

WEIGHTINGS: tuple[str, ...] = ("none", "hawk")


@dataclass
class HeadGuidance:
    """How heads are chosen and combined.

    Attributes:
        strategy: a name from ``finepruner.heads.strategies()``; ``"all"`` averages every head.
        heads: H, the number of heads (required by ranking strategies, an upper bound for the dynamic
            selectors).
        aggregation: ``"mean"`` over the selected heads, or ``"softmax_weighted"`` (weights = softmax of
            the selected heads' strategy scores, as the original's weighted variant).
        heads_from: a ``heads.json`` from ``finepruner calibrate``: a fixed head set, no per-sample cost.
        options: further strategy options (e.g. ``{"definitions": "original"}``, ``{"k": 10}``,
            ``{"gravity": "none"}`` for ``sparsevlm_priority``).
        weighting: ``"none"`` (default: the selected heads as above) or ``"hawk"``: every head (or the
            ``heads`` with the largest weights) weighted by the ``weights`` of ``heads_from``, each head's
            row L2-normalised (HAWK's soft selection, spec methods_more.md §7).
    """

    strategy: str = "all"
    heads: int | None = None
    aggregation: str = "mean"
    heads_from: str | Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    weighting: str = "none"

    def __post_init__(self) -> None:
        if self.aggregation not in head_lib.AGGREGATION_MODES:
            raise ValueError(f"aggregation={self.aggregation!r}; allowed: {head_lib.AGGREGATION_MODES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r}; allowed: {WEIGHTINGS}")
        if self.weighting == "hawk":
            if self.heads_from is None:
                raise ValueError("weighting='hawk' needs heads_from=heads.json with a 'weights' field "
                                 "(write it with: finepruner calibrate --weights)")
            if self.aggregation != "mean":
                raise ValueError(f"aggregation={self.aggregation!r} does not apply with weighting='hawk' (the "
                                 "calibrated weights combine the heads); allowed: 'mean' (the default)")
        if self.heads_from is not None:
            self.strategy = "calibrated"
        info = head_lib.strategy_info(self.strategy)  # raises on unknown names, listing them
        head_lib.api.validate_options(info, {k: v for k, v in self.options.items() if k != "head_set"})
        gravity = self.options.get("gravity", "rope")
        if self.strategy == "sparsevlm_priority" and not (isinstance(gravity, str) and gravity in GRAVITY_MODES):
            raise ValueError(f"sparsevlm_priority: gravity={gravity!r}; allowed: {GRAVITY_MODES}")
        self._head_set = None

    @classmethod
    def from_params(
        cls,
        strategy: str,
        heads: int | None,
        aggregation: str,
        heads_from: str | Path | None = None,
        definitions: str | None = None,
        seed: int | None = None,
        options: Mapping[str, Any] | None = None,
        weighting: str = "none",
    ) -> HeadGuidance:
        """Build from a method's keyword parameters (``definitions`` and ``seed`` join the options)."""
        extra = dict(options or {})
        if definitions is not None:
            extra["definitions"] = definitions
        if seed is not None:
            extra["seed"] = seed
        return cls(strategy, heads, aggregation, heads_from, extra, weighting)

    def select_tokens(self, ctx: StageContext, keep: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        """Kept visual tokens of a stage: top-``keep`` of the guided token scores (heads recorded in
        ``ctx.heads`` unless every head is used), ranked on ``attention`` [B, heads, V] (default: the
        stage's last-query row ``ctx.attention``)."""
        extra = {"kept_tokens": keep} if self.strategy == "dynamic" else None
        attention = ctx.attention if attention is None else attention
        if self.strategy == "sparsevlm_priority" and self.options.get("gravity", "rope") == "rope":
            attention = attention / last_query_gravity(ctx)[:, None, :]  # SparseVLM v2.0 (methods.md §2.3 (a))
            extra = {"gravity": "none"}  # already corrected: rank and average the corrected rows
        scores, chosen = self.token_scores(attention, extra)
        if self.strategy != "all":
            ctx.heads = chosen
        return top_k_sorted(scores, keep)

    def as_dict(self) -> dict[str, Any]:
        """The guidance parameters, JSON-serialisable (recorded with runs)."""
        described = {
            "strategy": self.strategy,
            "heads": self.heads,
            "aggregation": self.aggregation,
            "heads_from": str(self.heads_from) if self.heads_from is not None else None,
            "options": dict(self.options),
        }
        if self.weighting != "none":
            described["weighting"] = self.weighting
        return described

    def check_model(self, num_heads: int, num_layers: int, num_visual: int, layer: int) -> None:
        """Validate H and a calibrated head set against the model before anything runs."""
        if self.heads is not None and (isinstance(self.heads, bool) or not 1 <= int(self.heads) <= num_heads):
            raise ValueError(f"heads={self.heads!r} is not allowed; this model has {num_heads} heads per layer")
        if self.heads_from is not None:
            self._head_set = head_lib.load_head_set(
                self.heads_from, num_heads=num_heads, layer=layer, num_layers=num_layers, num_visual=num_visual
            )
            if self.weighting == "hawk":
                if self._head_set.weights is None:
                    raise ValueError(f"{self.heads_from}: field 'weights' is missing; weighting='hawk' needs the "
                                     "per-head weights written by: finepruner calibrate --weights")
                return
            if self.heads is None:
                raise ValueError("heads_from= needs heads=H: how many of the calibrated heads to use")
        elif head_lib.strategy_info(self.strategy).heads == "required" and self.heads is None:
            raise ValueError(f"strategy {self.strategy!r} needs heads=H (1..{num_heads})")

    def token_scores(
        self, attention: torch.Tensor, extra_options: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Token scores [B, V] and the chosen heads per sample, from attention [B, heads, V]."""
        if self.weighting == "hawk":
            return self.hawk_token_scores(attention)
        if self.strategy == "all" and self.aggregation == "mean":  # bit-identical to FastV/PDrop
            every = torch.arange(attention.shape[1], device=attention.device)
            return attention.mean(dim=1), [every] * attention.shape[0]
        options = dict(self.options)
        if extra_options:
            options.update(extra_options)
        if self._head_set is not None:
            options["head_set"] = self._head_set
        chosen, scores = [], []
        for sample in attention:
            selection = head_lib.select_detailed(sample, self.strategy, self.heads, **options)
            chosen.append(selection.indices)
            scores.append(selection.scores)
        weights = None
        if self.aggregation == "softmax_weighted":
            if any(s is None for s in scores):
                raise ValueError(f"aggregation='softmax_weighted' needs a scoring strategy, not {self.strategy!r}")
            weights = torch.stack(scores)
        token = head_lib.aggregate(attention, chosen, mode=self.aggregation, scores=weights)
        return token, chosen

    def hawk_token_scores(self, attention: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """HAWK's soft selection on attention [B, heads, V]: ``Σ_h w_h · A_h/‖A_h‖₂`` with the calibrated
        weights; with ``heads=H`` only the H largest weights (ties: lowest index) count."""
        if self._head_set is None or self._head_set.weights is None:
            raise RuntimeError("weighting='hawk': the head weights were not loaded (check_model did not run)")
        weights = torch.tensor(self._head_set.weights, dtype=torch.float32, device=attention.device)
        if self.heads is None:
            used = torch.arange(weights.shape[0], device=attention.device)
        else:
            used = top_heads(weights, self.heads).sort().values
            weights = torch.zeros_like(weights).index_copy_(0, used, weights[used])
        return head_lib.hawk_scores(attention, weights), [used] * attention.shape[0]


def last_query_gravity(ctx: StageContext) -> torch.Tensor:
    """[B, V] RoPE-only logits between the last prompt token and the current visual tokens at the score
    layer (SparseVLM v2.0's divisor, methods.md §2.3 (a)), from the rotary tables that layer used."""
    signals = ctx.signals
    if signals is None or signals.score_input is None:
        raise RuntimeError("sparsevlm_priority needs the score layer's rotary tables; this stage has none")
    hidden, (cos, sin), _ = signals.score_input
    gravity = head_lib.rope_gravity(cos, sin, hidden.shape[1] - 1, signals.visual_index)
    if not bool((gravity > 0).all()):
        raise ValueError(
            f"sparsevlm_priority: the RoPE-only logit is {float(gravity.min()):.4g} <= 0 for some visual token "
            "(RoPE's all-ones logit changes sign at long distances for small head dims), so the gravity "
            "correction is undefined; pass options={'gravity': 'none'}"
        )
    return gravity
