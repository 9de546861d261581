"""Qwen3-VL (``model_type="qwen3_vl"``), ``spec/models.md`` §1.4, §2.3.

The Qwen2.5-VL path (3-D positions, per-image budgets, the torchvision-free processor) with three
differences: 16-px patches and a tower without windows (learned position embeddings + 2-D RoPE), an
interleaved mRoPE (the model's rotary module recomposes it; gathering cos/sin is unchanged), q/k RMSNorm
in the decoder's attention (``engine.signals`` applies ``q_norm``/``k_norm`` wherever a layer has them),
and **deepstack**: the tower's extra mergers give one feature level per ``deepstack_visual_indexes`` entry,
and the text model adds level i to the visual tokens' hidden states after decoder layer i.

Deepstack under pruning (``DeepstackInjections``): the levels are kept per *source token* of the unpruned
prompt (``visual_pos_masks`` order). After decoder layer i the engine adds level i to every token still in
the sequence whose source is a visual token, so a pruning stage before layer i (pre-LLM: all levels;
FastV with K <= the last deepstack layer: the later ones) uses exactly the kept tokens' rows, in their new
(re-padded) layout. Tokens a method inserts (SparseVLM's merged tokens) have no source row and get none.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from finepruner.models.adapters.base import register_adapter
from finepruner.models.adapters.qwen2_5_vl import Qwen2_5_VLAdapter


class DeepstackInjections:
    """Qwen3-VL's deepstack levels of one prefill, applied to whatever tokens survive (see the module doc).

    Attributes:
        rows: [B, L0] long: each prefill token's row in the levels (row-major over ``visual_pos_masks``), -1
            for non-visual tokens.
        levels: one [N, D] tensor per injected decoder layer (0, 1, ...).
    """

    def __init__(self, visual_pos_masks: torch.Tensor, levels: list[torch.Tensor]) -> None:
        mask = visual_pos_masks.bool()
        rows = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        rows[mask] = torch.arange(int(mask.sum()), device=mask.device)
        self.rows = rows
        self.levels = list(levels)

    def after_layer(self, index: int, hidden: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, L, D] after decoder layer ``index``, with level ``index`` added to the tokens whose
        prefill source (``source_index`` [B, L], -1 for inserted and padding slots) is a visual token."""
        if index >= len(self.levels):
            return hidden
        rows = self.rows.to(source_index.device)
        level = rows.gather(1, source_index.clamp(min=0)).masked_fill(source_index < 0, -1)
        present = level >= 0
        if not bool(present.any()):
            return hidden
        embeds = self.levels[index].to(hidden.device, hidden.dtype)
        out = hidden.clone()
        out[present] = out[present] + embeds[level[present]]
        return out


@register_adapter
class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Hugging Face ``Qwen3VLForConditionalGeneration`` (images; video prompts are not pruned)."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    model_class: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    config_class: ClassVar[str] = "Qwen3VLConfig"
    description: ClassVar[str] = ("Qwen3-VL (Qwen/Qwen3-VL-*-Instruct): ViT + 2x2 merger + deepstack, no [CLS], "
                                  "interleaved 3-D mRoPE, q/k norm; budgets per image")
    windowed: ClassVar[bool] = False

    @classmethod
    def merger_vision_shape(cls, config) -> Any:
        """Qwen3-VL's tower: full attention, two-matrix MLPs, the main merger and one deepstack merger per
        ``deepstack_visual_indexes`` entry (the learned position-embedding lookup has no matrix product)."""
        from finepruner.bench.flops import MergerVisionShape

        vision = config.vision_config
        return MergerVisionShape(
            hidden=int(vision.hidden_size), intermediate=int(vision.intermediate_size), layers=int(vision.depth),
            patch=int(vision.patch_size), temporal_patch=int(vision.temporal_patch_size),
            channels=int(vision.in_channels), merge=int(vision.spatial_merge_size),
            out_hidden=int(vision.out_hidden_size), mergers=1 + len(vision.deepstack_visual_indexes),
        )

    def take_layer_injections(self, kwargs: dict[str, Any]) -> DeepstackInjections | None:
        """Pop ``visual_pos_masks``/``deepstack_visual_embeds`` (the text model's deepstack inputs) from the
        call's ``kwargs``; the levels of a prefill with images, else None."""
        mask = kwargs.pop("visual_pos_masks", None)
        levels = kwargs.pop("deepstack_visual_embeds", None)
        if mask is None or not levels:
            return None
        return DeepstackInjections(mask, levels)
