"""Shared fixtures: tiny random LLaVA models built from config (no downloads)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finepruner.models.tiny import build_tiny_llava

PROMPTS = [
    "USER: <image> what color is the circle ? ASSISTANT:",
    "USER: <image> how many red objects are there in this image ? answer using a single word . ASSISTANT:",
    "USER: <image> is there a square ? ASSISTANT:",
]


def noise_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """Deterministic random RGB images."""
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy())
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) with sdpa attention and sharp (non-uniform) attention."""
    torch.set_num_threads(2)
    return build_tiny_llava(seed=0, qk_scale=8.0, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tiny_eager():
    """The same weights as ``tiny``, with eager attention."""
    return build_tiny_llava(seed=0, qk_scale=8.0, attn_implementation="eager")


@pytest.fixture(scope="session")
def batch(tiny):
    """A left-padded batch of three prompts (different lengths) with images."""
    _, processor = tiny
    return processor(images=noise_images(3), text=PROMPTS, return_tensors="pt", padding=True)


def single(processor, index: int):
    """Sample ``index`` of the batch, alone (no padding)."""
    return processor(images=noise_images(3)[index : index + 1], text=[PROMPTS[index]], return_tensors="pt")
