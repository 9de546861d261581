"""Where things live inside a llava-hf ``LlavaForConditionalGeneration`` (transformers 5.x).

The engine and the methods reach the language model, the vision tower and the image token only through
this adapter, so that supporting another layout means changing one file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlavaAdapter:
    """Read-only view of a LLaVA model's parts and shapes."""

    model: nn.Module

    def __post_init__(self) -> None:
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "language_model") or not hasattr(inner, "vision_tower"):
            raise TypeError(
                f"{type(self.model).__name__} is not a llava-hf LlavaForConditionalGeneration "
                "(expected .model.language_model and .model.vision_tower)"
            )

    @property
    def llava_model(self) -> nn.Module:
        """The ``LlavaModel`` (vision tower + projector + language model, no LM head)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder-only language model (e.g. ``LlamaModel``) whose layers the engine runs."""
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens one image contributes (576 for LLaVA-1.5), from the vision config."""
        vision = self.model.config.vision_config
        grid = int(vision.image_size) // int(vision.patch_size)
        extra = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        return grid * grid + extra

    def image_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Boolean [batch, length] mask of ``<image>`` positions, as ``LlavaModel.get_placeholder_mask``."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        if inputs_embeds is None:
            return None
        embedding = self.llava_model.get_input_embeddings()
        image_embed = embedding(torch.tensor(self.image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embed.to(inputs_embeds.dtype)).all(-1)
