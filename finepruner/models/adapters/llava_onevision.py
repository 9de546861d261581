"""LLaVA-OneVision (``model_type="llava_onevision"``, ``spec/models.md`` §1.2).

SigLIP tower without [CLS] (feature layer -1, strategy ``"full"``), Qwen2 text model, 1-D positions.
A single-image sample is encoded anyres (base + unpadded grid, bilinearly shrunk beyond 9 crops, one
newline per row); as soon as a sample has two images every image is base-only plus one newline
(``batch_num_images``). Budgets are per image; newline tokens count as visual tokens.
"""

from __future__ import annotations

from typing import ClassVar

from finepruner.models.adapters.base import ModelAdapter, register_adapter


@register_adapter
class LlavaOnevisionAdapter(ModelAdapter):
    """llava-hf ``LlavaOnevisionForConditionalGeneration`` (images; video prompts are not pruned)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    model_class: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"
    config_class: ClassVar[str] = "LlavaOnevisionConfig"
    per_image_budget: ClassVar[bool] = True
    description: ClassVar[str] = ("LLaVA-OneVision (llava-hf/llava-onevision-*-hf): SigLIP without [CLS], "
                                  "anyres_max_9, image_newline; budgets per image")
    processor_requires: ClassVar[tuple[tuple[str, str], ...]] = (("torchvision", "onevision"),)
    encoder_kwargs: ClassVar[tuple[str, ...]] = (
        "image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
        "batch_num_images",
    )

    @classmethod
    def has_cls(cls, config) -> bool:
        return False

    def vision_signals_supported(self) -> frozenset[str]:
        """Each image's projected features (its rows of the language model's input, newline tokens
        included); the tower-side signals are per crop and are not mapped through the packing yet."""
        return frozenset({"projected_features"})

    def vision_unsupported_reason(self) -> str:
        return ("the vision tower's signals are per crop and are not yet mapped through anyres packing, "
                "unpadding and newline tokens")

    @classmethod
    def max_tokens(cls, config) -> int:
        """Base crop plus at most 9 crops' worth of grid (anyres_max_9 shrinks larger grids) with one
        newline per row, bounded by the largest pinpoint grid."""
        crop = int(config.vision_config.image_size)
        side = crop // int(config.vision_config.patch_size)
        best = max(((h // crop) * side) * ((w // crop) * side + 1) for h, w in config.image_grid_pinpoints)
        return cls.crop_tokens(config) + min(best, 9 * side * side + 3 * side + 1)
