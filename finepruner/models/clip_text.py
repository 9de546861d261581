"""CLIP's text tower and visual projection, for CDPruner's instruction relevance (spec ``methods.md`` §5.1).

llava-hf checkpoints ship only CLIP's vision tower. CDPruner also needs, from the *same* CLIP checkpoint
(``openai/clip-vit-large-patch14-336`` for LLaVA-1.5): ``CLIPTextModelWithProjection``, its tokenizer, and
the ``visual_projection`` matrix that maps vision features into the joint space. ``load_clip_text(PATH)``
reads them from a local CLIP checkpoint directory (never downloads); ``build_tiny_clip_text`` builds a
random tiny one from config for tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
)

from finepruner.models.tiny import DEFAULT_WORDS

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"


@dataclass
class ClipText:
    """CLIP's text side plus the vision projection: what CDPruner needs beyond the LLaVA model.

    Attributes:
        text_model: a ``CLIPTextModelWithProjection`` (``text_embeds`` in the joint space).
        tokenizer: its tokenizer (adds the start/end tokens).
        visual_projection: CLIP's ``visual_projection`` (vision hidden size -> joint space, no bias).
    """

    text_model: nn.Module
    tokenizer: object
    visual_projection: nn.Module

    @property
    def segment_length(self) -> int:
        """Tokens per text segment (CLIP's ``max_position_embeddings``, 77)."""
        return int(self.text_model.config.max_position_embeddings)

    def to(self, device: torch.device | str) -> ClipText:
        self.text_model.to(device)
        self.visual_projection.to(device)
        return self

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """One [M_i, P] float32 tensor of segment embeddings per text.

        As the official code: each text is tokenised whole (no truncation), zero-padded (ids and mask)
        to a multiple of ``segment_length`` and cut into segments, which the text tower encodes; all
        segments of all texts run in one batch.
        """
        device = next(self.text_model.parameters()).device
        chunks, counts = [], []
        size = self.segment_length
        for text in texts:
            encoded = self.tokenizer(text=[text], return_tensors="pt")
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            segments = (ids.shape[1] - 1) // size + 1
            padding = segments * size - ids.shape[1]
            ids = torch.cat([ids, ids.new_zeros((1, padding))], dim=1).reshape(-1, size)
            mask = torch.cat([mask, mask.new_zeros((1, padding))], dim=1).reshape(-1, size)
            chunks.append((ids, mask))
            counts.append(segments)
        ids = torch.cat([c[0] for c in chunks]).to(device)
        mask = torch.cat([c[1] for c in chunks]).to(device)
        embeds = self.text_model(input_ids=ids, attention_mask=mask).text_embeds.float()
        return list(embeds.split(counts))

    @torch.no_grad()
    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """``visual_projection`` of post-layernorm vision features, in float32 (as the official code)."""
        weight = self.visual_projection.weight.to(device=features.device, dtype=torch.float32)
        return features.float() @ weight.T


def as_clip_text(value) -> ClipText:
    """A ``ClipText`` from itself or from a ``(text_model, tokenizer, visual_projection)`` tuple."""
    if isinstance(value, ClipText):
        return value
    if isinstance(value, tuple | list) and len(value) == 3:
        return ClipText(*value)
    raise TypeError(
        "clip_text must be a finepruner.models.clip_text.ClipText or a (text_model, tokenizer, "
        f"visual_projection) tuple, got {type(value).__name__}"
    )


def _read_tensor(directory: Path, key: str) -> torch.Tensor | None:
    """One tensor from a checkpoint directory's (possibly sharded) safetensors or pytorch weights."""
    index = directory / "model.safetensors.index.json"
    files = []
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
        files = [directory / shard] if shard else []
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    for file in files:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            if key in handle.keys():
                return handle.get_tensor(key)
    for name in ("pytorch_model.bin",):
        if (directory / name).is_file():
            state = torch.load(directory / name, map_location="cpu", weights_only=True)
            if key in state:
                return state[key]
    return None


class _ClipTextTower(CLIPTextModelWithProjection):
    """The text tower read out of a full CLIP checkpoint: its vision weights are expected to be left
    behind, so transformers' load report does not list them as unexpected."""

    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]


def load_clip_text(path: str | Path, dtype: torch.dtype | None = None) -> ClipText:
    """Load the text tower, tokenizer and ``visual_projection`` of a local CLIP checkpoint directory.

    The directory must hold a full CLIP checkpoint (``CLIPModel`` layout, e.g. a local copy of
    ``openai/clip-vit-large-patch14-336``: ``config.json``, weights with ``text_model.*``,
    ``text_projection.weight`` and ``visual_projection.weight``, and tokenizer files). Nothing is
    downloaded. ``dtype`` defaults to float32, like the official ``from_pretrained`` call.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"clip_model={str(path)!r} is not a local directory; pass the directory of a CLIP checkpoint "
            "(e.g. a local copy of openai/clip-vit-large-patch14-336, the tower LLaVA-1.5 was trained with)"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"CLIP checkpoint {directory} has no config.json")
    text_model = _ClipTextTower.from_pretrained(
        directory, dtype=dtype or torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    weight = _read_tensor(directory, "visual_projection.weight")
    if weight is None:
        raise ValueError(
            f"CLIP checkpoint {directory} has no visual_projection.weight; CDPruner needs a full CLIP "
            "checkpoint (CLIPModel layout with both towers and both projections)"
        )
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        projection.weight.copy_(weight)
    return ClipText(text_model.eval(), tokenizer, projection.eval())


def build_clip_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer that adds CLIP's start and end tokens (for tiny models)."""
    vocab: dict[str, int] = {}
    for token in (BOS, EOS, UNK, *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=EOS
    )


def _tiny_configs(tokenizer, vision_hidden, projection_dim, hidden, layers, heads, max_positions):
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=1,
        num_attention_heads=1, image_size=8, patch_size=4, projection_dim=projection_dim,
    )
    return text, vision


def build_tiny_clip_text(
    vision_hidden: int = 32,
    *,
    projection_dim: int = 16,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 16,
    seed: int = 0,
) -> ClipText:
    """A random tiny ``ClipText`` built from config (no download).

    ``vision_hidden`` must equal the LLaVA vision tower's hidden size. ``max_positions`` is the segment
    length (77 in real CLIP; small here so that tests exercise several segments).
    """
    tokenizer = build_clip_tokenizer()
    text, _ = _tiny_configs(tokenizer, vision_hidden, projection_dim, hidden, layers, heads, max_positions)
    torch.manual_seed(seed)
    text_model = CLIPTextModelWithProjection(text).eval()
    projection = nn.Linear(vision_hidden, projection_dim, bias=False)
    nn.init.normal_(projection.weight, std=vision_hidden**-0.5)
    return ClipText(text_model, tokenizer, projection.eval())


def save_tiny_clip_checkpoint(directory: str | Path, vision_hidden: int = 32, *, seed: int = 0, **kwargs) -> Path:
    """Write a random tiny full CLIP checkpoint (``CLIPModel`` + tokenizer) to ``directory``, for tests of
    ``load_clip_text``. ``kwargs`` as ``build_tiny_clip_text``."""
    options = {"projection_dim": 16, "hidden": 32, "layers": 2, "heads": 2, "max_positions": 16, **kwargs}
    tokenizer = build_clip_tokenizer()
    text, vision = _tiny_configs(tokenizer, vision_hidden, **options)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=options["projection_dim"]))
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
