"""Models dispatched by accelerate (``device_map``): layers whose weights are offloaded (to disk here,
the only split this CPU machine allows) sit on ``meta`` until their hook loads them; the engine's signals
and gathers must follow each layer's execution device (``docs/models.md``, "Several devices")."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.engine.signals import execution_device
from finepruner.models.tiny import build_tiny_llava
from tests.conftest import GEN, PROMPTS, assert_same_generation, noise_images

accelerate = pytest.importorskip("accelerate")

CASES = [
    ("vanilla", {}),
    ("fastv", {"tokens": 16}),
    ("finepruner", {"tokens": 16, "heads": 2}),
    ("pdrop", {"tokens": 24}),
    ("sparsevlm", {"layers": [0, 1, 2], "keeps": [30, 20, 10]}),
    ("dart", {"tokens": 16}),
    ("vispruner", {"tokens": 16}),
    ("divprune", {"tokens": 16}),
]


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """(reference generations, the same model with decoder layers 1-2 offloaded to disk, inputs)."""
    model, processor = build_tiny_llava(seed=0, qk_scale=8.0, attn_implementation="sdpa")
    inputs = processor(images=noise_images(3), text=PROMPTS, return_tensors="pt", padding=True)
    reference = {}
    for name, params in CASES:
        with finepruner.apply(model, name, **params), torch.no_grad():
            reference[name] = model.generate(**inputs, **GEN)
    lm = "model.language_model"
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{lm}.embed_tokens": "cpu",
                  f"{lm}.layers.0": "cpu", f"{lm}.layers.1": "disk", f"{lm}.layers.2": "disk",
                  f"{lm}.layers.3": "cpu", f"{lm}.norm": "cpu", f"{lm}.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(model, device_map=device_map, main_device="cpu",
                                           offload_dir=str(tmp_path_factory.mktemp("offload")))
    return reference, dispatched, inputs


def test_offloaded_layers_hold_no_weights_between_calls(offloaded):
    _, model, _ = offloaded
    q_proj = model.model.language_model.layers[1].self_attn.q_proj
    assert q_proj.weight.device.type == "meta"
    assert execution_device(q_proj) == torch.device("cpu")


@pytest.mark.parametrize(("name", "params"), CASES)
def test_offloaded_model_prunes_as_the_plain_one(offloaded, name, params):
    reference, model, inputs = offloaded
    with finepruner.apply(model, name, **params), torch.no_grad():
        assert_same_generation(model.generate(**inputs, **GEN), reference[name])
