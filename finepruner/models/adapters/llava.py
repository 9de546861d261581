"""LLaVA-1.5 (``model_type="llava"``): CLIP ViT-L/14-336 with [CLS], 576 visual tokens per image, 1-D
positions, the exact ``vicuna_v1`` evaluation prompt (``spec/eval_protocol.md`` §1)."""

from __future__ import annotations

from typing import Any, ClassVar

from finepruner.models.adapters.base import ModelAdapter, register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    """llava-hf ``LlavaForConditionalGeneration``. Budgets count per sample (all images of a prompt
    together), as the official LLaVA-1.5 code of every method does."""

    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    model_class: ClassVar[str] = "LlavaForConditionalGeneration"
    config_class: ClassVar[str] = "LlavaConfig"
    per_image_budget: ClassVar[bool] = False
    description: ClassVar[str] = "LLaVA-1.5 (llava-hf/llava-1.5-*-hf): CLIP [CLS], 576 tokens per image"
    default_image_aspect_ratio: ClassVar[str] = "pad"  # LLaVA-1.5's expand2square (eval_protocol.md §1)
    conversation: ClassVar[str] = "vicuna_v1"

    def build_prompt(self, text: str, has_image: bool, processor: Any) -> str:
        """LLaVA's ``vicuna_v1`` conversation as a plain string (``finepruner.eval.prompting``), with the
        processor's image token."""
        from finepruner.eval.prompting import build_prompt

        return build_prompt(text, has_image, getattr(processor, "image_token", None) or "<image>")
