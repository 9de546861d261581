"""Token ranking with a selected subset of attention heads (FinePruner-Head, spec ``heads.md`` §1.3).

Shared by every attention-scored method that accepts ``heads=``/``strategy=``: per sample, the heads are
chosen from that sample's last-query attention to the visual tokens (``finepruner.heads``), and the
token scores average only those heads (or weight them by a softmax of their scores).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finepruner import heads as head_lib
from finepruner.methods.base import StageContext, top_k_sorted


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
        options: further strategy options (e.g. ``{"definitions": "original"}``, ``{"k": 10}``).
    """

    strategy: str = "all"
    heads: int | None = None
    aggregation: str = "mean"
    heads_from: str | Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.aggregation not in head_lib.AGGREGATION_MODES:
            raise ValueError(f"aggregation={self.aggregation!r}; allowed: {head_lib.AGGREGATION_MODES}")
        if self.heads_from is not None:
            self.strategy = "calibrated"
        info = head_lib.strategy_info(self.strategy)  # raises on unknown names, listing them
        head_lib.api.validate_options(info, {k: v for k, v in self.options.items() if k != "head_set"})
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
    ) -> HeadGuidance:
        """Build from a method's keyword parameters (``definitions`` and ``seed`` join the options)."""
        extra = dict(options or {})
        if definitions is not None:
            extra["definitions"] = definitions
        if seed is not None:
            extra["seed"] = seed
        return cls(strategy, heads, aggregation, heads_from, extra)

    def select_tokens(self, ctx: StageContext, keep: int) -> torch.Tensor:
        """Kept visual tokens of a stage: top-``keep`` of the guided token scores (heads recorded in
        ``ctx.heads`` unless every head is used)."""
        extra = {"kept_tokens": keep} if self.strategy == "dynamic" else None
        scores, chosen = self.token_scores(ctx.attention, extra)
        if self.strategy != "all":
            ctx.heads = chosen
        return top_k_sorted(scores, keep)

    def as_dict(self) -> dict[str, Any]:
        """The guidance parameters, JSON-serialisable (recorded with runs)."""
        return {
            "strategy": self.strategy,
            "heads": self.heads,
            "aggregation": self.aggregation,
            "heads_from": str(self.heads_from) if self.heads_from is not None else None,
            "options": dict(self.options),
        }

    def check_model(self, num_heads: int, num_layers: int, num_visual: int, layer: int) -> None:
        """Validate H and a calibrated head set against the model before anything runs."""
        if self.heads is not None and (isinstance(self.heads, bool) or not 1 <= int(self.heads) <= num_heads):
            raise ValueError(f"heads={self.heads!r} is not allowed; this model has {num_heads} heads per layer")
        if self.heads_from is not None:
            self._head_set = head_lib.load_head_set(
                self.heads_from, num_heads=num_heads, layer=layer, num_layers=num_layers, num_visual=num_visual
            )
            if self.heads is None:
                raise ValueError("heads_from= needs heads=H: how many of the calibrated heads to use")
        elif head_lib.strategy_info(self.strategy).heads == "required" and self.heads is None:
            raise ValueError(f"strategy {self.strategy!r} needs heads=H (1..{num_heads})")

    def token_scores(
        self, attention: torch.Tensor, extra_options: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Token scores [B, V] and the chosen heads per sample, from attention [B, heads, V]."""
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
