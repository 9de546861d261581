"""Tiny random LLaVA-NeXT and LLaVA-OneVision models built from config, and their inputs.

Follows the tiny-from-config recipes of ``spec/models.md`` §6 (layouts: §1.1 NeXT, §1.2 OneVision). The
word-level tokenizer and vocabulary are those of :mod:`finepruner.models.tiny`. Nothing is downloaded.

* NeXT: CLIP 32-px crops of 8-px patches (4 x 4 = 16 tokens per crop, [CLS] dropped), a Llama decoder
  with GQA, a real ``LlavaNextProcessor`` (left padding, vicuna chat template).
* OneVision: SigLIP 32-px crops (16 tokens, no [CLS]), a Qwen2 decoder with GQA, the image processor and
  the tokenizer (``LlavaOnevisionProcessor`` needs torchvision, §6, so it is not built).

``next_inputs`` / ``onevision_inputs`` build model inputs without the processors' ``__call__``: each
``<image>`` is expanded to its image's token count (the processors' formula, mirrored from
``model.config``), prompts are tokenized with left padding and pixels come from the image processor,
so the result equals the processors' output (checked in ``tests/test_tiny_families.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution

from finepruner.models.tiny import DEFAULT_WORDS, build_tokenizer

__all__ = [
    "NEXT_CHAT_TEMPLATE",
    "NEXT_PINPOINTS",
    "ONEVISION_CHAT_TEMPLATE",
    "ONEVISION_PINPOINTS",
    "TinyNextSpec",
    "TinyOnevisionSpec",
    "TinyQwenSpec",
    "build_tiny_llava_next",
    "build_tiny_llava_onevision",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "build_tiny_qwen3_vl",
    "next_image_token_count",
    "next_inputs",
    "onevision_image_token_count",
    "onevision_inputs",
    "qwen_inputs",
    "tiny_image",
    "visual_token_counts",
]

#: Anyres resolutions (height, width) of the tiny NeXT: 2, 2, 4, 3 and 3 tiles of 32 px (§6).
NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
#: Anyres resolutions (height, width) of the tiny OneVision (§6).
ONEVISION_PINPOINTS: tuple[tuple[int, int], ...] = (
    (32, 32), (32, 64), (64, 32), (64, 64), (64, 96), (96, 64), (96, 96),
)

#: Vicuna-style template of llava-v1.6-vicuna: ``USER: <image>\n<text> ASSISTANT:``; a system message
#: is written as is, images of a turn come before its text.
NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Qwen-style template of llava-onevision-qwen2: ``<|im_start|>user <image>\n<text><|im_end|>``.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Extra special tokens of the OneVision tokenizer (added after the shared vocabulary).
ONEVISION_SPECIAL_TOKENS: tuple[str, ...] = ("<video>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinyNextSpec:
    """Shape of a tiny LLaVA-NeXT (§6): 32-px crops of 8-px patches, CLIP 32 x 3 layers, Llama 64 x 4
    layers with 4 query / 2 key-value heads. ``qk_scale`` sharpens LM attention (as in ``tiny.py``)."""

    crop: int = 32
    patch: int = 8
    pinpoints: tuple[tuple[int, int], ...] = NEXT_PINPOINTS
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 2048
    rope_theta: float = 10000.0
    qk_scale: float = 1.0
    add_bos: bool = True
    words: tuple[str, ...] = field(default=DEFAULT_WORDS)

    @property
    def grid(self) -> int:
        """Patches per crop side (4: 16 tokens per crop)."""
        return self.crop // self.patch


@dataclass(frozen=True)
class TinyOnevisionSpec:
    """Shape of a tiny LLaVA-OneVision (§6): 32-px crops of 8-px patches, SigLIP 32 x 2 layers (no head),
    Qwen2 64 x 4 layers with 4 query / 2 key-value heads. ``vision_aspect_ratio`` is ``anyres_max_N``
    (§1.2: grids above N crops' worth are downsampled; with the default pinpoints only N < 9 triggers it)."""

    crop: int = 32
    patch: int = 8
    pinpoints: tuple[tuple[int, int], ...] = ONEVISION_PINPOINTS
    vision_aspect_ratio: str = "anyres_max_9"
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 2048
    rope_theta: float = 1000000.0
    qk_scale: float = 1.0
    words: tuple[str, ...] = field(default=(*DEFAULT_WORDS, "system"))

    @property
    def grid(self) -> int:
        """Patches per crop side (4: 16 tokens per crop)."""
        return self.crop // self.patch


def _pinpoint_lists(pinpoints: Sequence[Sequence[int]]) -> list[list[int]]:
    return [[int(h), int(w)] for h, w in pinpoints]


def _init_model(model_class: type, config: Any, seed: int, attn: str, qk_scale: float) -> Any:
    """Build ``model_class(config)`` with weights drawn from ``seed`` (the caller's RNG is left as it was)."""
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.set_attn_implementation(attn)
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model.eval()


def build_tiny_llava_next(
    spec: TinyNextSpec | None = None, seed: int = 0, attn: str = "sdpa", **overrides: Any
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random tiny LLaVA-NeXT and its real ``LlavaNextProcessor`` (§6; left padding, vicuna chat
    template). ``overrides`` replace fields of ``spec``; the same ``seed`` gives the same weights for
    every ``attn``."""
    spec = replace(spec or TinyNextSpec(), **overrides)
    pinpoints = _pinpoint_lists(spec.pinpoints)
    tokenizer = build_tokenizer(spec.words, add_bos=spec.add_bos)
    tokenizer.chat_template = NEXT_CHAT_TEMPLATE
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.crop},
        crop_size={"height": spec.crop, "width": spec.crop},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=NEXT_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        image_size=spec.crop,
        patch_size=spec.patch,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=spec.grid * spec.grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _init_model(LlavaNextForConditionalGeneration, config, seed, attn, spec.qk_scale)
    return model, processor


def build_tiny_llava_onevision(
    spec: TinyOnevisionSpec | None = None, seed: int = 0, attn: str = "sdpa", **overrides: Any
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil, PreTrainedTokenizerFast]:
    """A random tiny LLaVA-OneVision, its image processor and its tokenizer (§6; left padding, Qwen
    chat template on the tokenizer, ``<video>`` and ``<|im_start|>``/``<|im_end|>`` as special tokens).
    ``overrides`` replace fields of ``spec``; the same ``seed`` gives the same weights for every ``attn``."""
    spec = replace(spec or TinyOnevisionSpec(), **overrides)
    pinpoints = _pinpoint_lists(spec.pinpoints)
    tokenizer = build_tokenizer(spec.words)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ONEVISION_SPECIAL_TOKENS)})
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": spec.crop, "width": spec.crop}, image_grid_pinpoints=pinpoints
    )
    vision = SiglipVisionConfig(
        image_size=spec.crop,
        patch_size=spec.patch,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=spec.vision_aspect_ratio,
    )
    model = _init_model(LlavaOnevisionForConditionalGeneration, config, seed, attn, spec.qk_scale)
    return model, image_processor, tokenizer


# -- token counts (the processors' formulas, §1.1-§1.2) ------------------------------------------------


def _unpadded_grid(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """Rows and columns of the anyres feature grid left after removing the letterbox (§1.1; the
    processors' ``_get_unpadded_features``, equal to the models' ``unpad_image``)."""
    if width / height > grid_w / grid_h:
        new_height = int(round(height * (grid_w / width), 7))
        grid_h -= 2 * ((grid_h - new_height) // 2)
    else:
        new_width = int(round(width * (grid_h / height), 7))
        grid_w -= 2 * ((grid_w - new_width) // 2)
    return grid_h, grid_w


def _anyres_grid(config: Any, height: int, width: int) -> tuple[int, int, int]:
    """(patches per crop side, feature-grid rows, feature-grid columns) of an image of ``height`` x
    ``width`` under ``config.image_grid_pinpoints``."""
    crop = config.vision_config.image_size
    side = crop // config.vision_config.patch_size
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    return side, side * (best_h // crop), side * (best_w // crop)


def next_image_token_count(config: LlavaNextConfig, height: int, width: int) -> int:
    """LLM tokens of one image of ``height`` x ``width`` px in LLaVA-NeXT (§1.1): base crop + unpadded
    tile grid + one newline per grid row, [CLS] dropped (``vision_feature_select_strategy="default"``)."""
    if config.vision_feature_select_strategy != "default":
        raise ValueError("the NeXT count is defined for vision_feature_select_strategy='default' (§1.1)")
    side, grid_h, grid_w = _anyres_grid(config, height, width)
    rows, cols = _unpadded_grid(height, width, grid_h, grid_w)
    return side * side + rows * cols + rows


def onevision_image_token_count(
    config: LlavaOnevisionConfig, height: int, width: int, multi_image: bool = False
) -> int:
    """LLM tokens of one image of ``height`` x ``width`` px in LLaVA-OneVision (§1.2): in a multi-image
    sample base only + 1 newline; otherwise base + unpadded grid (downsampled when it exceeds
    ``anyres_max_N`` crops' worth) + one newline per row."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    extra = -1 if config.vision_feature_select_strategy == "default" else 0
    if multi_image:
        return side * side + 1 + extra
    side, grid_h, grid_w = _anyres_grid(config, height, width)
    rows, cols = _unpadded_grid(height, width, grid_h, grid_w)
    max_crops = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_crops * side * side))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * cols + rows + extra


def visual_token_counts(model: Any, inputs: dict[str, torch.Tensor]) -> list[int]:
    """Tokens per image as the model itself packs them (``get_image_features(...).pooler_output``), for
    checking the counts the input builders wrote into ``input_ids``."""
    kwargs = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **kwargs)
    return [len(f) for f in features.pooler_output]


# -- input builders ------------------------------------------------------------------------------------

ImagesArg = Sequence[Sequence[Image.Image] | Image.Image | None]


def _per_prompt_images(prompts: Sequence[str], images: ImagesArg, image_token: str) -> list[list[Image.Image]]:
    """One list of images per prompt (``None`` or ``[]``: text only; an ``Image``: one image), checked
    against the prompt's ``<image>`` placeholders."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings")
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists (one per prompt, [] for none)")
    rows: list[list[Image.Image]] = []
    for index, (prompt, row) in enumerate(zip(prompts, images, strict=True)):
        row_list = [] if row is None else [row] if isinstance(row, Image.Image) else list(row)
        if prompt.count(image_token) != len(row_list):
            raise ValueError(
                f"prompt {index} holds {prompt.count(image_token)} {image_token} placeholders "
                f"but {len(row_list)} images were given for it"
            )
        rows.append(row_list)
    return rows


def _expand_and_tokenize(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], counts: Sequence[int], image_token: str
) -> dict[str, torch.Tensor]:
    """Replace the i-th ``<image>`` of the batch by ``counts[i]`` copies, tokenize, pad on the left."""
    queue = iter(counts)
    texts = []
    for prompt in prompts:
        pieces = prompt.split(image_token)
        text = pieces[0]
        for piece in pieces[1:]:
            text += image_token * next(queue) + piece
        texts.append(text)
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _check_pinpoints(config: Any, image_processor: Any) -> None:
    if _pinpoint_lists(config.image_grid_pinpoints) != _pinpoint_lists(image_processor.image_grid_pinpoints):
        raise ValueError("the image processor's image_grid_pinpoints differ from the model config's")


def next_inputs(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    prompts: Sequence[str],
    images: ImagesArg,
) -> dict[str, torch.Tensor]:
    """LLaVA-NeXT inputs equal to ``processor(images=flat, text=prompts, padding=True)`` (§1.1):
    ``input_ids``/``attention_mask`` (left-padded, each ``<image>`` expanded to its image's count),
    ``pixel_values`` [num_images, max_crops, 3, H, W] (zero crops pad the shorter images) and
    ``image_sizes`` [num_images, 2] (height, width). ``images`` has one entry per prompt (a list, one
    image, or ``None``); without any image only the text keys are returned."""
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    image_token = processor.image_token
    rows = _per_prompt_images(prompts, images, image_token)
    flat = [image for row in rows for image in row]
    pixels: dict[str, torch.Tensor] = {}
    counts: list[int] = []
    if flat:
        _check_pinpoints(model.config, image_processor)
        processed = image_processor(flat, do_pad=True, return_tensors="pt")
        pixels = {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}
        counts = [next_image_token_count(model.config, int(h), int(w)) for h, w in pixels["image_sizes"]]
    return {**_expand_and_tokenize(tokenizer, prompts, counts, image_token), **pixels}


def onevision_inputs(
    model: LlavaOnevisionForConditionalGeneration,
    image_processor: LlavaOnevisionImageProcessorPil,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    images: ImagesArg,
) -> dict[str, torch.Tensor]:
    """LLaVA-OneVision inputs equal to ``LlavaOnevisionProcessor(images=<one list per prompt>, ...)``
    (§1.2): as :func:`next_inputs` plus ``batch_num_images`` (images per sample, text-only samples left
    out as the image processor does). A sample with 2+ images is encoded base-only (16 + 1 tokens per
    image, one crop); a single-image sample gets the anyres layout."""
    image_token = tokenizer.image_token
    rows = _per_prompt_images(prompts, images, image_token)
    pixels: dict[str, torch.Tensor] = {}
    counts: list[int] = []
    if any(rows):
        _check_pinpoints(model.config, image_processor)
        processed = image_processor([row for row in rows if row], return_tensors="pt")
        pixels = {key: processed[key] for key in ("pixel_values", "image_sizes", "batch_num_images")}
        multi = [len(row) > 1 for row in rows for _ in row]
        counts = [
            onevision_image_token_count(model.config, int(h), int(w), multi_image=m)
            for (h, w), m in zip(pixels["image_sizes"].tolist(), multi, strict=True)
        ]
    return {**_expand_and_tokenize(tokenizer, prompts, counts, image_token), **pixels}


# -- test images ---------------------------------------------------------------------------------------


def tiny_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image of ``width`` x ``height`` px: a colour gradient plus noise drawn from
    ``seed`` (so different seeds and sizes give different features)."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None, None]
    xs = torch.linspace(0, 1, width)[None, :, None]
    phase = torch.rand(3, generator=generator)
    gradient = 0.5 + 0.25 * torch.sin(6.28 * (ys * phase + xs * (1 - phase) + phase))
    noise = 0.25 * torch.rand(height, width, 3, generator=generator)
    array = ((gradient + noise).clamp(0, 1) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


# -- Qwen2.5-VL / Qwen3-VL (§1.3-§1.4, §6) ---------------------------------------------------------------

#: Special tokens of the tiny Qwen tokenizers (added after the shared vocabulary; split without spaces).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
)

#: Qwen2-VL-style chat template (``<|im_start|>role\n...<|im_end|>``, a default system turn, each image as
#: ``<|vision_start|><|image_pad|><|vision_end|>`` where it appears in the content).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Shape of a tiny Qwen2.5-VL or Qwen3-VL (§6): a 2-block (Qwen3: 3-block) vision tower of 14-px
    (Qwen3: 16-px) patches merged 2 x 2, window attention over 56-px windows (2 x 2 merged tokens) with one
    full-attention block (Qwen2.5), a GQA decoder with mRoPE sections [2, 3, 3] of head_dim 16.
    ``min_pixels``/``max_pixels`` bound the image area in units of (patch * merge)^2 pixels."""

    vision_depth: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_heads: int = 2
    window_size: int = 56
    fullatt_blocks: tuple[int, ...] = (1,)
    deepstack_layers: tuple[int, ...] = (0, 1)
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: tuple[int, ...] = (2, 3, 3)
    max_positions: int = 4096
    rope_theta: float = 1000000.0
    min_units: int = 4
    max_units: int = 64
    qk_scale: float = 1.0
    words: tuple[str, ...] = field(default=(*DEFAULT_WORDS, "system", "user", "You", "are"))


def _qwen_tokenizer(spec: TinyQwenSpec) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(spec.words)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.image_token = "<|image_pad|>"  # the shared tokenizer names LLaVA's <image>
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _qwen_processor(spec: TinyQwenSpec, tokenizer: PreTrainedTokenizerFast, patch: int):
    from finepruner.models.qwen_processor import QwenImageProcessor

    unit = (patch * 2) ** 2
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": unit * spec.min_units, "longest_edge": unit * spec.max_units},
        patch_size=patch, merge_size=2, temporal_patch_size=2,
    )
    return QwenImageProcessor(image_processor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


def _qwen_text(spec: TinyQwenSpec, tokenizer: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "mrope_section": list(spec.mrope_section),
                         "rope_theta": spec.rope_theta},
        **extra,
    )


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids


def build_tiny_qwen2_5_vl(spec: TinyQwenSpec | None = None, seed: int = 0, attn: str = "sdpa",
                          **overrides: Any) -> tuple[Any, Any]:
    """A random tiny Qwen2.5-VL and its processor (``finepruner.models.qwen_processor.QwenImageProcessor``,
    left padding; §6). ``overrides`` replace fields of ``spec``; the same ``seed`` gives the same weights for
    every ``attn``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = replace(spec or TinyQwenSpec(), **overrides)
    tokenizer = _qwen_tokenizer(spec)
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                  num_heads=spec.vision_heads, out_hidden_size=spec.text_hidden, window_size=spec.window_size,
                  fullatt_block_indexes=list(spec.fullatt_blocks), patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = Qwen2_5_VLConfig(text_config=_qwen_text(spec, tokenizer), vision_config=vision,
                              **_qwen_token_ids(tokenizer))
    model = _init_model(Qwen2_5_VLForConditionalGeneration, config, seed, attn, spec.qk_scale)
    return model, _qwen_processor(spec, tokenizer, 14)


def build_tiny_qwen2_vl(spec: TinyQwenSpec | None = None, seed: int = 0, attn: str = "sdpa",
                        **overrides: Any) -> tuple[Any, Any]:
    """A random tiny Qwen2-VL (full-attention vision blocks, §6) and its processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    spec = replace(spec or TinyQwenSpec(), **overrides)
    tokenizer = _qwen_tokenizer(spec)
    vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
                  num_heads=spec.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=_qwen_text(spec, tokenizer), vision_config=vision,
                           **_qwen_token_ids(tokenizer))
    model = _init_model(Qwen2VLForConditionalGeneration, config, seed, attn, spec.qk_scale)
    return model, _qwen_processor(spec, tokenizer, 14)


def build_tiny_qwen3_vl(spec: TinyQwenSpec | None = None, seed: int = 0, attn: str = "sdpa",
                        **overrides: Any) -> tuple[Any, Any]:
    """A random tiny Qwen3-VL (16-px patches, learned position embeddings, deepstack mergers after vision
    blocks ``deepstack_layers``, q/k RMSNorm in the decoder; §6) and its processor."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    spec = replace(spec or TinyQwenSpec(), **overrides)
    tokenizer = _qwen_tokenizer(spec)
    vision = dict(depth=max(spec.vision_depth, 3), hidden_size=spec.vision_hidden,
                  intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads,
                  out_hidden_size=spec.text_hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=16, deepstack_visual_indexes=list(spec.deepstack_layers))
    head_dim = spec.text_hidden // spec.text_heads
    config = Qwen3VLConfig(text_config=_qwen_text(spec, tokenizer, head_dim=head_dim), vision_config=vision,
                           **_qwen_token_ids(tokenizer))
    model = _init_model(Qwen3VLForConditionalGeneration, config, seed, attn, spec.qk_scale)
    return model, _qwen_processor(spec, tokenizer, 16)


def qwen_inputs(processor: Any, prompts: Sequence[str], images: ImagesArg) -> dict[str, torch.Tensor]:
    """Qwen-VL inputs for ``prompts`` (each image written ``<|vision_start|><|image_pad|><|vision_end|>``)
    and one image list per prompt: the processor's output (left padding)."""
    rows = _per_prompt_images(prompts, images, processor.image_token)
    flat = [image for row in rows for image in row]
    return dict(processor(text=list(prompts), images=flat or None, padding=True, return_tensors="pt"))


def qwen_chat_inputs(
    processor: Any, questions: Sequence[str], images: Sequence[Sequence[Any]]
) -> dict[str, torch.Tensor]:
    """:func:`qwen_inputs` for one user turn per row, through the processor's chat template: the row's
    images (``{"type": "image"}`` each) then its question, with the generation prompt."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [*({"type": "image"} for _ in row), {"type": "text", "text": question}]}],
        add_generation_prompt=True) for question, row in zip(questions, images, strict=True)]
    return qwen_inputs(processor, prompts, [list(row) for row in images])
