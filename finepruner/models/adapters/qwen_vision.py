"""Vision-side signals of the Qwen-VL towers (no [CLS]), per encoded image (``spec/models.md`` §4).

Qwen's vision attention returns only its output (``output_attentions`` gives outputs, not weights), so
the attention is recomputed in a forward hook on the **last block**'s attention from the hook's input
(``norm1`` of the previous block's output): ``qkv``, the block's own vision RoPE, a softmax per attention
segment the block used (``cu_seqlens``: the image for a full-attention block), in float32. The signal
stand-in for [CLS] (``cls_attention``, VisPruner#1's rule for towers without [CLS]) is the attention each
patch *receives*: mean over heads and over the queries of its segment, then mean over each 2 x 2 merge
unit (the merger folds those 4 patches into one token). Qwen2.5-VL's tower runs in window-permuted order at
merge-unit granularity; the signal is put back in the merged tokens' raster order with
``argsort(window_index)``, exactly as the tower un-permutes its merged output. ``patch_features`` are the
merged tokens (the merger's output, un-permuted): VisPruner de-duplicates on them, as LightCompress's port
does. Query chunks keep the score at O(chunk x N) memory per head.

VisionZip (LightCompress's Qwen2.5-VL port, ``methods_more.md`` §8) also reads ``feature_keys``: the last
block's keys after the block's vision RoPE (as LightCompress stores them), mean over each merge unit's 4
patches and over heads, un-permuted. HiPrune (``methods_more.md`` §4.1, the official Qwen2.5-VL code) reads
``received_attention@l``: at vision block ``l`` (``"received_attention"`` alone: the last block, whose output
the merger reads) the attention each patch receives, **mean over heads and sum over the queries** of the
block's own segments (windows on Qwen2.5-VL's window blocks, the image on full-attention blocks; the official
``mean(0).sum(0)``), then mean over each merge unit, un-permuted. Every image also gets ``grid_column``: each
merged token's column on the image's grid (raster order), from which a method reads the grid's width.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from finepruner.engine.vision import VisionSignals

#: Queries per chunk of the recomputed attention (bounds memory at chunk x segment length per head).
_QUERY_CHUNK = 1024
#: Signals a Qwen capture provides (besides the projected features the engine takes from the LM input);
#: ``received_attention`` also stands for its per-block form ``received_attention@l``.
QWEN_SIGNALS = frozenset({"cls_attention", "patch_features", "projected_features", "feature_keys",
                          "received_attention"})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotated_query_key(attention: nn.Module, hidden: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query, key)`` [N, heads, d] float32 of one Qwen vision attention call, after the block's vision RoPE."""
    length = hidden.shape[0]
    qkv = attention.qkv(hidden).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).float()
    query, key = qkv[0], qkv[1]  # [N, heads, d]
    cos, sin = (t.unsqueeze(-2).float() for t in position_embeddings)
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def received_attention_segments(attention: nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                                position_embeddings: tuple[torch.Tensor, torch.Tensor],
                                reduce: str = "mean") -> torch.Tensor:
    """[N] float32: the attention each of the N rows receives in one Qwen vision attention call, mean over
    heads and over the queries of its ``cu_seqlens`` segment (softmax within the segment, as the block);
    ``reduce="sum"``: summed over those queries (HiPrune's official ``mean(0).sum(0)``)."""
    length = hidden.shape[0]
    query, key = rotated_query_key(attention, hidden, position_embeddings)
    scale = query.shape[-1] ** -0.5
    received = torch.zeros(length, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        keys = key[start:end].transpose(0, 1)  # [heads, n, d]
        total = torch.zeros(end - start, dtype=torch.float32, device=hidden.device)
        for q0 in range(start, end, _QUERY_CHUNK):
            queries = query[q0:min(end, q0 + _QUERY_CHUNK)].transpose(0, 1)  # [heads, c, d]
            probs = (queries @ keys.transpose(1, 2) * scale).softmax(dim=-1)  # [heads, c, n]
            total += probs.sum(dim=(0, 1))
        received[start:end] = total / (attention.num_heads * (end - start if reduce == "mean" else 1))
    return received


def _block_index(name: str, depth: int) -> int | None:
    """The vision block a ``received_attention`` name asks for (the bare name: the last block), else None."""
    from finepruner.engine.vision import RECEIVED_PREFIX

    if name == "received_attention":
        return depth - 1
    if not name.startswith(RECEIVED_PREFIX):
        return None
    text = name[len(RECEIVED_PREFIX):]
    if not text.isdigit() or not int(text) < depth:
        raise ValueError(f"vision signal {name!r}: the layer must be a vision block index in 0..{depth - 1}")
    return int(text)


def grid_columns(height: int, width: int) -> torch.Tensor:
    """[h * w] long: each merged token's column on its image's h x w grid, in raster order
    (``VisionSignals.grid_column``)."""
    return torch.arange(width).repeat(height)


class QwenVisionCapture:
    """Hooks on a Qwen-VL vision tower recording, per image encoding, what ``needs`` asks for (the same
    interface as ``engine.vision.VisionCapture`` on families whose signals come per image)."""

    def __init__(self, adapter: Any, needs: tuple[str, ...]) -> None:
        from finepruner.engine.vision import RECEIVED_PREFIX

        unknown = sorted(n for n in set(needs) - QWEN_SIGNALS if not n.startswith(RECEIVED_PREFIX))
        if unknown:
            raise ValueError(f"vision signal(s) {unknown} are not provided on {adapter.family}; "
                             f"available: {sorted(QWEN_SIGNALS)}")
        self.adapter = adapter
        self.needs = tuple(needs)
        tower = adapter.vision_tower
        self._merge = int(tower.spatial_merge_size)
        self._grids: list[torch.Tensor] = []  # image_grid_thw of each tower call
        self._order: list[torch.Tensor | None] = []  # merged-token permutation of each call (None: raster)
        self._received: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._merged: list[torch.Tensor] = []
        depth = len(tower.blocks)
        self._depth = depth
        blocks = sorted({b for name in needs if (b := _block_index(name, depth)) is not None})
        self._layers: dict[int, list[torch.Tensor]] = {block: [] for block in blocks}
        self._hooks = [tower.register_forward_pre_hook(self._on_tower, with_kwargs=True)]
        if {"cls_attention", "feature_keys"} & set(needs):
            self._hooks.append(tower.blocks[-1].attn.register_forward_hook(self._on_attention, with_kwargs=True))
        for block in blocks:
            hook = functools.partial(self._on_layer, block)
            self._hooks.append(tower.blocks[block].attn.register_forward_hook(hook, with_kwargs=True))
        if "patch_features" in needs:
            self._hooks.append(tower.merger.register_forward_hook(self._on_merger))

    def _on_tower(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            return
        self._grids.append(grid.detach().cpu())
        self._order.append(self.adapter.window_order(grid))

    @staticmethod
    def _call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Any]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        return hidden, cu_seqlens, kwargs.get("position_embeddings")

    def _on_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden, cu_seqlens, embeddings = self._call_inputs(args, kwargs)
        with torch.no_grad():
            if "cls_attention" in self.needs:
                self._received.append(received_attention_segments(module, hidden, cu_seqlens, embeddings))
            if "feature_keys" in self.needs:
                self._keys.append(rotated_query_key(module, hidden, embeddings)[1].mean(dim=1))  # [N, d]

    def _on_layer(self, block: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden, cu_seqlens, embeddings = self._call_inputs(args, kwargs)
        with torch.no_grad():
            self._layers[block].append(
                received_attention_segments(module, hidden, cu_seqlens, embeddings, reduce="sum"))

    def _on_merger(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._merged.append(output.detach())

    def reset(self) -> None:
        self._grids, self._order, self._received, self._merged, self._keys = [], [], [], [], []
        self._layers = {block: [] for block in self._layers}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.reset()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.adapter.family}: new tokens cannot be projected (the merger folds 2x2 patches)")

    @torch.no_grad()
    def take_images(self) -> list[VisionSignals] | None:
        """One ``VisionSignals`` per image of the last tower call, [V, ...] tensors in the merged tokens'
        raster order (consumed); None when no image was encoded since the last take."""
        if not self._grids:
            self.reset()
            return None
        grid, order = self._grids[-1], self._order[-1]
        unit = self._merge * self._merge
        counts = (grid.prod(-1) // unit).tolist()
        inverse = None if order is None else torch.argsort(order)

        def raster(values: torch.Tensor) -> torch.Tensor:  # per merge unit (mean), in raster order
            values = values.reshape(-1, unit, *values.shape[1:]).mean(dim=1)
            return values if inverse is None else values[inverse.to(values.device)]

        received = raster(self._received[-1]) if self._received else None
        keys = raster(self._keys[-1]) if self._keys else None
        layers = {block: raster(chunks[-1]) for block, chunks in self._layers.items() if chunks}
        merged = None
        if self._merged:
            merged = self._merged[-1]
            if inverse is not None:
                merged = merged[inverse.to(merged.device)]
        images, start = [], 0
        present = [t for t in (received, keys, merged, *layers.values()) if t is not None]
        device = present[0].device if present else torch.device("cpu")
        for count, (frames, height, width) in zip(counts, grid.tolist(), strict=True):
            part = slice(start, start + count)
            start += count
            columns = grid_columns(height // self._merge, width // self._merge) if frames == 1 else None
            images.append(VisionSignals(
                cls_attention=None if received is None else received[part],
                patch_features=None if merged is None else merged[part],
                feature_keys=None if keys is None else keys[part],
                received_attention={block: values[part] for block, values in layers.items()} or None,
                feature_layer=self._depth - 1,
                patches_per_image=count,
                image_token_id=self.adapter.image_token_id,
                grid_column=None if columns is None else columns.to(device),
            ))
        self.reset()
        return images
