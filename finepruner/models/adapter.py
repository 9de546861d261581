"""Compatibility import: the LLaVA-1.5 adapter now lives in ``finepruner.models.adapters.llava``."""

from finepruner.models.adapters import LlavaAdapter, adapter_for

__all__ = ["LlavaAdapter", "adapter_for"]
