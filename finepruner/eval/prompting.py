"""LLaVA-1.5 prompt and image preprocessing for evaluation (spec ``eval_protocol.md`` section 1).

The ``vicuna_v1`` conversation as a plain string (what the llava-hf chat template produces), and
``image_aspect_ratio="pad"``: the image is padded to a square with the image processor's mean colour
before the processor resizes it (LLaVA's ``expand2square``), the default for LLaVA-1.5 checkpoints.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_ASPECT_RATIOS = ("pad", "original")


def build_prompt(text: str, has_image: bool = True, image_token: str = "<image>") -> str:
    """``SYSTEM USER: <image>\\n{text} ASSISTANT:`` (no ``<image>`` line for text-only questions)."""
    user = f"{image_token}\n{text}" if has_image else text
    return f"{SYSTEM} USER: {user} ASSISTANT:"


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square, centring the image, with colour ``background`` (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def image_background(processor: Any) -> tuple[int, int, int]:
    """The processor's mean colour as 0-255 RGB (CLIP's mean for LLaVA-1.5)."""
    image_processor = getattr(processor, "image_processor", processor)
    mean = getattr(image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]
