"""``random``: keep a uniformly random subset of visual tokens (a control)."""

from __future__ import annotations

import torch

from finepruner.methods.base import Positions, PruningMethod, Stage, StageContext, check_layer, check_tokens


class RandomSelection(PruningMethod):
    """Keep ``tokens`` visual tokens drawn uniformly at random, before layer ``K``.

    Parameters:
        tokens: visual tokens kept (exactly this many enter layer ``K``); default: half of them.
        K: decoder layer whose input is pruned; 0 (default) prunes before the language model, like
            the pre-LLM methods it controls for.
        seed: the draw for a sample depends only on ``seed`` and the sample's prompt tokens, so a
            sample keeps the same tokens alone or in any batch, and runs are reproducible.
        positions: ``"renumber"`` (default, as a shorter input sequence) or ``"original"``.
    """

    name = "random"
    default_positions = "renumber"

    def __init__(
        self, tokens: int | None = None, K: int = 0, seed: int = 0, positions: Positions | None = None
    ) -> None:
        super().__init__(positions)
        self.tokens, self.K, self.seed = tokens, K, seed

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        check_layer(self.name, "K", self.K, 0, num_layers - 1)
        keep = self.tokens if self.tokens is not None else num_visual // 2
        check_tokens(self.name, keep, num_visual)
        return [Stage(layer=self.K, keep=keep)]

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        rows = []
        for key in ctx.row_keys:
            generator = torch.Generator().manual_seed(hash((self.seed, key)) & 0x7FFF_FFFF_FFFF_FFFF)
            rows.append(torch.randperm(ctx.num_visual, generator=generator)[: stage.keep].sort().values)
        return torch.stack(rows).to(ctx.visual_ids.device)
