"""The result type of a head selection and the deterministic ordering every strategy uses.

Ties are broken by the lowest head index first (docs/heads.md "Ties"): rankings use a *stable* sort, so
equal scores keep their index order whichever end of the score counts as best. NaN scores rank last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def order_heads(scores: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """Head indices (last dim) from best to worst; ties keep the lower index first. Works batched."""
    fill = float("-inf") if largest else float("inf")
    clean = torch.where(torch.isnan(scores), torch.full_like(scores, fill), scores)
    return torch.sort(clean, dim=-1, descending=largest, stable=True).indices


def top_heads(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """The ``k`` best heads in rank order (best first), deterministic ties (lowest index first)."""
    return order_heads(scores, largest)[..., :k]


def sorted_long(indices: torch.Tensor | list[int], device: torch.device | None = None) -> torch.Tensor:
    """Ascending int64 tensor of head indices."""
    t = torch.as_tensor(indices, dtype=torch.long, device=device)
    return t.sort(dim=-1).values


@dataclass(frozen=True)
class Selection:
    """One sample's head selection.

    Attributes:
        indices: selected heads, ascending int64 ``[k]`` (what :func:`finepruner.heads.select` returns).
        ranked: the same heads in selection order, best first (for rankings: by score).
        scores: per-head scores over *all* heads ``[num_heads]`` float32 that the original code fed to
            ``softmax`` for its weighted aggregation (the ranking score; for ``dynamic`` the winning
            strategy's scores; for ``consensus`` the pre-softmax head weights), or ``None`` for controls.
            Pass it as ``scores=`` to :func:`finepruner.heads.aggregate` with ``mode="softmax_weighted"``.
        info: strategy-specific record (e.g. the number of heads chosen and why, for the dynamic selectors).
    """

    indices: torch.Tensor
    ranked: torch.Tensor
    scores: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        """Number of heads selected."""
        return int(self.indices.numel())
