"""load_model and check_checkpoint for every registered family (spec/models.md §0, §6): a saved tiny
LLaVA-NeXT loads back with its processor; a saved tiny LLaVA-OneVision validates, and its processor's
missing torchvision is a clear error before any weight is read; an unsupported model_type lists the
families."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import finepruner
from finepruner.models import families, loading
from finepruner.models.adapters import adapter_for
from finepruner.models.loading import MissingPackageError, check_checkpoint, load_model
from finepruner.models.tiny_families import (
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    next_inputs,
    tiny_image,
)


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    model, processor = build_tiny_llava_next(seed=0)
    directory = tmp_path_factory.mktemp("next")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor, directory


@pytest.fixture(scope="module")
def onevision_checkpoint(tmp_path_factory):
    """Weights, config, tokenizer and image processor: without torchvision there is no processor to save."""
    model, image_processor, tokenizer = build_tiny_llava_onevision(seed=0)
    directory = tmp_path_factory.mktemp("onevision")
    model.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_families_are_exported():
    assert families() == ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
    assert finepruner.models.families is families


def test_next_loads_back_with_its_processor(next_checkpoint):
    model, processor, directory = next_checkpoint
    assert check_checkpoint(directory).family_name() == "llava_next"
    loaded, loaded_processor = load_model(directory, dtype="float32")
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    assert type(loaded_processor).__name__ == "LlavaNextProcessor"
    assert loaded_processor.tokenizer.padding_side == "left" and not loaded.training
    assert adapter_for(loaded).family == "llava_next"
    image = tiny_image(60, 40, 1)
    inputs = loaded_processor(images=[image], text=["USER: <image>\nwhat color ? ASSISTANT:"], return_tensors="pt")
    assert "image_sizes" in inputs
    expected = next_inputs(model, processor, ["USER: <image>\nwhat color ? ASSISTANT:"], [[image]])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_onevision_weights_and_config_validate(onevision_checkpoint):
    assert check_checkpoint(onevision_checkpoint, requirements=False).family_name() == "llava_onevision"


def test_onevision_without_torchvision_names_the_extra_before_loading(onevision_checkpoint, monkeypatch):
    monkeypatch.setattr(loading, "_package_available", lambda name: name != "torchvision")

    def refuse(*args, **kwargs):
        raise AssertionError("the weights must not be read when the processor cannot be built")

    monkeypatch.setattr(transformers.LlavaOnevisionForConditionalGeneration, "from_pretrained", refuse)
    with pytest.raises(MissingPackageError, match=r"needs torchvision.*pip install finepruner\[onevision\]"):
        load_model(onevision_checkpoint)
    with pytest.raises(ValueError, match=r"pip install finepruner\[onevision\]"):  # commands report ValueErrors
        check_checkpoint(onevision_checkpoint)
    with pytest.raises(ImportError):
        check_checkpoint(onevision_checkpoint)


def test_requirements_pass_when_the_package_is_there(onevision_checkpoint, monkeypatch):
    monkeypatch.setattr(loading, "_package_available", lambda name: True)
    assert check_checkpoint(onevision_checkpoint).family_name() == "llava_onevision"


def test_unsupported_model_type_lists_the_families(next_checkpoint, tmp_path):
    _, _, directory = next_checkpoint
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "internvl"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type is 'internvl'") as info:
        load_model(tmp_path)
    message = str(info.value)
    for family in families():
        assert family in message
    assert "LLaVA-NeXT" in message and "LLaVA-OneVision" in message


def test_config_is_validated_with_the_family_class(next_checkpoint, tmp_path):
    _, _, directory = next_checkpoint
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_feature_select_strategy"] = "sideways"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a valid llava_next configuration"):
        check_checkpoint(tmp_path)
