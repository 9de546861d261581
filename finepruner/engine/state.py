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

    def segment_starts(self) -> dict[int, Segment]:
        return {segment.start: segment for segment in self.segments}


@dataclass
class PruneStats:
    """Token counts of the last prefill, per decoder layer.

    Attributes:
        sequence_length: padded sequence length entering each decoder layer.
        visual_tokens: visual tokens per sample entering each decoder layer.
    """

    sequence_length: list[int] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)

    @property
    def average_visual_tokens(self) -> float:
        """Layer-averaged visual-token count (the "N tokens" of SparseVLM/PDrop, spec §0.3)."""
        return sum(self.visual_tokens) / max(1, len(self.visual_tokens))

    def as_dict(self) -> dict:
        return {
            "sequence_length": list(self.sequence_length),
            "visual_tokens": list(self.visual_tokens),
            "average_visual_tokens": self.average_visual_tokens,
        }
