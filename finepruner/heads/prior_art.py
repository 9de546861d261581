"""Head-level prior art beside FinePruner-Head (spec methods_more.md §7, methods.md §2.3).

* **SparseVLM v2.0 priority heads**, applied to the last query (``strategy="sparsevlm_priority"``): the
  attention is divided by the RoPE-only logit between the query and each visual token ("gravity
  correction", methods.md §2.3 (a)); heads are ranked by their summed corrected visual attention and the
  top ``round(14/32 · num_heads)`` are kept (§2.3 (b): 14 of LLaMA-7B's 32 heads); the token score is the
  mean of those heads' corrected rows. Without the correction the ranking is exactly ``sum``'s.
* **HAWK** soft head weighting (``hawk_scores``): ``Σ_h w_h · A_h / ‖A_h‖₂`` with a static, offline
  per-head weight vector ``w`` (methods_more.md §7 table, "Selection").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from finepruner.heads.selection import Selection, sorted_long, top_heads
from finepruner.heads.statistics import as_float32

#: SparseVLM v2.0 keeps 14 heads of LLaMA-7B's 32 (``score.py:53``); other head counts scale the ratio.
PRIORITY_HEADS, PRIORITY_OF = 14, 32
GRAVITY_MODES = ("rope", "none")


def default_priority_heads(num_heads: int) -> int:
    """``round(14/32 · num_heads)`` (halves round up), at least 1: 14 of 32, 18 of 40, 12 of 28, 2 of 4."""
    return max(1, min(num_heads, math.floor(num_heads * PRIORITY_HEADS / PRIORITY_OF + 0.5)))


def rope_gravity(
    cos: torch.Tensor, sin: torch.Tensor, query_index: torch.Tensor | int, key_index: torch.Tensor
) -> torch.Tensor:
    """The RoPE-only logit ``(RoPE(1)_m · RoPE(1)_n)/√d`` between a query and keys (methods.md §2.3 (a)).

    With all-ones q and k, RoPE's dot product is ``cos_m·cos_n + sin_m·sin_n`` summed over the head
    dimension, i.e. ``(2/√d) Σ_i cos((m−n)θ_i)`` (methods.md pitfall 5).

    Args:
        cos, sin: the rotary tables the layer used, ``[B, L, d]``.
        query_index: sequence position of the query, an int (e.g. -1, the last token) or ``[B]``.
        key_index: ``[B, V]`` sequence positions of the keys (the visual tokens).

    Returns:
        ``[B, V]`` float32 divisors.
    """
    if cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [B, L, d] tensors of one shape, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    batch, length, dim = cos.shape
    if isinstance(query_index, int):
        query = torch.full((batch,), query_index % length, dtype=torch.long, device=cos.device)
    else:
        query = query_index.to(device=cos.device, dtype=torch.long).reshape(batch)
    rows = torch.arange(batch, device=cos.device)
    keys = key_index.to(cos.device)

    def gather(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = table.float()
        return table[rows, query], table.gather(1, keys[..., None].expand(-1, -1, dim))

    cos_q, cos_k = gather(cos)
    sin_q, sin_k = gather(sin)
    dot = (cos_k @ cos_q[:, :, None] + sin_k @ sin_q[:, :, None]).squeeze(-1)
    return dot / math.sqrt(dim)


def check_gravity(gravity: Any, num_visual: int) -> torch.Tensor | None:
    """The divisor ``[num_visual]`` float32, or None for ``gravity="none"``; raises a ValueError otherwise."""
    if isinstance(gravity, str):
        if gravity == "none":
            return None
        if gravity == "rope":
            raise ValueError(
                "sparsevlm_priority: gravity='rope' needs the RoPE-only logits of the query and the visual "
                "tokens, which the attention rows do not carry: pass gravity=<tensor [num_visual]> (e.g. from "
                "finepruner.heads.rope_gravity; the finepruner method computes it), or gravity='none'"
            )
    if not isinstance(gravity, torch.Tensor):
        raise ValueError(f"sparsevlm_priority: gravity must be 'rope', 'none' or a tensor [num_visual], got "
                         f"{type(gravity).__name__}")
    g = as_float32(gravity)
    if tuple(g.shape) != (num_visual,):
        raise ValueError(f"sparsevlm_priority: gravity must have shape [{num_visual}] (one divisor per visual "
                         f"token), got {tuple(g.shape)}")
    if not bool((g > 0).all()) or not bool(torch.isfinite(g).all()):
        raise ValueError(
            f"sparsevlm_priority: gravity divisors must be finite and positive, got min {float(g.min()):.4g}; "
            "RoPE's all-ones logit changes sign at long distances for small head dims: use gravity='none'"
        )
    return g


def select_priority(
    attn: torch.Tensor, heads: int | None, gravity: Any = "rope", definitions: str = "renormalised"
) -> Selection:
    """SparseVLM v2.0's priority heads on one sample's last-query row ``[H, N]`` (methods_more.md §7).

    ``score_h = Σ_j A_hj / g_j`` (``g`` = ``gravity``, the RoPE-only logit; ``"none"``: ``g = 1``, the
    same ranking as ``sum``); the top ``heads`` (default ``round(14/32·H)``) by score, ties lowest index
    first. ``Selection.scores`` holds ``score_h`` over all heads. ``definitions`` is validated only (the
    rule uses the raw attention).
    """
    from finepruner.heads.strategies import check_definitions

    check_definitions(definitions)
    num_heads, num_visual = attn.shape
    g = check_gravity(gravity, num_visual)
    count = default_priority_heads(num_heads) if heads is None else heads
    corrected = attn if g is None else attn / g.to(attn.device)
    scores = corrected.sum(dim=-1)
    ranked = top_heads(scores, count)
    info = {"num_heads": count, "gravity": "none" if g is None else "rope"}
    return Selection(sorted_long(ranked), ranked, scores, info)


def check_weights(weights: Any, num_heads: int, where: str = "weights") -> torch.Tensor:
    """HAWK-style head weights as float32 ``[num_heads]``: finite, non-negative, positive sum."""
    w = torch.as_tensor(weights, dtype=torch.float32) if not isinstance(weights, torch.Tensor) else weights.float()
    if tuple(w.shape) != (num_heads,):
        raise ValueError(f"{where}: must hold num_heads={num_heads} weights, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"{where}: weights must be finite and non-negative with a positive sum")
    return w


def hawk_scores(attn: torch.Tensor, weights: Any) -> torch.Tensor:
    """HAWK's soft selection: ``Σ_h w_h · A_h / ‖A_h‖₂`` over the visual tokens (methods_more.md §7).

    Args:
        attn: per-head token scores ``[H, N]`` or ``[B, H, N]`` (here: last-query attention), any float dtype.
        weights: ``[H]`` static non-negative head weights (a head with weight 0 is unused).

    Returns:
        float32 ``[N]`` or ``[B, N]``. A head whose row is all zeros contributes 0.
    """
    if not isinstance(attn, torch.Tensor) or attn.dim() not in (2, 3):
        raise ValueError("attn must be a tensor [H, N] or [B, H, N]")
    a = as_float32(attn)
    w = check_weights(weights, a.shape[-2]).to(a.device)
    unit = torch.nn.functional.normalize(a, p=2, dim=-1)
    return torch.einsum("h,...hn->...n", w, unit)
