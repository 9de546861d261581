"""Model loading (local llava-hf checkpoints of every registered family), adapters and tiny random models.

``families()`` lists the supported model families (``finepruner.models.adapters.families``; imported on
first use, since the adapters import ``finepruner.methods``, which imports this package).
"""

from typing import Any

from finepruner.models.loading import load_model
from finepruner.models.tiny import TinyLlavaSpec, build_tiny_llava

__all__ = ["families", "load_model", "build_tiny_llava", "TinyLlavaSpec"]


def __getattr__(name: str) -> Any:
    if name == "families":
        from finepruner.models.adapters import families

        return families
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
