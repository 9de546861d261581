"""``divprune``: DivPrune (Alvar et al., CVPR'25), spec ``methods_more.md`` §3.

Before the language model, keep the visual tokens chosen by greedy max-min diversity on the projected
visual embeddings, with the distance ``1 - cos``: first the most isolated token (the largest distance to
its nearest other token), then repeatedly the token farthest from the tokens already chosen.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from finepruner.methods.base import Positions, PruningMethod, Stage, StageContext, check_tokens

#: The official default ``SUBSET_RATIO`` (kept fraction; 56 of 576 tokens).
DEFAULT_RATIO = 0.098


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """The features in float32 scaled to unit norm (a zero vector stays zero, spec §3.2 pitfall 3)."""
    x = features.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


#: Rows per panel of ``symmetric_gram``; below ``2 * GRAM_PANEL`` tokens the gram is one matmul.
GRAM_PANEL = 288


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ xᵀ`` [B, V, V] of ``x`` [B, V, D] for about half its multiply-adds: the gram is symmetric, so
    each panel of ``GRAM_PANEL`` rows is multiplied with itself and the later rows only, and mirrored.

    The entries are the same dot products as one matmul, up to the BLAS's rounding (which also differs
    between the official GPU code and any CPU); the result is exactly symmetric (each pair is computed
    once), so exactly duplicated rows of ``x`` get exactly equal rows and columns whenever the BLAS
    rounds a dot product the same wherever it sits in a panel (checked in ``test_selection_scaling``).
    """
    batch, size, _ = x.shape
    if size < 2 * GRAM_PANEL:
        return x @ x.transpose(1, 2)
    gram = x.new_empty(batch, size, size)
    for start in range(0, size, GRAM_PANEL):
        stop = min(size, start + GRAM_PANEL)
        panel = x[:, start:stop] @ x[:, start:].transpose(1, 2)  # [B, p, V - start]
        square = panel[:, :, : stop - start]
        square.copy_(square.triu() + square.triu(1).transpose(1, 2))  # the diagonal block from its upper half
        gram[:, start:stop, start:] = panel
        gram[:, stop:, start:stop] = panel[:, :, stop - start :].transpose(1, 2)
    return gram


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` [B, V, V] in float32 (spec §3.2 pitfall 3); a zero vector has distance 1 to
    every other token instead of NaN."""
    x = unit_rows(features)
    return 1.0 - x @ x.transpose(1, 2)


def divprune_select(features: torch.Tensor, count: int) -> torch.Tensor:
    """DivPrune's greedy max-min selection, vectorised over the batch.

    Args:
        features: [B, V, D] projected visual embeddings.
        count: tokens kept per sample (1..V).

    Returns:
        [B, count] sorted indices.

    The distances ``D = 1 - cos`` are float32 with the diagonal masked (+inf), so the first pick is
    ``argmax_j min_{i != j} D[i, j]`` exactly (the official code takes the column's second smallest entry
    and assumes the diagonal is its minimum, which fp16 does not guarantee). A running vector
    ``m_j = min_{s in S} D[s, j]`` is updated with one row per pick (O(V·count) after the O(V²·D)
    similarities). Ties go to the first index (``argmax``); chosen tokens are excluded explicitly, so exact
    duplicates never make a token be picked twice (pitfall 3).

    Only the similarity matrix ``G = x xᵀ`` is materialised, by ``symmetric_gram`` (half the
    multiply-adds of one matmul, exactly symmetric): rounding is monotone, so
    ``min_i (1 - G_ij) = 1 - max_i G_ij`` bit for bit and the nearest-neighbour distances come from one
    row maximum of G (= its column maximum); the rows of D the greedy reads are ``1 - G_s`` formed per
    pick. On the same G these are the values, and so the picks and their ties, of
    ``divprune_select_plain`` (used for features with NaN or inf), whose one matmul differs from
    ``symmetric_gram`` only in the BLAS's rounding of the dot products.
    """
    x = unit_rows(features)
    if not bool(torch.isfinite(x.sum())):  # unit rows cannot overflow the sum: a NaN or inf is in x
        return divprune_select_plain(features, count)
    batch, size, _ = features.shape
    similarity = symmetric_gram(x)  # G
    similarity.diagonal(dim1=1, dim2=2).fill_(-math.inf)  # D's masked diagonal: 1 - (-inf) = +inf
    if batch == 1 and similarity.device.type == "cpu":  # the batched loop below never waits for the device
        return _greedy_single(similarity[0], count)
    flat = similarity.view(batch * size, size)  # row j of sample b: b * V + j
    offset = torch.arange(batch, device=features.device) * size
    chosen = torch.empty(batch, count, dtype=torch.long, device=features.device)
    first = (1.0 - similarity.amax(dim=2)).argmax(dim=-1)  # most isolated token: largest nearest-neighbour distance
    chosen[:, 0] = first
    nearest = 1.0 - flat.index_select(0, first + offset)  # m_j; chosen tokens are held at -inf
    nearest.scatter_(1, first[:, None], -math.inf)
    for step in range(1, count):
        j = nearest.argmax(dim=-1)
        chosen[:, step] = j
        nearest = torch.minimum(nearest, 1.0 - flat.index_select(0, j + offset))  # min(-inf, d) = -inf
        nearest.scatter_(1, j[:, None], -math.inf)
    return chosen.sort(dim=-1).values


def _greedy_single(similarity: torch.Tensor, count: int) -> torch.Tensor:
    """``divprune_select``'s greedy for one sample on its G [V, V] (diagonal at -inf), on the CPU, as NumPy
    operations on the same memory (a few microseconds per pick instead of PyTorch's ~25 for the same
    operations): the pick read back as an int, the row ``1 - G_j`` formed from a view, the running minimum
    updated in place. The same float32 values and elementwise operations (``1 - max``, first-index
    ``argmax``, ``minimum``), hence the same picks, bit for bit."""
    rows = similarity.detach().numpy()
    chosen = [int((1.0 - similarity.amax(dim=1)).argmax())]
    nearest = 1.0 - rows[chosen[0]]  # m_j; chosen tokens are held at -inf
    nearest[chosen[0]] = -np.inf
    for _ in range(1, count):
        j = int(nearest.argmax())
        chosen.append(j)
        np.minimum(nearest, 1.0 - rows[j], out=nearest)  # min(-inf, d) = -inf
        nearest[j] = -np.inf
    return torch.tensor(sorted(chosen), dtype=torch.long, device=similarity.device).view(1, count)


def divprune_select_plain(features: torch.Tensor, count: int) -> torch.Tensor:
    """``divprune_select`` on the full distance matrix, chosen tokens masked at every step."""
    batch, size, _ = features.shape
    distances = cosine_distances(features)
    distances.diagonal(dim1=1, dim2=2).fill_(math.inf)
    rows = torch.arange(batch, device=features.device)
    picked = torch.zeros(batch, size, dtype=torch.bool, device=features.device)
    chosen = torch.empty(batch, count, dtype=torch.long, device=features.device)
    first = distances.amin(dim=1).argmax(dim=-1)  # most isolated token: largest nearest-neighbour distance
    chosen[:, 0] = first
    picked[rows, first] = True
    nearest = distances[rows, first]  # m_j; inf on the pick itself, masked by ``picked`` below
    for step in range(1, count):
        j = nearest.masked_fill(picked, -math.inf).argmax(dim=-1)
        chosen[:, step] = j
        picked[rows, j] = True
        nearest = torch.minimum(nearest, distances[rows, j])
    return chosen.sort(dim=-1).values


def ratio_count(subset_ratio: float, num_visual: int) -> int:
    """``int(round(SUBSET_RATIO * n))``, as the official code, at least 1."""
    return max(1, int(round(subset_ratio * num_visual)))


class DivPrune(PruningMethod):
    """DivPrune: max-min diverse subset of the projected visual tokens, before the LLM (spec §3).

    "N tokens" means exactly ``tokens`` visual tokens per sample enter the language model (all of a
    sample's images together); positions are renumbered (a plain shorter sequence).

    Parameters:
        tokens: visual tokens kept per sample (1..V). Budgets 192/128/64 are ``tokens=192/128/64`` (the
            official ratios 1/3, 2/9, 1/9 of 576).
        subset_ratio: alternatively the official ``SUBSET_RATIO`` (the *kept* fraction, 0 < r <= 1), kept
            count ``int(round(r * V))``. Default when neither is given: 0.098 (56 of 576, the official default).
        positions: ``"renumber"`` (default, as the official code) or ``"original"``.

    Signals: the projector outputs (``finepruner.engine.vision``, captured during LLaVA's own image
    encoding).

    Deviations: distances in float32 with the diagonal masked and chosen tokens excluded explicitly
    (``divprune_select``; the official code works in the model dtype and can re-pick a token when all
    remaining distances are 0); any batch size (the official code assumes batch 1); a sample with several
    images gets one selection over all its visual tokens.
    """

    name = "divprune"
    default_positions = "renumber"
    needs_vision = ("projected_features",)

    def __init__(
        self, tokens: int | None = None, subset_ratio: float | None = None, positions: Positions | None = None
    ) -> None:
        super().__init__(positions)
        if tokens is not None and subset_ratio is not None:
            raise ValueError(f"{self.name}: pass tokens or subset_ratio, not both")
        if subset_ratio is not None and (
            isinstance(subset_ratio, bool) or not isinstance(subset_ratio, int | float) or not 0.0 < subset_ratio <= 1.0
        ):
            raise ValueError(
                f"{self.name}: subset_ratio={subset_ratio!r} is the kept fraction; allowed: 0 < subset_ratio <= 1"
            )
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{self.name}: tokens={tokens!r} is not allowed; allowed: an integer >= 1 (and <= V)")
        self.tokens = tokens
        self.subset_ratio = float(subset_ratio) if subset_ratio is not None else None

    def keep_count(self, num_visual: int) -> int:
        """Visual tokens kept for a model with ``num_visual`` visual tokens (validated)."""
        if self.tokens is not None:
            check_tokens(self.name, self.tokens, num_visual)
            return self.tokens
        return ratio_count(DEFAULT_RATIO if self.subset_ratio is None else self.subset_ratio, num_visual)

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        return [Stage(layer=0, keep=self.keep_count(num_visual))]

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        ids = ctx.visual_ids
        projected = ctx.require_vision(self.name, "projected_features").projected_features
        projected = projected.gather(1, ids.to(projected.device)[..., None].expand(-1, -1, projected.shape[-1]))
        return divprune_select(projected, stage.keep).to(ids.device)
