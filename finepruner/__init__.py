"""finepruner: training-free visual-token pruning for LLaVA on stock Hugging Face transformers.

Public API::

    model, processor = finepruner.load_model(path)          # local llava-hf checkpoint, or "toy"
    with finepruner.apply(model, "fastv", tokens=64) as handle:
        model.generate(**inputs)
        handle.kept, handle.stats
    finepruner.methods.available()
"""

from finepruner import methods
from finepruner.engine import Handle, apply
from finepruner.models import build_tiny_llava, load_model

__version__ = "0.1.0"
__all__ = ["Handle", "apply", "build_tiny_llava", "load_model", "methods", "__version__"]
