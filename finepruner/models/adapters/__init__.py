"""Model-family adapters (``spec/models.md``): one module per family, registered by ``model_type``.

``adapter_for(model)`` gives a loaded model's adapter; ``families()`` lists the supported families.
"""

from finepruner.models.adapters.base import (
    ImageSpan,
    ModelAdapter,
    adapter_class,
    adapter_for,
    register_adapter,
    registered,
)
from finepruner.models.adapters.llava import LlavaAdapter
from finepruner.models.adapters.llava_next import LlavaNextAdapter
from finepruner.models.adapters.llava_onevision import LlavaOnevisionAdapter
from finepruner.models.adapters.qwen2_5_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from finepruner.models.adapters.qwen3_vl import Qwen3VLAdapter


def families() -> list[str]:
    """The supported model families (their ``model_type``), in registration order."""
    return list(dict.fromkeys(cls.family_name() for cls in registered().values()))


__all__ = [
    "ImageSpan", "ModelAdapter", "LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter", "Qwen2_5_VLAdapter",
    "Qwen2VLAdapter", "Qwen3VLAdapter",
    "adapter_class", "adapter_for", "families", "register_adapter", "registered",
]
