"""``vanilla``: no pruning; every visual token reaches every decoder layer."""

from __future__ import annotations

from finepruner.methods.base import PruningMethod, Stage


class Vanilla(PruningMethod):
    """The unpruned model, run through the same engine (no parameters)."""

    name = "vanilla"

    def __init__(self) -> None:
        super().__init__(positions=None)

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        return []
