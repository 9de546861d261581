"""SparseVLM's token recycling: DPC-kNN clustering and merging of pruned tokens (spec ``methods.md``
§2.2 step 4 and §7.1), batched over samples that recycle the same number of tokens.

The rule is TCFormer's ``cluster_and_merge`` as SparseVLM uses it: pairwise distances scaled by
``1/sqrt(C)``; local density ``exp(-mean(kNN distance^2))`` over the ``c`` nearest tokens *including the
token itself*; a tie-break noise ``1e-6 * u``; ``delta`` = distance to the nearest token of higher density
(the largest distance of the sample for the densest token); centres = the ``c`` largest ``delta * density``
in decreasing order; every token joins its nearest centre (the first centre in that order on a tie; a
centre joins itself); a merged token is ``sum(x_i) / (n + 1e-6)``.

The noise ``u`` is an explicit input (``density_noise``): seeded per sample, never the global RNG.
"""

from __future__ import annotations

import torch

#: Scale of the tie-break noise added to the densities.
NOISE_SCALE = 1e-6


def density_noise(seed: int, row_key: int, stage_index: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) noise [count] for one sample's densities at one stage, from a private generator
    seeded by ``seed``, the sample's prompt key and the stage, so that it is the same alone or in a batch."""
    generator = torch.Generator().manual_seed(hash((seed, row_key, stage_index)) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.rand(count, generator=generator, dtype=torch.float32)


def euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """The pairwise distances ``||x_i - x_j||`` [B, n, n] of ``x`` [B, n, C], as the official
    ``(x1 - x2).norm(dim=-1, p=2)`` (spec ``methods.md`` §2.2 step 4: exact differences, not the matmul
    form), for half its work: ``torch.pdist`` forms each difference once per pair (``i < j``) and sums its
    squares with a vectorised reduction, so the matrix is exactly symmetric, its diagonal is 0 and exactly
    duplicated tokens are at distance 0 of each other and at equal distances of every other token."""
    batch, count, _ = x.shape
    dist = x.new_zeros(batch, count, count)
    if count < 2:
        return dist
    upper = torch.triu_indices(count, count, 1, device=x.device)
    flat = upper[0] * count + upper[1]
    mirror = upper[1] * count + upper[0]
    for row in range(batch):
        pairs = torch.nn.functional.pdist(x[row])
        plane = dist[row].view(-1)
        plane[flat] = pairs
        plane[mirror] = pairs
    return dist


def cluster_and_merge(
    x: torch.Tensor, clusters: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``x`` [B, n, C] into ``clusters`` groups and their merged tokens, in float32.

    Args:
        x: the candidate tokens, in the caller's order (SparseVLM: decreasing score).
        clusters: number of centres ``c`` (also the k of the kNN density), 1 <= c <= n.
        noise: [B, n] uniform [0, 1) tie-break noise (``density_noise``); scaled by ``NOISE_SCALE``.

    Returns:
        ``(merged [B, c, C] float32, centres [B, c], assign [B, n])``: merged tokens in decreasing centre
        score, the centres' indices into ``x`` in that order, and each token's cluster (0..c-1).
    """
    batch, count, width = x.shape
    x = x.float()
    dist = euclidean_distances(x) / (width**0.5)  # [B, n, n]
    nearest = dist.topk(clusters, dim=-1, largest=False).values  # includes the token itself (distance 0)
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.to(x.device, torch.float32) * NOISE_SCALE
    higher = density[:, None, :] > density[:, :, None]  # [b, i, j]: token j is denser than token i
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(higher, dist, dist_max).min(dim=-1).values
    centres = (delta * density).topk(clusters, dim=-1).indices  # [B, c], decreasing centre score
    assign = dist.gather(1, centres[..., None].expand(-1, -1, count)).argmin(dim=1)  # [B, n]
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(batch, -1))
    ones = torch.ones_like(assign, dtype=x.dtype)
    sizes = torch.zeros(batch, clusters, device=x.device).scatter_add_(1, assign, ones)
    weight = 1.0 / (sizes + 1e-6).gather(1, assign)  # [B, n]
    merged = torch.zeros(batch, clusters, width, device=x.device)
    merged.scatter_add_(1, assign[..., None].expand(-1, -1, width), x * weight[..., None])
    return merged, centres, assign
