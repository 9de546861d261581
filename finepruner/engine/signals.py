"""Cheap attention signals for scoring visual tokens (spec ``transformers_notes.md`` §3.1).

``last_query_attention`` gives the attention of the last prompt token to every position, per head,
from one decoder layer's own q/k projections: one query row instead of an L x L eager attention,
so it works whatever attention implementation the model runs (sdpa, eager, FlashAttention). When the
layer has already run on these tokens, its keys come from its KV-cache entry (after RoPE) and only the
last token's query is projected.
``query_attention`` does the same for a chosen set of query positions per sample (e.g. SparseVLM's text
raters), and ``StageSignals`` hands such signals to a method lazily, at one pruning stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device | None:
    """The device a module computes on: that of its first parameter not on ``meta``, else the execution
    device of an accelerate hook (weights offloaded by ``device_map``), else None."""
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if isinstance(device, (str, int, torch.device)) else None


def _to(device: torch.device | None, *tensors):
    """``tensors`` moved to ``device`` (None entries and ``device=None`` pass through)."""
    if device is None:
        return tensors
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings; ``x`` is [B, heads, L, d], ``cos``/``sin`` are [B, L, d]."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _heads(attn: nn.Module, projected: torch.Tensor, norm: str) -> torch.Tensor:
    """[B, L, heads * d] projections -> [B, heads, L, d], with the attention's per-head RMSNorm where it has one
    (``q_norm``/``k_norm``: Qwen3-VL normalises q and k over ``head_dim`` before RoPE, ``spec/models.md`` §3)."""
    batch, length = projected.shape[:2]
    heads = projected.view(batch, length, -1, attn.head_dim)
    module = getattr(attn, norm, None)
    if module is not None:
        heads = module(heads)
    return heads.transpose(1, 2)


def _scoring_keys(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor | None,
    rotated_keys: torch.Tensor | None,
    num_query_heads: int,
) -> torch.Tensor:
    """The layer's rotated keys in float32, [B, num_query_heads, L, head_dim] (grouped-query heads
    repeated): the cached ``rotated_keys`` as they are, else ``keys`` (or the layer's ``k_proj`` on
    ``hidden``) rotated in float32."""
    if rotated_keys is not None:
        key = rotated_keys.float()
    else:
        attn = layer.self_attn
        if keys is None:
            keys = attn.k_proj(layer.input_layernorm(hidden))
        cos, sin = position_embeddings
        key = _heads(attn, keys, "k_norm")
        key = _rope(key.float(), cos.float(), sin.float())
    groups = num_query_heads // key.shape[1]
    return key.repeat_interleave(groups, dim=1) if groups > 1 else key


def last_query_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask2d: torch.Tensor | None,
    keys: torch.Tensor | None = None,
    rotated_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of the last position's query over all keys of ``layer``, in float32.

    Args:
        layer: a Llama-style decoder layer (``input_layernorm`` and ``self_attn.{q,k}_proj``).
        hidden: the layer's input hidden states [B, L, D].
        position_embeddings: ``(cos, sin)`` for those positions, [B, L, head_dim] each.
        mask2d: [B, L] padding mask (1 = real token) or None.
        keys: the layer's ``k_proj`` output on ``hidden`` [B, L, kv_heads * head_dim] when already known
            (captured while the layer ran); only RoPE is then applied to them.
        rotated_keys: the layer's keys after RoPE [B, kv_heads, L, head_dim] when already known: its
            KV-cache entry of this prefill (``transformers_notes.md`` §3.1). They replace ``keys``.

    Without ``keys`` or ``rotated_keys`` the layer's ``k_proj`` runs over all L tokens. The cached keys
    are the ones the layer's own attention used: in float32 models they equal the recomputed ones bit for
    bit (same projection, same RoPE formula); in bf16/fp16 models they carry the model dtype's rounding
    of the rotated keys (the recomputation rotates in float32), as the layer's attention itself does.

    Returns:
        [B, heads, L] float32 probabilities; padded keys get 0. This equals row L-1 of the layer's
        eager attention (causal: the last query sees every key).
    """
    attn = layer.self_attn
    hidden, cos, sin, mask2d, keys, rotated_keys = _to(execution_device(attn.q_proj), hidden, *position_embeddings,
                                                       mask2d, keys, rotated_keys)
    query = _heads(attn, attn.q_proj(layer.input_layernorm(hidden[:, -1:])), "q_norm")
    query = _rope(query.float(), cos[:, -1:].float(), sin[:, -1:].float())
    key = _scoring_keys(layer, hidden, (cos, sin), keys, rotated_keys, query.shape[1])
    logits = (query @ key.transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, L]
    if mask2d is not None:
        logits = logits.masked_fill(~mask2d.bool()[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def eager_last_query_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask2d: torch.Tensor | None,
) -> torch.Tensor:
    """``last_query_attention`` computed the way the original FastV code did: the full [B, heads, L, L]
    causal attention of the layer is materialised (q and k for every token, logits in the model dtype,
    softmax in float32 as transformers' eager attention), and its last row is returned.

    Only for ``score_impl="eager"``: it shows the cost of that approach beside the one-row signal (the
    original also reused the matrix for the layer's A·V, which here the layer's own kernel still does).
    Returns [B, heads, L] float32, equal to ``last_query_attention`` up to rounding.
    """
    attn = layer.self_attn
    length = hidden.shape[1]
    hidden, cos, sin, mask2d = _to(execution_device(attn.q_proj), hidden, *position_embeddings, mask2d)
    position_embeddings = (cos, sin)
    normed = layer.input_layernorm(hidden)
    query = _heads(attn, attn.q_proj(normed), "q_norm")
    key = _heads(attn, attn.k_proj(normed), "k_norm")
    cos, sin = (t.to(query.dtype) for t in position_embeddings)
    query, key = _rope(query, cos, sin), _rope(key, cos, sin)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
    logits = (query @ key.transpose(-1, -2)) * attn.scaling  # [B, H, L, L], materialised
    allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None, None]
    if mask2d is not None:
        allowed = allowed & mask2d.bool()[:, None, None, :]
    probs = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min).softmax(dim=-1, dtype=torch.float32)
    return probs[:, :, -1]


def query_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask2d: torch.Tensor | None,
    query_index: torch.Tensor,
    keys: torch.Tensor | None = None,
    rotated_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention rows of chosen query positions over all keys of ``layer``, in float32.

    Args:
        layer: a Llama-style decoder layer.
        hidden: the layer's input hidden states [B, L, D].
        position_embeddings: ``(cos, sin)`` for those positions, [B, L, head_dim] each.
        mask2d: [B, L] padding mask (1 = real token) or None.
        query_index: [B, Q] sequence positions of the queries (any valid position for unused slots).
        keys: the layer's ``k_proj`` output on ``hidden`` [B, L, kv_heads * head_dim] when already known
            (the engine captures it while the layer runs), so that only the Q query rows are projected.
        rotated_keys: the layer's keys after RoPE [B, kv_heads, L, head_dim] when already known (the
            layer's KV-cache entry of this prefill); they replace ``keys`` and the key rotation.

    Returns:
        [B, heads, Q, L] float32 probabilities, causal (key j is seen by a query at position i iff j <= i)
        and 0 on padded keys: rows of the layer's eager attention, without the L x L matrix.
    """
    attn = layer.self_attn
    length, width = hidden.shape[1:]
    hidden, cos, sin, mask2d, query_index, keys, rotated_keys = _to(
        execution_device(attn.q_proj), hidden, *position_embeddings, mask2d, query_index, keys, rotated_keys)
    position_embeddings = (cos, sin)
    rows = hidden.gather(1, query_index[..., None].expand(-1, -1, width))
    query = _heads(attn, attn.q_proj(layer.input_layernorm(rows)), "q_norm")
    cos, sin = position_embeddings
    query_cos = cos.gather(1, query_index[..., None].expand(-1, -1, cos.shape[-1]))
    query_sin = sin.gather(1, query_index[..., None].expand(-1, -1, sin.shape[-1]))
    query = _rope(query.float(), query_cos.float(), query_sin.float())
    key = _scoring_keys(layer, hidden, (cos, sin), keys, rotated_keys, query.shape[1])
    logits = (query @ key.transpose(-1, -2)) * attn.scaling  # [B, H, Q, L]
    allowed = torch.arange(length, device=hidden.device)[None, None, :] <= query_index[:, :, None]  # [B, Q, L]
    if mask2d is not None:
        allowed = allowed & mask2d.bool()[:, None, :]
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)


@dataclass
class StageSignals:
    """Language-side signals at one pruning stage of one prefill, computed only when a method asks.

    The engine builds one per stage (``StageContext.signals``); building it costs nothing.

    Attributes:
        lm: the language model (``layers``, ``rotary_emb``).
        hidden: [B, L, D] the hidden states this stage prunes (the input of ``stage.layer``).
        position_ids: [B, L] their position ids.
        mask2d: [B, L] padding mask (1 = real token) or None.
        visual_index: [B, V] sequence positions of the current visual tokens in ``hidden``.
        source_index: [B, L] position of each current token in the prefill input; -1 for tokens that an
            earlier stage inserted.
        inputs_embeds: [B, L0, D] the prefill input of layer 0 (after the image features were placed).
        input_mask2d: [B, L0] its padding mask, or None.
        input_visual_index: [B, N] positions of the visual tokens in the prefill input (of this selection's
            budget unit: one image of the sample on families with per-image budgets).
        input_image_mask: [B, L0] bool, every visual token of the sample in the prefill input (all its
            images), or None.
        score_layer: the stage's ``score_layer`` (None: none declared).
        score_input: ``(hidden, (cos, sin), mask2d)`` the input of ``score_layer``; it holds the same
            tokens as ``hidden`` (no stage lies between ``score_layer`` and the stage).
        score_keys: the ``k_proj`` output of ``score_layer`` captured while it ran, or None.
        score_rotated_keys: ``score_layer``'s keys after RoPE from its KV-cache entry (prefill with a
            cache), or None; preferred over ``score_keys``.
        memo: a dict shared by all stages of one prefill (e.g. for values computed once per prompt).
    """

    lm: nn.Module
    hidden: torch.Tensor
    position_ids: torch.Tensor
    mask2d: torch.Tensor | None
    visual_index: torch.Tensor
    source_index: torch.Tensor
    inputs_embeds: torch.Tensor
    input_mask2d: torch.Tensor | None
    input_visual_index: torch.Tensor
    score_layer: int | None = None
    input_image_mask: torch.Tensor | None = None
    score_input: tuple | None = None
    score_keys: torch.Tensor | None = None
    score_rotated_keys: torch.Tensor | None = None
    memo: dict = field(default_factory=dict)

    @property
    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` [B, L, head_dim] of the current tokens, as the score layer used them."""
        return self.score_input[1]

    def query_attention(self, query_index: torch.Tensor) -> torch.Tensor:
        """[B, heads, Q, L] float32 attention rows of ``score_layer`` for the queries at ``query_index``
        [B, Q] (current sequence positions), over all current tokens (``query_attention``)."""
        if self.score_layer is None:
            raise RuntimeError("this stage declared no score_layer; attention rows are not available")
        hidden, embeddings, mask2d = self.score_input
        layer = self.lm.layers[self.score_layer]
        return query_attention(layer, hidden, embeddings, mask2d, query_index, self.score_keys,
                               self.score_rotated_keys)

    def rotated_keys(self) -> torch.Tensor:
        """[B, kv_heads, L, head_dim] float32 keys of ``score_layer`` after RoPE for the current tokens: its
        KV-cache entry when the prefill has a cache, else its captured (or recomputed) ``k_proj`` output
        rotated with the positions the layer used."""
        if self.score_layer is None:
            raise RuntimeError("this stage declared no score_layer; its keys are not available")
        hidden, embeddings, _ = self.score_input
        layer = self.lm.layers[self.score_layer]
        kv_heads = (self.score_rotated_keys.shape[1] if self.score_rotated_keys is not None
                    else layer.self_attn.k_proj.out_features // layer.self_attn.head_dim)
        return _scoring_keys(layer, hidden, embeddings, self.score_keys, self.score_rotated_keys, kv_heads)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's final norm applied to ``hidden`` (e.g. DART's normalised states)."""
        return self.lm.norm(hidden)

    def current_index(self, input_positions: torch.Tensor) -> torch.Tensor:
        """Current sequence positions of tokens given by their prefill-input positions [B, Q]; -1 for
        tokens that are no longer in the sequence."""
        batch, length = self.source_index.shape
        inverse = torch.full((batch, self.inputs_embeds.shape[1] + 1), -1, dtype=torch.long,
                             device=self.source_index.device)
        current = torch.arange(length, device=self.source_index.device).expand(batch, -1)
        slot = torch.where(self.source_index >= 0, self.source_index, inverse.shape[1] - 1)
        inverse.scatter_(1, slot, current)
        inverse[:, -1] = -1
        return inverse.gather(1, input_positions)
