"""Cheap attention signals for scoring visual tokens (spec ``transformers_notes.md`` §3.1).

``last_query_attention`` gives the attention of the last prompt token to every position, per head,
from one decoder layer's own q/k projections: one query row instead of an L x L eager attention,
so it works whatever attention implementation the model runs (sdpa, eager, FlashAttention).
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings; ``x`` is [B, heads, L, d], ``cos``/``sin`` are [B, L, d]."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def last_query_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask2d: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention of the last position's query over all keys of ``layer``, in float32.

    Args:
        layer: a Llama-style decoder layer (``input_layernorm`` and ``self_attn.{q,k}_proj``).
        hidden: the layer's input hidden states [B, L, D].
        position_embeddings: ``(cos, sin)`` for those positions, [B, L, head_dim] each.
        mask2d: [B, L] padding mask (1 = real token) or None.

    Returns:
        [B, heads, L] float32 probabilities; padded keys get 0. This equals row L-1 of the layer's
        eager attention (causal: the last query sees every key).
    """
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query = _rope(query.float(), cos[:, -1:].float(), sin[:, -1:].float())
    key = _rope(key.float(), cos.float(), sin.float())
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
    logits = (query @ key.transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, L]
    if mask2d is not None:
        logits = logits.masked_fill(~mask2d.bool()[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)
