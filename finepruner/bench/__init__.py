"""Efficiency measurements: analytic FLOPs (``flops``) and the ``finepruner bench`` runner (``runner``).

``finepruner.bench.flops`` is pure Python (no torch import) so that ``PruneStats`` can use it cheaply.
"""
