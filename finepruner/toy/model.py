"""The toy LLaVA: its shape, how to build it untrained, and where the shipped checkpoint lives.

``finepruner.load_model("toy")`` resolves the checkpoint through :func:`checkpoint_dir`. The shipped
folder also holds a tiny CLIP *text* tower (``clip_text/``), trained contrastively against the vision
tower's projected [CLS] embedding, for CDPruner's instruction relevance: load it with
:func:`load_clip_text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from finepruner.models.tiny import TinyLlavaSpec, build_config, build_processor
from finepruner.toy.scenes import GRID, PATCH
from finepruner.toy.text import build_toy_tokenizer

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
CLIP_TEXT_SUBDIR = "clip_text"


@dataclass(frozen=True)
class ToySpec(TinyLlavaSpec):
    """The toy model's shape: 12 x 12 = 144 visual tokens of 14-pixel patches (168-pixel images)."""

    grid: int = GRID
    patch: int = PATCH
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 8
    text_intermediate: int = 512
    max_positions: int = 1024
    rope_theta: float = 1e6
    projection_dim: int = 64
    clip_text_layers: int = 2


def build_toy_llava(spec: ToySpec | None = None, seed: int = 0) -> tuple[LlavaForConditionalGeneration,
                                                                          LlavaProcessor]:
    """An untrained toy LLaVA and its processor (what ``toy-train`` starts from)."""
    spec = spec or ToySpec()
    tokenizer = build_toy_tokenizer()
    processor = build_processor(spec, tokenizer)
    config = build_config(spec, tokenizer)
    config.vision_config.intermediate_size = spec.vision_intermediate
    config.vision_config.projection_dim = spec.projection_dim
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor


class ToyClipText(torch.nn.Module):
    """CLIP-style text tower + the vision tower's ``visual_projection`` (as CDPruner loads them).

    ``text_embeds(texts)`` gives one embedding per text; ``patch_embeds(feats, vision_tower)`` maps
    penultimate-layer patch features into the joint space as CDPruner does:
    ``visual_projection(post_layernorm(feats))``.
    """

    def __init__(self, text_model: CLIPTextModelWithProjection, visual_projection: torch.nn.Linear,
                 tokenizer: PreTrainedTokenizerFast):
        super().__init__()
        self.text_model = text_model
        self.visual_projection = visual_projection
        self.tokenizer = tokenizer

    @property
    def eos_id(self) -> int:
        return self.text_model.config.eos_token_id

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Word-level ids with ``<s>`` prepended and one end marker (the pad id) appended, right padded."""
        ids = [self.tokenizer(t)["input_ids"][: self.text_model.config.max_position_embeddings - 1]
               + [self.eos_id] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        device = self.text_model.text_projection.weight.device
        enc = {k: v.to(device) for k, v in self.encode(texts).items()}
        return self.text_model(**enc).text_embeds

    def patch_embeds(self, feats: torch.Tensor, vision_tower) -> torch.Tensor:
        return self.visual_projection(vision_tower.post_layernorm(feats))


def build_clip_text(spec: ToySpec, tokenizer: PreTrainedTokenizerFast, vision_hidden: int) -> ToyClipText:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.projection_dim,
        intermediate_size=4 * spec.projection_dim,
        num_hidden_layers=spec.clip_text_layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        projection_dim=spec.projection_dim,
        # The pooled token is the first occurrence of eos_token_id; </s> has id 2, which CLIP treats as
        # the legacy "argmax of input ids" rule, so the end marker is the pad token.
        eos_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_model = CLIPTextModelWithProjection(config)
    projection = torch.nn.Linear(vision_hidden, spec.projection_dim, bias=False)
    return ToyClipText(text_model, projection, tokenizer)


def build_clip_text_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer with ``<s> ... <pad>`` added: the text tower pools at its first ``<pad>``."""
    tok = build_toy_tokenizer()
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A <pad>", special_tokens=[("<s>", tok.bos_token_id), ("<pad>", tok.pad_token_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<pad>", pad_token="<pad>",
    )


def save_clip_text(clip_text: ToyClipText, directory: Path) -> None:
    """Write the text tower where ``finepruner.models.clip_text.load_clip_text`` reads it: the text
    model's config and tokenizer, and one ``model.safetensors`` with ``text_model.*``,
    ``text_projection.weight`` and ``visual_projection.weight``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip_text.text_model.config.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in clip_text.text_model.state_dict().items()}
    state["visual_projection.weight"] = clip_text.visual_projection.weight.detach().contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    build_clip_text_tokenizer().save_pretrained(directory)


def checkpoint_dir() -> Path:
    """The shipped toy checkpoint folder (``finepruner.load_model("toy")`` loads it)."""
    if not (CHECKPOINT_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the toy checkpoint is missing from the package ({CHECKPOINT_DIR} has no model.safetensors); "
            "retrain it with `finepruner toy-train --out finepruner/toy/checkpoint` (see docs/toy.md)"
        )
    return CHECKPOINT_DIR


def clip_text_dir(directory: str | Path | None = None) -> Path:
    """The shipped CLIP text tower folder: pass it as CDPruner's ``clip_model``."""
    return (Path(directory) if directory is not None else checkpoint_dir()) / CLIP_TEXT_SUBDIR


def load_clip_text(directory: str | Path | None = None):
    """The toy CLIP text tower as the engine's ``ClipText`` (CDPruner's ``clip_text=``)."""
    from finepruner.models.clip_text import load_clip_text as load

    return load(clip_text_dir(directory))
