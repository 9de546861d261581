"""Tiny random LLaVA models built from config, for tests and CPU demos.

Follows the recipe of ``spec/transformers_notes.md`` §1: a CLIP vision tower, LLaVA's two-layer
projector and a Llama decoder, with a word-level tokenizer and a real ``LlavaProcessor``. Nothing is
downloaded. ``grid=24`` gives LLaVA-1.5's 24 x 24 = 576 visual-token layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

#: A small English vocabulary so that prompts of the LLaVA template tokenize to real ids.
DEFAULT_WORDS = tuple(
    """a an the chat between curious user and artificial intelligence assistant . , ? ! : ; ' " USER: ASSISTANT:
    USER ASSISTANT gives helpful detailed polite answers to user's questions what is of in on at there are
    how many color shape which this that image picture question answer single word or phrase using yes no
    red green blue yellow purple orange white black gray brown circle square triangle star left right top
    bottom one two three four five six seven eight nine ten zero letter text object objects any describe
    A B C D E F G H option options choose from following correct please""".split()
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Shape of a tiny LLaVA. Defaults give a fast CPU model with 8 x 8 = 64 visual tokens."""

    grid: int = 8
    patch: int = 4
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int | None = None
    text_intermediate: int = 128
    max_positions: int = 1024
    rope_theta: float = 10000.0
    words: tuple[str, ...] = field(default=DEFAULT_WORDS)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch


def build_tokenizer(
    words: tuple[str, ...] = DEFAULT_WORDS, isolate_punctuation: bool = False, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA's special tokens (``tok.image_token`` is ``<image>``), padding on
    the left. Words split on whitespace (and punctuation, with ``isolate_punctuation``); ``add_bos``
    prepends ``<s>`` as Llama's tokenizer does."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    splitters = [pre_tokenizers.WhitespaceSplit()]
    if isolate_punctuation:
        splitters.append(pre_tokenizers.Punctuation(behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splitters) if len(splitters) > 1 else splitters[0]
    backend.decoder = decoders.WordPiece(prefix="##")
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """A ``LlavaProcessor`` whose image processor resizes to the spec's square input."""
    size = spec.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def build_config(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The ``LlavaConfig`` of a tiny model (LLaVA-1.5 feature settings: layer -2, CLS dropped)."""
    vision = CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch,
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
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
        num_key_value_heads=spec.text_kv_heads or spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=spec.grid * spec.grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_llava(
    spec: TinyLlavaSpec | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    qk_scale: float = 1.0,
    **overrides,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a random tiny LLaVA and its processor (padding on the left).

    ``overrides`` replace fields of ``spec`` (e.g. ``grid=24`` for 576 visual tokens). ``qk_scale``
    multiplies the language model's q/k projection weights so that attention is far from uniform,
    which makes top-k selections stable in tests (``spec/transformers_notes.md`` §5.8).
    """
    spec = spec or TinyLlavaSpec()
    if overrides:
        spec = TinyLlavaSpec(**{**spec.__dict__, **overrides})
    tokenizer = build_tokenizer(spec.words)
    processor = build_processor(spec, tokenizer)
    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    if qk_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model.eval(), processor
