"""The toy Qwen2.5-VL: its shape, how to build it, and how its language model is taken from the toy LLaVA.

A stock ``Qwen2_5_VLForConditionalGeneration`` built from config (spec ``models.md`` §1.3, §2.2, §6):

* vision tower: 14-pixel patches, ``temporal_patch_size=2``, hidden 64, 4 blocks (windowed attention
  with 112-pixel windows, full attention in blocks 1 and 3), 2 x 2 merger into the language model's
  width. The image processor upsamples the 168-pixel scenes to 336 x 336 (``min_pixels = 336**2``), so
  the merged grid is 12 x 12 = **144 visual tokens**, one per 28-pixel cell half, exactly the toy
  LLaVA's 144 patches: budgets of 4/8/16/32 tokens are the same fractions on both toys.
* language model: the toy LLaVA's Llama decoder (hidden 128, 6 layers, 8 heads, SwiGLU 512,
  RMSNorm, RoPE base 10^6) copied weight for weight into Qwen2's decoder (same layout; Qwen2's q/k/v
  biases start at zero). With ``mrope_section = [2, 3, 3]`` (sum = head_dim / 2) the three mRoPE rows
  of a text token are equal, so text is rotated exactly as in the Llama decoder; image tokens get
  (t, h, w) positions.
* tokenizer: the toy's word-level vocabulary (same ids, so the embedding rows transfer), two words of
  Qwen's default system prompt, and Qwen's special tokens; no BOS (as Qwen's tokenizer), end of turn
  ``<|im_end|>``; Qwen2-VL's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from finepruner.models.qwen_processor import QwenImageProcessor
from finepruner.toy.scenes import GRID, PATCH
from finepruner.toy.text import VOCAB_WORDS

QWEN_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint_qwen2_5_vl"

#: Words of Qwen's default system prompt ("You are a helpful assistant.") missing from the toy vocabulary.
QWEN_EXTRA_WORDS = ("You", "system")
#: Qwen's special tokens, appended after the toy vocabulary (ids 90.. on the shipped vocabulary).
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>")
IMAGE_PAD = "<|image_pad|>"
SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen2-VL's chat template (default system prompt, one ``<|vision_start|><|image_pad|><|vision_end|>``
#: per image item, ``<|im_start|>assistant\n`` as the generation prompt).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ToyQwenSpec:
    """The toy Qwen2.5-VL's shape. ``image_size`` is what the processor resizes the 168-px scenes to."""

    image_size: int = 2 * GRID * PATCH  # 336: 24 x 24 patches of 14 px -> 12 x 12 merged tokens
    patch: int = PATCH
    merge: int = 2
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    window_size: int = 112
    fullatt_blocks: tuple[int, ...] = (1, 3)
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 8
    text_intermediate: int = 512
    max_positions: int = 1024
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (2, 3, 3)

    @property
    def merged_grid(self) -> int:
        return self.image_size // (self.patch * self.merge)


def build_toy_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The toy word-level vocabulary (same ids as the toy LLaVA's), Qwen's special tokens, no BOS,
    left padding, ``<|im_end|>`` as end of turn and Qwen2-VL's chat template."""
    from finepruner.models.tiny import build_tokenizer

    base = build_tokenizer(tuple(VOCAB_WORDS) + QWEN_EXTRA_WORDS, isolate_punctuation=True, add_bos=False)
    backend = base.backend_tokenizer
    # Added as special tokens so that runs such as <|image_pad|><|image_pad|> split (spec models.md §6).
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_toy_qwen_image_processor(spec: ToyQwenSpec | None = None) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's PIL image processor with pixel bounds that take a 168-px scene to 336 x 336 (144 tokens);
    larger or non-square images keep their aspect ratio up to 256 merged tokens."""
    spec = spec or ToyQwenSpec()
    unit = spec.patch * spec.merge
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": spec.image_size ** 2, "longest_edge": unit * unit * 256},
        patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2,
    )


def build_toy_qwen_config(spec: ToyQwenSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate, "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads, "num_key_value_heads": spec.text_heads,
            "max_position_embeddings": spec.max_positions, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta,
                                "mrope_section": list(spec.mrope_section)},
            "bos_token_id": ids("<|im_start|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": spec.vision_layers, "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate, "num_heads": spec.vision_heads,
            "out_hidden_size": spec.text_hidden, "patch_size": spec.patch, "spatial_merge_size": spec.merge,
            "temporal_patch_size": 2, "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_blocks),
        },
        image_token_id=ids(IMAGE_PAD), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


@dataclass
class ToyQwenParts:
    """A toy Qwen2.5-VL, its processor (``QwenImageProcessor``: tokenizer + ``Qwen2VLImageProcessorPil`` +
    chat template, the processor ``load_model`` uses without torchvision) and its spec."""

    model: Qwen2_5_VLForConditionalGeneration
    processor: QwenImageProcessor
    spec: ToyQwenSpec

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.processor.tokenizer


def build_toy_qwen(spec: ToyQwenSpec | None = None, seed: int = 0) -> ToyQwenParts:
    """An untrained toy Qwen2.5-VL (what ``toy-train --family qwen2_5_vl`` starts from)."""
    spec = spec or ToyQwenSpec()
    if sum(spec.mrope_section) * 2 != spec.text_hidden // spec.text_heads:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim / 2 = "
                         f"{spec.text_hidden // spec.text_heads // 2}")
    tokenizer = build_toy_qwen_tokenizer()
    config = build_toy_qwen_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    processor = QwenImageProcessor(build_toy_qwen_image_processor(spec), tokenizer, QWEN_CHAT_TEMPLATE)
    return ToyQwenParts(model, processor, spec)


#: Rows of new tokens initialised from an existing token's row (embedding and output head).
_ROW_FROM = {"<|im_end|>": "</s>", "<|im_start|>": "<s>", "<|image_pad|>": "<image>"}


@torch.no_grad()
def transfer_llava_language_model(qwen: Qwen2_5_VLForConditionalGeneration, llava, qwen_tokenizer,
                                  llava_tokenizer) -> list[str]:
    """Copy the toy LLaVA's Llama decoder into the toy Qwen's Qwen2 decoder (same layout; q/k/v biases set
    to zero). Token rows are matched by token string; Qwen tokens the LLaVA vocabulary lacks take the
    row of a token with the same role (``<|im_end|>`` <- ``</s>``, ``<|im_start|>`` <- ``<s>``,
    ``<|image_pad|>`` <- ``<image>``), else the embedding mean and ``<unk>``'s (never predicted) output
    row. Returns the names of the copied parameters."""
    src = llava.model.language_model
    dst = qwen.model.language_model
    if len(src.layers) != len(dst.layers):
        raise ValueError(f"layer counts differ: LLaVA {len(src.layers)}, Qwen {len(dst.layers)}")
    copied = []
    for i, (a, b) in enumerate(zip(src.layers, dst.layers, strict=True)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                     "post_attention_layernorm"):
            ma, mb = a.get_submodule(name), b.get_submodule(name)
            mb.weight.copy_(ma.weight)
            if getattr(mb, "bias", None) is not None:
                mb.bias.zero_()
            copied.append(f"layers.{i}.{name}")
    dst.norm.weight.copy_(src.norm.weight)
    src_emb, dst_emb = src.embed_tokens.weight, dst.embed_tokens.weight
    src_head, dst_head = llava.lm_head.weight, qwen.lm_head.weight
    src_vocab = llava_tokenizer.get_vocab()
    unk = src_vocab["<unk>"]
    for token, j in qwen_tokenizer.get_vocab().items():
        i = src_vocab.get(token, src_vocab.get(_ROW_FROM.get(token, ""), None))
        dst_emb[j] = src_emb[i] if i is not None else src_emb.mean(0)
        dst_head[j] = src_head[i] if i is not None else src_head[unk]
    copied += ["norm", "embed_tokens", "lm_head"]
    return copied


def qwen_checkpoint_dir() -> Path:
    """The shipped toy Qwen2.5-VL checkpoint folder."""
    if not (QWEN_CHECKPOINT_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the toy Qwen2.5-VL checkpoint is missing from the package ({QWEN_CHECKPOINT_DIR} has no "
            "model.safetensors); retrain it with `finepruner toy-train --family qwen2_5_vl` (docs/toy.md)"
        )
    return QWEN_CHECKPOINT_DIR
