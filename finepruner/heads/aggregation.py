"""Token scores from the selected heads (spec heads.md §1.3 and §2.3).

``mean``: ``a = mean_{h in heads} A[h]`` (ablation_a and fastv+finepruner, spec §1.3).
``softmax_weighted``: ``a = sum_{h in heads} softmax(scores[heads])_h A[h]`` -- the weighted form of
``_simplified.py`` / HEAD ``_fine_head.py`` (spec §2.3) and of dynamic v2/v3 (spec §4.2, §4.3 step 6):
the softmax is taken over the *selected* heads' scores only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finepruner.heads.statistics import as_float32

AGGREGATION_MODES = ("mean", "softmax_weighted")

HeadIndices = torch.Tensor | Sequence[int] | Sequence[torch.Tensor] | Sequence[Sequence[int]]


def _index_rows(heads: HeadIndices, batch: int, num_heads: int, device: torch.device) -> list[torch.Tensor]:
    """One int64 index tensor per sample; a single 1-D index set is shared by every sample."""
    if isinstance(heads, torch.Tensor):
        if heads.dim() == 1:
            rows = [heads] * batch
        elif heads.dim() == 2 and heads.shape[0] == batch:
            rows = list(heads)
        else:
            raise ValueError(f"heads tensor must be [k] or [B={batch}, k], got shape {tuple(heads.shape)}")
    else:
        items = list(heads)
        if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            rows = [torch.tensor(items)] * batch
        elif len(items) == batch:
            rows = [torch.as_tensor(x) for x in items]
        else:
            raise ValueError(f"heads must be one index set or {batch} index sets (one per sample)")
    out = []
    for row in rows:
        row = row.to(device=device, dtype=torch.long).flatten()
        if row.numel() == 0:
            raise ValueError("heads: every sample needs at least one selected head")
        if int(row.min()) < 0 or int(row.max()) >= num_heads:
            raise ValueError(f"heads: indices must lie in [0, {num_heads - 1}], got {row.tolist()}")
        if row.unique().numel() != row.numel():
            raise ValueError(f"heads: duplicate indices {row.tolist()}")
        out.append(row)
    return out


def aggregate(
    attn: torch.Tensor,
    heads: HeadIndices,
    mode: str = "mean",
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate the selected heads' attention into per-token scores (float32).

    Args:
        attn: ``[H, N]`` (one sample) or ``[B, H, N]``; any float dtype, upcast to float32.
        heads: selected head indices: one 1-D set (shared by every sample), or for a batch a list of B
            sets / a ``[B, k]`` tensor (e.g. the output of :func:`finepruner.heads.select_batch`).
        mode: ``"mean"`` or ``"softmax_weighted"``.
        scores: per-head scores over **all** heads, ``[H]`` or ``[B, H]`` (e.g. ``score(...)`` or
            ``Selection.scores``); required for ``softmax_weighted``, where the weights are
            ``softmax(scores[heads])``.

    Returns:
        ``[N]`` for a single sample, ``[B, N]`` for a batch.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    if not isinstance(attn, torch.Tensor) or attn.dim() not in (2, 3):
        raise ValueError("attn must be a tensor [H, N] or [B, H, N]")
    single = attn.dim() == 2
    a = as_float32(attn)
    if single:
        a = a.unsqueeze(0)
    batch, num_heads, _ = a.shape
    rows = _index_rows(heads, batch, num_heads, a.device)

    if mode == "softmax_weighted":
        if scores is None:
            raise ValueError("mode='softmax_weighted' needs scores= (per-head scores over all heads)")
        s = as_float32(torch.as_tensor(scores)).to(a.device)
        if s.dim() == 1:
            s = s.unsqueeze(0).expand(batch, -1)
        if tuple(s.shape) != (batch, num_heads):
            raise ValueError(
                f"scores must have shape [{num_heads}] or [{batch}, {num_heads}], got {tuple(s.shape)}"
            )

    weights = torch.zeros(batch, num_heads, dtype=torch.float32, device=a.device)
    for b, row in enumerate(rows):
        if mode == "mean":
            weights[b, row] = 1.0 / row.numel()
        else:
            picked = s[b, row]
            if not bool(torch.isfinite(picked).all()):
                raise ValueError("scores of the selected heads must be finite")
            weights[b, row] = torch.softmax(picked, dim=0)
    out = torch.einsum("bh,bhn->bn", weights, a)
    return out[0] if single else out
