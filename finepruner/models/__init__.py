"""Model loading (local llava-hf checkpoints), adapters and tiny random models."""

from finepruner.models.loading import load_model
from finepruner.models.tiny import TinyLlavaSpec, build_tiny_llava

__all__ = ["load_model", "build_tiny_llava", "TinyLlavaSpec"]
