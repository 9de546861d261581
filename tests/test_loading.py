"""load_model: local llava-hf checkpoints, with errors that name the path and the missing file."""

from __future__ import annotations

import json

import pytest
import torch

import finepruner
from finepruner.models.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, processor = build_tiny_llava(seed=0)
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def copy_without(checkpoint, tmp_path, *missing):
    target = tmp_path / "copy"
    target.mkdir()
    for path in checkpoint.iterdir():
        if path.name not in missing:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_loads_with_left_padding_and_options(checkpoint):
    model, processor = finepruner.load_model(checkpoint, dtype="bfloat16", attn_implementation="eager")
    assert processor.tokenizer.padding_side == "left"
    assert model.dtype == torch.bfloat16
    assert model.config.text_config._attn_implementation == "eager"
    assert not model.training


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finepruner.load_model(tmp_path / "nowhere")


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        finepruner.load_model(path)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        (("config.json",), "has no config.json"),
        (("model.safetensors",), "has no weights file"),
        (("tokenizer.json",), "has no tokenizer file"),
        (("processor_config.json",), "has no image processor file"),
    ],
)
def test_missing_files_are_named(checkpoint, tmp_path, missing, message):
    with pytest.raises(FileNotFoundError, match=message):
        finepruner.load_model(copy_without(checkpoint, tmp_path, *missing))


def test_malformed_config(checkpoint, tmp_path):
    target = copy_without(checkpoint, tmp_path)
    (target / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        finepruner.load_model(target)
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        finepruner.load_model(target)


def test_missing_shard_is_named(checkpoint, tmp_path):
    target = copy_without(checkpoint, tmp_path, "model.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        finepruner.load_model(target)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"attn_implementation": "fast"}, "attn_implementation='fast'"),
    ({"dtype": "float17"}, "dtype='float17'"),
])
def test_bad_options(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        finepruner.load_model(checkpoint, **kwargs)
