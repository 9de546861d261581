"""Per-generation state of the pruned decoder loop, and per-call statistics.

Between a prefill and its decode steps the engine must remember, for every *segment* (a run of decoder
layers that hold the same tokens in their KV cache), the 2D padding mask of the kept prompt tokens and
how far its positions were shifted. That state belongs to one generation, so it is attached to the
cache object of that generation (``transformers_notes.md`` §5.5): a new ``generate`` call has a new
cache and starts clean. Everything stored is identical across beams of one prompt, so beam reordering
of the cache needs no special handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

STATE_ATTRIBUTE = "_finepruner_state"


@dataclass
class Segment:
    """Decoder layers ``start..`` (up to the next segment) after the pruning stage at ``start``.

    Attributes:
        start: first decoder layer of the segment.
        prompt_mask: [B, kept prompt length] 2D padding mask of the kept prompt tokens, or None when the
            prompt had no padding.
        kept_length: prompt tokens held by these layers' caches.
        position_shift: [B] amount subtracted from logical position ids (0 with original positions;
            the number of dropped tokens so far with renumbered positions).
    """

    start: int
    prompt_mask: torch.Tensor | None
    kept_length: int
    position_shift: torch.Tensor


@dataclass
class GenerationState:
    """State shared by a prefill and the decode steps that follow it on the same cache."""

    prompt_length: int
    segments: list[Segment]
    seen: int = 0


@dataclass
class PruneStats:
    """Token counts of the last prefill, per decoder layer, its analytic FLOPs and its selection time.

    Attributes:
        sequence_length: padded sequence length entering each decoder layer.
        visual_tokens: visual tokens per sample entering each decoder layer.
        batch: samples in the prefill.
        selection_seconds: wall time spent in the method's signals and selections (vision signals taken
            by the engine, attention signals, ``select``); CUDA is synchronised around it only when the
            handle's ``synchronize_timing`` is set (``finepruner bench`` does).
        score_lengths: tokens held by the score layer at each stage that computed an attention signal.
        score_keys_reused: per such stage, whether the signal reused the score layer's keys (its KV-cache
            entry, or its ``k_proj`` output captured while it ran) instead of running ``k_proj`` again:
            True when the score layer ran before the stage (FastV, FinePruner), False when it runs after
            it on the pruned tokens (PDrop scores with the next layer), and with ``score_impl="recompute"``
            or ``"eager"``.
        score_impl: ``"cheap"`` or ``"recompute"`` (one query row) or ``"eager"`` (materialised attention).
        crops: vision-tower crops encoded in the prefill over the whole batch (LLaVA-NeXT/OneVision: base +
            anyres tiles of every image, padded crops of ``pixel_values`` excluded; OneVision multi-image
            samples: one per image); None: inferred from ``visual_tokens[0]`` (one crop per image's 576
            tokens, exact on LLaVA-1.5). Used by ``flops`` for the vision tower and projector. Qwen-VL: the
            images encoded.
        vision_grids: Qwen-VL: the patch grid ``(t, h, w)`` of every image the tower encoded (its FLOPs
            depend on each image's grid and attention windows); None on the other families.
        config: the model's multimodal configuration (for ``flops``); not serialised.
    """

    sequence_length: list[int] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    batch: int = 1
    selection_seconds: float = 0.0
    score_lengths: list[int] = field(default_factory=list)
    score_keys_reused: list[bool] = field(default_factory=list)
    score_impl: str = "cheap"
    crops: int | None = None
    vision_grids: list[tuple[int, int, int]] | None = None
    config: Any = field(default=None, repr=False, compare=False)

    @property
    def average_visual_tokens(self) -> float:
        """Layer-averaged visual-token count (the "N tokens" of SparseVLM/PDrop, spec §0.3)."""
        return sum(self.visual_tokens) / max(1, len(self.visual_tokens))

    @property
    def flops(self) -> dict | None:
        """Analytic FLOPs of this prefill (``finepruner.bench.flops.prefill_report``): language model,
        scoring, LM head, vision tower and projector apart, first decode step; None without a config."""
        if self.config is None or not self.sequence_length:
            return None
        from finepruner.bench.flops import prefill_report  # pure Python, imported lazily

        return prefill_report(self.config, self.sequence_length, self.visual_tokens, self.batch,
                              self.score_lengths, self.score_impl, self.score_keys_reused, crops=self.crops,
                              vision_grids=self.vision_grids)

    def as_dict(self) -> dict:
        flops = self.flops
        if flops is not None:
            flops = {k: v for k, v in flops.items() if k != "layers"}
        return {
            "sequence_length": list(self.sequence_length),
            "visual_tokens": list(self.visual_tokens),
            "average_visual_tokens": self.average_visual_tokens,
            "batch": self.batch,
            "selection_seconds": self.selection_seconds,
            "flops": flops,
        }
