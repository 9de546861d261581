"""Model loading (local llava-hf checkpoints of every registered family), adapters and tiny random models."""

from finepruner.models.adapters import families
from finepruner.models.loading import load_model
from finepruner.models.tiny import TinyLlavaSpec, build_tiny_llava

__all__ = ["families", "load_model", "build_tiny_llava", "TinyLlavaSpec"]
