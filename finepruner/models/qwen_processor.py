"""A processor for Qwen2-VL / Qwen2.5-VL / Qwen3-VL images that needs no torchvision.

transformers' ``Qwen2_5_VLProcessor`` and ``Qwen3VLProcessor`` cannot be built without torchvision (their
video processor class does not resolve, ``spec/models.md`` §6). :class:`QwenImageProcessor` does what
they do for images and text, from a tokenizer and the PIL image processor ``Qwen2VLImageProcessorPil``:

* the image processor ``smart_resize``s each image to multiples of ``patch_size * merge_size`` within its
  pixel bounds (``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``) and returns
  ``pixel_values`` (all images' patches, concatenated) and ``image_grid_thw`` (one row per image);
* each ``<|image_pad|>`` of the text (in order over the whole batch) is expanded to
  ``grid.prod() // merge_size**2`` copies (the official ``replace_image_token``, §1.3);
* the text is tokenized with padding on the tokenizer's side (left, as ``load_model`` sets it), and
  ``mm_token_type_ids`` marks the image tokens with 1 (0 elsewhere; video tokens would be 2).

Videos are not supported (they need torchvision's video processor): passing one raises
``MissingPackageError`` naming ``pip install finepruner[qwen]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, Qwen2VLImageProcessorPil

__all__ = ["QwenImageProcessor", "image_token_count"]

_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
#: Image-processor keyword arguments a caller may override (``load_model(processor_kwargs=...)``).
IMAGE_PROCESSOR_KWARGS = ("min_pixels", "max_pixels", "size", "patch_size", "merge_size", "temporal_patch_size",
                          "image_mean", "image_std", "do_resize", "do_rescale", "do_normalize", "resample")


def image_token_count(grid_thw: Sequence[int] | torch.Tensor, merge_size: int) -> int:
    """Language-model tokens of one image of grid ``(t, h, w)`` (patches): ``t * h * w // merge_size**2``."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


def _flat_images(images: Any) -> list[Image.Image]:
    """One image, a flat list, or one list per prompt -> the images in placeholder order."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    flat: list[Image.Image] = []
    for item in images:
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            flat.extend(_flat_images(item))
        else:
            flat.append(item)
    return flat


class QwenImageProcessor:
    """Images + text -> Qwen-VL model inputs, equal to the official processor's output for images.

    Attributes:
        tokenizer: the model's tokenizer (padding side as set on it; ``load_model`` sets left).
        image_processor: a ``Qwen2VLImageProcessorPil`` (patch 14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
        chat_template: the Jinja chat template (the checkpoint's), used by :meth:`apply_chat_template`.
    """

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    vision_start_token = "<|vision_start|>"
    vision_end_token = "<|vision_end|>"

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: Any,
                 chat_template: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or type(self).image_token
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        self.video_token_id = int(tokenizer.convert_tokens_to_ids(self.video_token))
        if self.image_token_id == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {self.image_token} token; it is not a Qwen-VL tokenizer")

    # -- calling --------------------------------------------------------------------------------------
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, videos: Any = None,
                 padding: bool | str = True, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and, with images, ``pixel_values`` and
        ``image_grid_thw`` (the official processor's keys for images). ``images``: one image, a flat list
        in placeholder order, or one list per prompt. ``kwargs`` go to the image processor (e.g.
        ``min_pixels``/``max_pixels``) when they are image-processor options, else to the tokenizer."""
        if videos is not None:
            from finepruner.models.loading import MissingPackageError

            raise MissingPackageError(
                "video inputs need the official Qwen processor and its video processor, which need torchvision: "
                "pip install finepruner[qwen]"
            )
        if text is None:
            raise ValueError("QwenImageProcessor needs text= (the prompts, with one <|image_pad|> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        image_kwargs = {k: v for k, v in kwargs.items() if k in IMAGE_PROCESSOR_KWARGS}
        text_kwargs = {k: v for k, v in kwargs.items() if k not in IMAGE_PROCESSOR_KWARGS}
        flat = _flat_images(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat):
            raise ValueError(
                f"the prompts hold {placeholders} {self.image_token} placeholders but {len(flat)} images were "
                "given (one image per placeholder, in order)"
            )
        data: dict[str, Any] = {}
        counts: list[int] = []
        if flat:
            processed = self.image_processor(flat, return_tensors="pt", **image_kwargs)
            data["pixel_values"] = processed["pixel_values"]
            data["image_grid_thw"] = processed["image_grid_thw"]
            merge = int(image_kwargs.get("merge_size", self.image_processor.merge_size))
            counts = [image_token_count(grid, merge) for grid in processed["image_grid_thw"]]
        queue = iter(counts)
        expanded = []
        for prompt in texts:
            pieces = prompt.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.image_token * next(queue) + piece
            expanded.append(out)
        encoded = self.tokenizer(expanded, padding=padding, return_tensors="pt", **text_kwargs)
        ids = encoded["input_ids"]
        found = int((ids == self.image_token_id).sum())
        if found != sum(counts):
            raise ValueError(
                f"the tokenized prompts hold {found} {self.image_token} tokens, the images give {sum(counts)}: the "
                f"tokenizer must split {self.image_token} as a special token"
            )
        types = torch.zeros_like(ids)
        types[ids == self.image_token_id] = 1
        types[ids == self.video_token_id] = 2
        data = {"input_ids": ids, "attention_mask": encoded["attention_mask"], "mm_token_type_ids": types, **data}
        feature = BatchFeature(data)
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}; QwenImageProcessor returns 'pt' tensors only")
        return feature

    # -- text -----------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> Any:
        """The chat template applied to one conversation (content lists with ``{"type": "image"}`` entries
        give ``<|vision_start|><|image_pad|><|vision_end|>``, as the checkpoint's template writes them)."""
        if self.chat_template is None:
            raise ValueError("this Qwen processor has no chat template (the checkpoint has no chat_template file)")
        return self.tokenizer.apply_chat_template(list(conversation), chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                                  **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    # -- files ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path, **image_kwargs: Any) -> QwenImageProcessor:
        """Load the tokenizer, the image processor (``preprocessor_config.json``, or the ``image_processor``
        entry of ``processor_config.json``; ``image_kwargs`` such as ``min_pixels`` override it) and the chat
        template of a local checkpoint."""
        directory = Path(directory)
        unknown = sorted(set(image_kwargs) - set(IMAGE_PROCESSOR_KWARGS))
        if unknown:
            raise ValueError(
                f"processor_kwargs {unknown} are not image-processor options of the Qwen processor; allowed: "
                f"{', '.join(IMAGE_PROCESSOR_KWARGS)}"
            )
        tokenizer = AutoTokenizer.from_pretrained(directory)
        settings = _image_processor_settings(directory)
        settings.update(image_kwargs)
        image_processor = Qwen2VLImageProcessorPil(**settings)
        return cls(image_processor, tokenizer, chat_template=_chat_template(directory, tokenizer))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer, ``preprocessor_config.json`` and ``chat_template.jinja`` (files the official
        processor also reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        if self.chat_template is not None:
            (directory / "chat_template.jinja").write_text(self.chat_template)


def _image_processor_settings(directory: Path) -> dict[str, Any]:
    """The image processor's saved options (``preprocessor_config.json`` or ``processor_config.json``)."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = directory / name
        if not path.is_file():
            continue
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if key is not None:
            settings = settings.get(key)
        if isinstance(settings, dict):
            allowed = set(IMAGE_PROCESSOR_KWARGS)
            return {k: v for k, v in settings.items() if k in allowed}
    raise FileNotFoundError(
        f"checkpoint {directory} has no image processor settings (preprocessor_config.json or an image_processor "
        "entry in processor_config.json)"
    )


def _chat_template(directory: Path, tokenizer: Any) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, ``chat_template.json`` or the tokenizer's."""
    for name in _CHAT_TEMPLATE_FILES:
        path = directory / name
        if path.is_file():
            text = path.read_text()
            if name.endswith(".json"):
                try:
                    return json.loads(text)["chat_template"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path} has no chat_template entry: {err}") from err
            return text
    return getattr(tokenizer, "chat_template", None)
