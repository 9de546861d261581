"""finepruner: training-free visual-token pruning for LLaVA on stock Hugging Face transformers.

Public API::

    model, processor = finepruner.load_model(path)          # local llava-hf checkpoint, or "toy"
    with finepruner.apply(model, "fastv", tokens=64) as handle:
        model.generate(**inputs)
        handle.kept, handle.stats
    finepruner.methods.available()

The names are imported on first use (PEP 562), so that importing a light submodule, such as the
command line's entry point, does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (``None``: the name is that submodule itself).
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "Handle": ("finepruner.engine", "Handle"),
    "apply": ("finepruner.engine", "apply"),
    "build_tiny_llava": ("finepruner.models", "build_tiny_llava"),
    "load_model": ("finepruner.models", "load_model"),
    "methods": ("finepruner.methods", None),
}
__all__ = ["Handle", "apply", "build_tiny_llava", "load_model", "methods", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from finepruner import methods
    from finepruner.engine import Handle, apply
    from finepruner.models import build_tiny_llava, load_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finepruner' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value
