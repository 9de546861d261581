"""The pruned decoder engine: ``apply`` a method to a model, then generate as usual."""

from finepruner.engine.handle import Handle, apply
from finepruner.engine.signals import last_query_attention
from finepruner.engine.state import PruneStats

__all__ = ["Handle", "PruneStats", "apply", "last_query_attention"]
