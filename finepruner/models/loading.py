"""Loading local llava-hf checkpoints of every registered model family, with clear errors.

The family comes from ``config.json``'s ``model_type`` (``finepruner.models.adapters``: LLaVA-1.5
``llava``, LLaVA-NeXT ``llava_next``, LLaVA-OneVision ``llava_onevision``); its adapter names the
transformers model and configuration classes and the optional packages its processor needs. Nothing
is ever downloaded: ``path`` must be a local directory, or the name of a checkpoint that ships inside
the package (``"toy"``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoProcessor

if TYPE_CHECKING:
    from finepruner.models.adapters import ModelAdapter

#: Checkpoints shipped with the package: name -> "module:function" returning the directory.
BUILTIN_CHECKPOINTS: dict[str, str] = {"toy": "finepruner.toy.model:checkpoint_dir"}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class MissingPackageError(ImportError, ValueError):
    """An optional package that a model family's processor needs is not installed (e.g. torchvision
    for LLaVA-OneVision). Also a ``ValueError``, so every command reports it as a usage error."""


def supported_families() -> str:
    """``"llava = LLaVA-1.5 (llava-hf/llava-1.5-*-hf), llava_next = ..."``: every registered family (its
    ``model_type`` and the first part of its description), for error messages."""
    from finepruner.models.adapters import registered

    families = dict.fromkeys(registered().values())
    return ", ".join(f"{cls.family_name()} = {cls.description.split(':')[0]}" if cls.description
                     else cls.family_name() for cls in families)


def family_of(directory: Path) -> type[ModelAdapter]:
    """The adapter class of the checkpoint in ``directory``, by its ``config.json``'s ``model_type``;
    raises ``FileNotFoundError``/``ValueError`` for a missing, malformed or unsupported config."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    model_type = config.get("model_type")
    from finepruner.models.adapters import adapter_class  # lazily: the adapters import finepruner.methods

    try:
        return adapter_class(model_type)
    except ValueError:
        raise ValueError(
            f"{config_file}: model_type is {model_type!r}, which finepruner does not support; supported "
            f"model families (model_type): {supported_families()}"
        ) from None


def _package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_requirements(family: type[ModelAdapter], directory: Path | None = None) -> None:
    """Raise :class:`MissingPackageError` naming the pip extra when an optional package that the
    family's processor needs (``ModelAdapter.processor_requires``) is not installed."""
    missing = [(name, extra) for name, extra in family.processor_requires if not _package_available(name)]
    if not missing:
        return
    names = ", ".join(name for name, _ in missing)
    extras = ",".join(dict.fromkeys(extra for _, extra in missing))
    where = f"checkpoint {directory}: " if directory is not None else ""
    raise MissingPackageError(
        f"{where}the {family.family_name()} processor needs {names}, which is not installed: "
        f"pip install finepruner[{extras}] (CPU machines: keep torch==2.13.0 and install the CPU torchvision "
        "build, docs/benchmarks.md, 'Model families')"
    )


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"float16"`` -> ``torch.float16``; only floating-point dtypes are accepted (None: the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating-point torch dtype name (use float16, bfloat16 or float32)"
        )
    return value


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The ``torch.device`` of ``device``, checked against the devices of this machine (None: unchanged).

    Raises ``ValueError`` for a malformed name, CUDA or MPS where it is not available, or a CUDA index
    beyond the visible devices.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device {device!r} is not a device name (use cpu, cuda, cuda:N or mps)") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if not count:
            raise ValueError(
                f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {device!r}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: device type {dev.type!r} is not supported (use cpu, cuda[:N] or mps)")
    return dev


def check_safetensors(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` when the safetensors file is truncated or its header corrupt
    (reads the header only: the declared tensor extents must fit in the file)."""
    size = path.stat().st_size
    advice = "re-download or re-copy the checkpoint"
    with path.open("rb") as fh:
        head = fh.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes); {advice}")
        try:
            header = json.loads(fh.read(header_len))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0
            )
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path} has a corrupt safetensors header ({err}); {advice}") from err
    if 8 + header_len + end > size:
        raise ValueError(
            f"{path} is truncated: {size} bytes, its header describes {8 + header_len + end}; {advice}"
        )


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


def check_checkpoint(directory: Path, requirements: bool = True) -> type[ModelAdapter]:
    """Raise ``FileNotFoundError``/``ValueError`` naming the first missing or malformed file; returns the
    checkpoint's family (its adapter class).

    The configuration is validated with the family's configuration class; ``requirements`` also checks
    the optional packages the family's processor needs (:func:`check_requirements`).
    """
    family = family_of(directory)
    config_file = directory / "config.json"
    config_class = getattr(transformers, family.config_class)
    try:
        config_class.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as err:
        detail = " ".join(str(err).split())  # one line (transformers' validation messages span several)
        raise ValueError(
            f"{config_file} is not a valid {family.family_name()} configuration: {detail}"
        ) from err
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
    weights = [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = set(weight_map.values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a valid weight index (JSON with a 'weight_map'): {err}") from err
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise FileNotFoundError(f"checkpoint {directory} is missing weight shards: {', '.join(missing)}")
        weights += [directory / s for s in sorted(shards) if s.endswith(".safetensors")]
    for weight_file in dict.fromkeys(weights):
        check_safetensors(weight_file)
    if requirements:
        check_requirements(family, directory)
    return family


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    layout: str = "hf",
    processor_kwargs: Mapping[str, Any] | None = None,
    processor: str = "auto",
) -> tuple[Any, Any]:
    """Load a local checkpoint of any registered family and its processor (tokenizer padding on the left).

    The family is the ``model_type`` of ``config.json``; its adapter names the transformers class that
    loads the weights (e.g. ``LlavaNextForConditionalGeneration``). A missing optional package of the
    family's processor (torchvision for LLaVA-OneVision) raises :class:`MissingPackageError` before any
    weight is read. ``dtype`` defaults to the checkpoint's own dtype; ``device`` to CPU. The model is in
    eval mode. ``layout`` selects the image-token layout among the family's ``ModelAdapter.layouts``
    (``"hf"``: the model's own; LLaVA-NeXT also ``"paper2880"``, ``docs/models.md``). ``processor_kwargs``
    go to the processor's (or image processor's) ``from_pretrained`` (Qwen: ``min_pixels``/``max_pixels``).
    ``processor`` chooses the processor implementation where a family has two (``ModelAdapter.processors``;
    Qwen: ``"official"`` needs torchvision, ``"finepruner"`` is ``finepruner.models.qwen_processor``, ``"auto"``
    the official one when torchvision is installed).
    """
    if attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not supported; use one of {_ATTN_IMPLEMENTATIONS}"
        )
    dtype = parse_dtype(dtype)
    check_device(device)
    directory = resolve_checkpoint(path)
    family = check_checkpoint(directory)
    family.check_layout(layout)
    family.check_processor_choice(processor)
    model_class = getattr(transformers, family.model_class)
    try:
        model = model_class.from_pretrained(
            directory, dtype=dtype if dtype is not None else "auto", attn_implementation=attn_implementation
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, StrictDataclassError) as err:
        raise ValueError(f"cannot load the model weights of checkpoint {directory}: {err}") from err
    try:
        loaded = family.load_processor(directory, processor, dict(processor_kwargs or {}))
    except MissingPackageError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot load the tokenizer/processor of checkpoint {directory}: {err}") from err
    loaded.tokenizer.padding_side = "left"
    if layout != family.layouts[0]:
        family(model).set_layout(loaded, layout)
    if device is not None:
        model.to(device)
    return model.eval(), loaded


def load_auto_processor(directory: Path, kwargs: Mapping[str, Any]) -> Any:
    """``AutoProcessor.from_pretrained(directory, **kwargs)`` (the families' official processors)."""
    return AutoProcessor.from_pretrained(directory, **kwargs)
