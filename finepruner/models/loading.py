"""Loading local llava-hf checkpoints (LLaVA-1.5 7B/13B layout) with clear errors.

Nothing is ever downloaded: ``path`` must be a local directory, or the name of a checkpoint that
ships inside the package (``"toy"``).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

#: Checkpoints shipped with the package: name -> "module:function" returning the directory.
BUILTIN_CHECKPOINTS: dict[str, str] = {"toy": "finepruner.toy.model:checkpoint_dir"}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def resolve_checkpoint(path: str | Path) -> Path:
    """Map a built-in name to its directory, or check that ``path`` is a local directory."""
    if isinstance(path, str) and path in BUILTIN_CHECKPOINTS:
        module_name, func_name = BUILTIN_CHECKPOINTS[path].split(":")
        return Path(getattr(importlib.import_module(module_name), func_name)())
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(
            f"checkpoint directory {directory} does not exist (expected a local llava-hf checkpoint, "
            f"or one of the built-in names {sorted(BUILTIN_CHECKPOINTS)})"
        )
    if not directory.is_dir():
        raise NotADirectoryError(f"checkpoint path {directory} is a file; pass the checkpoint's directory")
    return directory


def check_checkpoint(directory: Path) -> None:
    """Raise ``FileNotFoundError``/``ValueError`` naming the first missing or malformed file."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    model_type = config.get("model_type")
    if model_type != "llava":
        raise ValueError(
            f"{config_file}: model_type is {model_type!r}; finepruner expects a llava-hf checkpoint "
            "(model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf)"
        )
    for group, names in (
        ("weights", _WEIGHT_FILES),
        ("tokenizer", _TOKENIZER_FILES),
        ("image processor", _IMAGE_PROCESSOR_FILES),
    ):
        if not any((directory / name).is_file() for name in names):
            raise FileNotFoundError(
                f"checkpoint {directory} has no {group} file (looked for {', '.join(names)})"
            )
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise FileNotFoundError(f"checkpoint {directory} is missing weight shards: {', '.join(missing)}")


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a local llava-hf checkpoint and its processor (tokenizer padding on the left).

    ``dtype`` defaults to the checkpoint's own dtype; ``device`` to CPU. The model is in eval mode.
    """
    if attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not supported; use one of {_ATTN_IMPLEMENTATIONS}"
        )
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'float16', 'bfloat16')")
        dtype = getattr(torch, dtype)
    directory = resolve_checkpoint(path)
    check_checkpoint(directory)
    model = LlavaForConditionalGeneration.from_pretrained(
        directory, dtype=dtype if dtype is not None else "auto", attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    if device is not None:
        model.to(device)
    return model.eval(), processor
