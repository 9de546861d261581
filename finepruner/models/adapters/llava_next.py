"""LLaVA-NeXT / LLaVA-1.6 (``model_type="llava_next"``, ``spec/models.md`` §1.1).

Anyres: each image is a base crop (576 tokens at 336 px) plus the tiles of the best grid pinpoint,
unpadded, with one ``image_newline`` token after each unpadded row; the newline tokens share the
``<image>`` id, so they are visual tokens for every method (counted in the image's budget). Counts differ
per image (aspect ratio), hence per sample; budgets are per image. CLIP tower with [CLS], 1-D positions.
"""

from __future__ import annotations

from typing import ClassVar

from finepruner.models.adapters.base import ModelAdapter, register_adapter


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    """llava-hf ``LlavaNextForConditionalGeneration`` (vicuna, mistral or other text models)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    model_class: ClassVar[str] = "LlavaNextForConditionalGeneration"
    config_class: ClassVar[str] = "LlavaNextConfig"
    per_image_budget: ClassVar[bool] = True
    description: ClassVar[str] = ("LLaVA-NeXT (llava-hf/llava-v1.6-*-hf): CLIP [CLS], anyres crops, unpadded, "
                                  "image_newline; budgets per image")

    def vision_signals_supported(self) -> frozenset[str]:
        """Each image's projected features (its rows of the language model's input, newline tokens
        included); the tower-side signals are per crop and are not mapped through the packing yet."""
        return frozenset({"projected_features"})

    def vision_unsupported_reason(self) -> str:
        return ("the vision tower's signals are per crop and are not yet mapped through anyres packing, "
                "unpadding and newline tokens")

    @classmethod
    def max_tokens(cls, config) -> int:
        """Base crop plus the largest pinpoint grid with one newline per row (no unpadding)."""
        crop = int(config.vision_config.image_size)
        side = crop // int(config.vision_config.patch_size)
        best = max(((h // crop) * side) * ((w // crop) * side + 1) for h, w in config.image_grid_pinpoints)
        return cls.crop_tokens(config) + best
