"""Models for ``finepruner bench``: named shapes built with random weights (no download), the toy
checkpoint, a tiny test shape, or a local checkpoint; and synthetic inputs built as the processor would.

Named shapes (``SHAPES``): ``llava-1.5-7b`` and ``llava-1.5-13b`` (CLIP ViT-L/14-336 + Vicuna), and
``medium``, a CPU-sized model with LLaVA-1.5's 576-token grid (image 336, patch 14), a small CLIP tower
and the decoder of ``spec/transformers_notes.md`` §6 (hidden 1024, 8 layers, 16 heads, MLP 2816, vocab
32064). LLaVA-NeXT (``spec/models.md`` §1.1): ``llava-next-7b`` (CLIP ViT-L/14-336 + Vicuna-7B, the
llava-hf pinpoints) and ``next-medium`` (``medium``'s decoder and CLIP tower, 336-px crops of 14-px
patches, ``image_grid_pinpoints=[[672, 672]]``); their synthetic image is a square 672-px image: base
576 + 2 x 2 tiles 2,304 + 48 newlines = 2,928 visual tokens, 5 crops through the tower (the closest HF
layout to the papers' 2,880, which drop unpadding and newlines). ``tiny`` is ``build_tiny_llava()``'s
default (64 visual tokens), for tests.

Qwen-VL (``QWEN_SHAPES``, ``spec/models.md`` §1.3-§1.4; sizes of the released checkpoints' config.json):
``qwen2.5-vl-7b`` (Qwen2.5-VL-7B-Instruct: 32-block windowed ViT of 1280, 28-layer decoder of 3584 with
28/4 heads) and ``qwen3-vl-8b`` (Qwen3-VL-8B-Instruct: 27-block ViT of 1152 with deepstack at blocks 8,
16, 24; 36-layer decoder of 4096 with 32/8 heads and q/k norm), and ``qwen-medium``, a CPU-sized Qwen2.5-VL
(``medium``'s decoder, a 4-block windowed ViT of 256). Their synthetic image is a 1008 x 1008 square:
36 x 36 = 1,296 visual tokens (CDPruner's Qwen2.5-VL setting, §5.1), written as the processor would
(``<|vision_start|>``, the image tokens, ``<|vision_end|>``, ``mm_token_type_ids``, ``image_grid_thw``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig
from transformers.image_processing_utils import select_best_resolution

from finepruner.models.adapters import adapter_class, adapter_for

IMAGE_TOKEN_ID = 32000  # llava-hf's <image> id (vocab 32064)
#: llava-hf's LLaVA-NeXT anyres resolutions, (height, width) (``LlavaNextConfig``'s default, §1.1).
NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class Shape:
    """A LLaVA layout: CLIP vision tower, two-layer projector, Llama decoder; ``model_type`` names the
    family (its adapter gives the transformers classes), ``pinpoints`` the anyres resolutions of the
    families that tile images (none: one crop per image, LLaVA-1.5) and ``image`` the synthetic image
    (height, width) the bench feeds them."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    vocab: int = 32064
    image_size: int = 336
    patch: int = 14
    text_kv_heads: int | None = None
    # a CLIP text tower of comparable size for CDPruner (hidden, layers, heads, projection)
    clip_text: tuple[int, int, int, int] = (768, 12, 12, 768)
    model_type: str = "llava"
    pinpoints: tuple[tuple[int, int], ...] = ()
    image: tuple[int, int] | None = None


_CLIP_L = {"vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16, "vision_intermediate": 4096}
_VICUNA_7B = {"text_hidden": 4096, "text_layers": 32, "text_heads": 32, "text_intermediate": 11008}
_MEDIUM = {"text_hidden": 1024, "text_layers": 8, "text_heads": 16, "text_intermediate": 2816, "vision_hidden": 256,
           "vision_layers": 4, "vision_heads": 4, "vision_intermediate": 1024, "clip_text": (256, 4, 4, 256)}

SHAPES: dict[str, Shape] = {
    "llava-1.5-7b": Shape(**_VICUNA_7B, **_CLIP_L),
    "llava-1.5-13b": Shape(text_hidden=5120, text_layers=40, text_heads=40, text_intermediate=13824, **_CLIP_L),
    "medium": Shape(**_MEDIUM),
    "llava-next-7b": Shape(**_VICUNA_7B, **_CLIP_L, model_type="llava_next", pinpoints=NEXT_PINPOINTS,
                           image=(672, 672)),
    "next-medium": Shape(**_MEDIUM, model_type="llava_next", pinpoints=((672, 672),), image=(672, 672)),
}


@dataclass(frozen=True)
class QwenShape:
    """A Qwen-VL layout: ``model_type`` (``qwen2_5_vl``, ``qwen3_vl``), the text config and the vision config
    (keyword arguments of the family's configuration classes), and the synthetic image side in pixels."""

    model_type: str
    text: tuple[tuple[str, object], ...]
    vision: tuple[tuple[str, object], ...]
    image: int = 1008
    #: image, video, vision-start and vision-end token ids (the checkpoints'; within ``vocab_size``)
    token_ids: tuple[int, int, int, int] = (151655, 151656, 151652, 151653)

    def config(self):
        """The family's multimodal configuration."""
        config_class = getattr(transformers, adapter_class(self.model_type).config_class)
        image, video, start, end = self.token_ids
        return config_class(text_config=dict(self.text), vision_config=dict(self.vision), image_token_id=image,
                            video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)


def _items(**values) -> tuple[tuple[str, object], ...]:
    return tuple(values.items())


QWEN_SHAPES: dict[str, QwenShape] = {
    "qwen2.5-vl-7b": QwenShape("qwen2_5_vl", _items(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    ), _items(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2, hidden_act="silu")),
    "qwen3-vl-8b": QwenShape("qwen3_vl", _items(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                         "rope_theta": 5000000.0},
    ), _items(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
              deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"), image=1024),
    "qwen-medium": QwenShape("qwen2_5_vl", _items(
        vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
    ), _items(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=1024, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3]),
        token_ids=(32000, 32001, 32002, 32003)),
}
#: Every model name ``finepruner bench --model`` accepts besides a local checkpoint directory.
MODEL_NAMES: tuple[str, ...] = (*SHAPES, *QWEN_SHAPES, "toy", "tiny")


def shape_config(shape: Shape):
    """The configuration of a named shape, of its family's class (``LlavaConfig``, ``LlavaNextConfig``),
    with LLaVA's feature settings (layer -2, [CLS] dropped) and the shape's anyres pinpoints."""
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads or shape.text_heads, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    grid = shape.image_size // shape.patch
    config_class = getattr(transformers, adapter_class(shape.model_type).config_class)
    anyres = {"image_grid_pinpoints": [list(p) for p in shape.pinpoints]} if shape.pinpoints else {}
    return config_class(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, image_seq_length=grid * grid,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu", **anyres,
    )


def build_shape(name: str, dtype: torch.dtype, device: str, attn: str = "sdpa", seed: int = 0):
    """A random-weight model of a named shape, built directly on ``device`` in ``dtype``."""
    shape = SHAPES[name] if name in SHAPES else QWEN_SHAPES[name]
    config = shape_config(shape) if isinstance(shape, Shape) else shape.config()
    config._attn_implementation = attn
    model_class = getattr(transformers, adapter_class(shape.model_type).model_class)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation(attn)
    return model.eval()


def load_bench_model(name: str, dtype: torch.dtype, device: str, attn: str = "sdpa", seed: int = 0):
    """``(model, tokenizer or None, description)`` for ``--model``: a named shape, ``toy``, ``tiny`` or a
    local llava-hf checkpoint directory."""
    if name in SHAPES or name in QWEN_SHAPES:
        return build_shape(name, dtype, device, attn, seed), None, f"{name} shape, random weights"
    if name == "tiny":
        from finepruner.models.tiny import build_tiny_llava

        model, processor = build_tiny_llava(seed=seed, attn_implementation=attn)
        return model.to(device=device, dtype=dtype), processor.tokenizer, "tiny random LLaVA (64 visual tokens)"
    from finepruner.models.loading import load_model

    if name != "toy" and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(
            f"--model {name!r} is neither a named shape ({', '.join(MODEL_NAMES)}) nor a local checkpoint directory"
        )
    model, processor = load_model(name, dtype=dtype, device=device, attn_implementation=attn)
    return model, processor.tokenizer, ("toy checkpoint" if name == "toy" else "local checkpoint")


def toy_available() -> bool:
    """Whether the shipped toy checkpoint is present."""
    try:
        from finepruner.toy.model import checkpoint_dir

        checkpoint_dir()
    except (ImportError, FileNotFoundError):
        return False
    return True


def clip_text_for(model, shape_name: str | None):
    """A random CLIP text tower sized like the real one for CDPruner's relevance (tiny ones for small
    models); None when ``finepruner.models.clip_text`` is missing."""
    try:
        from finepruner.models.clip_text import build_tiny_clip_text
    except ImportError:
        return None
    vision_hidden = int(model.config.vision_config.hidden_size)
    if shape_name in QWEN_SHAPES:  # CDPruner's relevance there is the LLM-embedding rule: no CLIP tower
        return None
    if shape_name in SHAPES:
        hidden, layers, heads, projection = SHAPES[shape_name].clip_text
        return build_tiny_clip_text(vision_hidden, projection_dim=projection, hidden=hidden, layers=layers,
                                    heads=heads, max_positions=77)
    return build_tiny_clip_text(vision_hidden, max_positions=77)


#: The instruction of the synthetic prompts (CDPruner's text tower reads it).
INSTRUCTION = "what color is the circle on the left of the image ?"


def synthetic_image_size(config) -> tuple[int, int] | None:
    """(height, width) of the bench's synthetic image for a model whose configuration tiles images
    (``image_grid_pinpoints``): the named shape's ``image`` where the pinpoints are a named shape's,
    else the largest pinpoint (672 x 672 for llava-hf NeXT); None for one-crop models (LLaVA-1.5)."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return None
    points = [(int(h), int(w)) for h, w in pinpoints]
    for shape in SHAPES.values():
        if shape.image is not None and list(shape.pinpoints) == points:
            return shape.image
    return max(points, key=lambda p: (p[0] * p[1], -abs(p[0] - p[1])))


def anyres_crops(config, height: int, width: int) -> int:
    """Vision-tower crops of one ``height`` x ``width`` image under ``config.image_grid_pinpoints``: the
    base crop + the tiles of the best resolution (``select_best_resolution``, as the image processor)."""
    crop = int(config.vision_config.image_size)
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    return 1 + (best_h // crop) * (best_w // crop)


def synthetic_crops(inputs: dict) -> int:
    """Crops through the vision tower for the synthetic ``inputs`` of :func:`synthetic_inputs` (whole
    batch; no image of them is padded): images x crops per image (Qwen-VL: the images)."""
    if "image_grid_thw" in inputs:
        return int(inputs["image_grid_thw"].shape[0])
    pixels = inputs["pixel_values"]
    return int(pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1))


def synthetic_visual_tokens(model, inputs: dict) -> int:
    """Visual tokens of each sample of the synthetic ``inputs`` (every sample has the same image)."""
    mask = adapter_for(model).image_mask(inputs["input_ids"], None)
    return int(mask.sum(dim=1).max())


def _image_tokens(model, pixels: torch.Tensor, sizes: torch.Tensor) -> int:
    """One image's visual tokens as the model itself packs them (anyres unpadding and newlines)."""
    adapter = adapter_for(model)
    with torch.inference_mode():
        features = adapter.encode_images(adapter.llava_model, {"pixel_values": pixels, "image_sizes": sizes})
    return len(features.pooler_output[0])


def synthetic_inputs(model, batch: int, system_tokens: int, text_tokens: int, device: str, dtype: torch.dtype,
                     seed: int = 0) -> dict:
    """LLaVA's prompt layout with random ids: ``system_tokens`` (incl. BOS) + the image tokens of one
    image + ``text_tokens``; every sample the same length (no padding); random pixel values.

    Models that tile images (LLaVA-NeXT's ``image_grid_pinpoints``) get what their processor would give
    for one :func:`synthetic_image_size` image per sample: ``pixel_values`` [batch, crops, 3, H, W] (base +
    tiles), ``image_sizes`` [batch, 2] and the image's exact token count in ``input_ids`` (the model's
    own packing: 2,928 for a 672-px square on 336-px crops)."""
    adapter = adapter_for(model)
    config = model.config
    if adapter.position_rows == 3:
        return _qwen_inputs(model, batch, system_tokens, text_tokens, device, dtype, seed)
    vocab = int(config.text_config.vocab_size)
    image_id = adapter.image_token_id
    generator = torch.Generator().manual_seed(seed)
    low = 5 if vocab > 10 else 0

    def random_ids(count: int) -> torch.Tensor:
        ids = torch.randint(low, vocab, (batch, count), generator=generator)
        return torch.where(ids == image_id, torch.full_like(ids, low), ids)

    bos = config.text_config.bos_token_id if config.text_config.bos_token_id is not None else 1
    vision = config.vision_config
    channels, side = int(getattr(vision, "num_channels", 3)), int(vision.image_size)
    size = synthetic_image_size(config)
    extra: dict[str, torch.Tensor] = {}
    if size is None:
        pixels = torch.randn(batch, channels, side, side, generator=generator)
        count = adapter.num_visual_tokens
    else:
        crops = anyres_crops(config, *size)
        pixels = torch.randn(batch, crops, channels, side, side, generator=generator)
        sizes = torch.tensor([list(size)] * batch)
        param = next(model.parameters())
        count = _image_tokens(model, pixels[:1].to(device=param.device, dtype=param.dtype), sizes[:1])
        extra["image_sizes"] = sizes.to(device)
    image = torch.full((batch, count), image_id)
    ids = torch.cat([torch.full((batch, 1), int(bos)), random_ids(system_tokens - 1), image,
                     random_ids(text_tokens)], dim=1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
        **extra,
    }


def qwen_image_side(config) -> int:
    """The synthetic image side (pixels) for a Qwen-VL configuration: its named shape's, else 1008 (Qwen2/2.5,
    36 x 36 tokens) or 1024 (patch 16: 32 x 32)."""
    for shape in QWEN_SHAPES.values():
        if shape.model_type == config.model_type and dict(shape.vision).get("depth") == config.vision_config.depth:
            return shape.image
    return 1024 if int(config.vision_config.patch_size) == 16 else 1008


def _qwen_inputs(model, batch: int, system_tokens: int, text_tokens: int, device: str, dtype: torch.dtype,
                 seed: int) -> dict:
    """Qwen-VL inputs as its processor gives them for one square image per sample: ``system_tokens`` random
    ids, ``<|vision_start|>``, the image's (side / 28)^2 tokens (Qwen3: / 32), ``<|vision_end|>``,
    ``text_tokens`` random ids; ``pixel_values`` [patches, C * T * P * P], ``image_grid_thw`` and
    ``mm_token_type_ids``."""
    config = model.config
    vision = config.vision_config
    patch, merge, temporal = int(vision.patch_size), int(vision.spatial_merge_size), int(vision.temporal_patch_size)
    grid = qwen_image_side(config) // patch
    count = grid * grid // (merge * merge)
    generator = torch.Generator().manual_seed(seed)
    special = {int(config.image_token_id), int(config.video_token_id), int(config.vision_start_token_id),
               int(config.vision_end_token_id)}
    vocab = int(config.text_config.vocab_size)

    def random_ids(length: int) -> torch.Tensor:
        ids = torch.randint(5, min(vocab, 151000), (batch, length), generator=generator)
        for token in special:
            ids = torch.where(ids == token, torch.full_like(ids, 5), ids)
        return ids

    ids = torch.cat([random_ids(system_tokens), torch.full((batch, 1), int(config.vision_start_token_id)),
                     torch.full((batch, count), int(config.image_token_id)),
                     torch.full((batch, 1), int(config.vision_end_token_id)), random_ids(text_tokens)], dim=1)
    channels = int(getattr(vision, "in_channels", 3))
    pixels = torch.randn(batch * grid * grid, channels * temporal * patch * patch, generator=generator)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": (ids == int(config.image_token_id)).long().to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch).to(device),
    }
