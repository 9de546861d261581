"""Shared fixtures: tiny random LLaVA models built from config (no downloads)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finepruner.models.tiny import build_tiny_llava

#: Visual tokens per image of the tiny model, and its image token id.
NUM_VISUAL = 64
IMAGE_TOKEN_ID = 4
#: Greedy generation that returns the step scores, never emitting the image token.
GEN = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
       "suppress_tokens": [IMAGE_TOKEN_ID]}

PROMPTS = [
    "USER: <image> what color is the circle ? ASSISTANT:",
    "USER: <image> how many red objects are there in this image ? answer using a single word . ASSISTANT:",
    "USER: <image> is there a square ? ASSISTANT:",
]


def generate(model, inputs, **extra):
    """``model.generate`` with ``GEN`` (overridden by ``extra``), without gradients."""
    with torch.no_grad():
        return model.generate(**inputs, **{**GEN, **extra})


def assert_same_generation(pruned, reference, atol: float = 1e-5) -> None:
    """The same tokens, and every step's finite scores within ``atol``."""
    assert torch.equal(pruned.sequences, reference.sequences)
    for x, y in zip(pruned.scores, reference.scores, strict=True):
        finite = torch.isfinite(x)
        assert (x[finite] - y[finite]).abs().max().item() <= atol


def assert_row_equals_alone(alone, together, row: int, atol: float = 1e-4) -> None:
    """Row ``row`` of a batched generate equals the same sample generated alone: the new tokens, and every
    step's finite scores within ``atol``."""
    new = len(alone.scores)
    assert torch.equal(alone.sequences[0, -new:], together.sequences[row, -new:])
    for step, scores in enumerate(alone.scores):
        diff = (scores[0] - together.scores[step][row]).nan_to_num(0.0, 0.0, 0.0)
        assert diff.abs().max().item() <= atol


def logits_with_visual_tokens(model, inputs, projected: torch.Tensor) -> torch.Tensor:
    """Last-token logits of sample 0 of ``inputs`` with its image span replaced by ``projected``
    [n, D] (already through the projector; contiguous positions): the reference for methods that merge
    or pool tokens before the language model."""
    with torch.no_grad():
        ids = inputs["input_ids"][0]
        image = (ids == IMAGE_TOKEN_ID).nonzero()[:, 0]
        embed = model.model.get_input_embeddings()
        embeds = torch.cat([embed(ids[: image[0]]), projected, embed(ids[image[-1] + 1:])])[None]
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        return model.lm_head(hidden[:, -1])


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


@pytest.fixture
def no_model_load(monkeypatch) -> list[str]:
    """Make any model load fail the test, for checks that must report bad input before loading;
    returns the paths that something tried to load."""
    import finepruner
    import finepruner.models.loading as loading

    calls: list[str] = []

    def refuse(path, *args, **kwargs):
        calls.append(str(path))
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(finepruner, "load_model", refuse)
    return calls


class SelectionRecorder:
    """Wraps ``method.select`` so that every answer it gives (kept ids, or a ``Selection`` with inserted
    tokens) is kept in ``answers``, in call order."""

    def __init__(self, method) -> None:
        self.answers = []
        original = method.select

        def select(stage_index, stage, ctx):
            answer = original(stage_index, stage, ctx)
            self.answers.append(answer)
            return answer

        method.select = select
