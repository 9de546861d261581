"""Qwen2.5-VL (``model_type="qwen2_5_vl"``) and Qwen2-VL (``"qwen2_vl"``), ``spec/models.md`` §1.3, §2.2.

A ViT of 14-px patches (Qwen2.5: window attention except ``fullatt_block_indexes``) whose merger folds
2 x 2 patches into one language-model token, no [CLS]; each image has its own number of tokens
(``(H'/28)(W'/28)`` after ``smart_resize``), written as ``<|vision_start|>`` + N ``<|image_pad|>`` +
``<|vision_end|>``. Positions are 3-D mRoPE rows (temporal, height, width; ``get_rope_index``): the engine
carries them as [B, L, 3], gathers the kept tokens' columns (their original 3-D positions, as every
surveyed port does) and recomputes cos/sin with the model's own rotary module. The text row that
``generate`` prepends (row 0) only feeds mask construction in transformers; the engine builds its masks
from explicit 2-D masks and never passes positions to the layers, so it does not carry row 0.

Pre-LLM methods prune at the language model's layer 0, inside the engine's loop: ``input_ids`` and
``mm_token_type_ids`` are never shortened, so ``get_rope_index`` always sees the full prompt. A prefill
called without position ids gets them computed here on the full prompt (``prepare_prefill``), and
``rope_deltas`` is set afresh for every such call. Both Qwen2-VL and Qwen2.5-VL share this code path (the
same text model, rotary module, placeholders and ``get_rope_index``); only their towers differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finepruner.models.adapters.base import GridRegion, ModelAdapter, TokenGrid, TokenLayout, register_adapter

#: Upper bound of one image's tokens used to validate budgets before a prefill: the released checkpoints'
#: ``max_pixels`` (12,845,056 = 16,384 x 28^2 for Qwen2/2.5-VL; 16,777,216 = 16,384 x 32^2 for Qwen3-VL).
QWEN_MAX_IMAGE_TOKENS = 16384


def torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def pixel_limit_tokens(processor: Any, key: str) -> int | None:
    """Visual tokens of an image at one of the Qwen image processor's pixel limits, ``size[key]``
    (``"longest_edge"`` = max_pixels, ``"shortest_edge"`` = min_pixels) divided by
    ``(patch_size * merge_size)^2``; None when ``processor`` has no such limit."""
    images = getattr(processor, "image_processor", None) if processor is not None else None
    size = getattr(images, "size", None)
    pixels = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    patch, merge = getattr(images, "patch_size", None), getattr(images, "merge_size", None)
    if not (pixels and patch and merge):
        return None
    return int(pixels) // (int(patch) * int(merge)) ** 2


@register_adapter
class Qwen2_5_VLAdapter(ModelAdapter):
    """Hugging Face ``Qwen2_5_VLForConditionalGeneration`` (images; video prompts are not pruned)."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    model_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    config_class: ClassVar[str] = "Qwen2_5_VLConfig"
    per_image_budget: ClassVar[bool] = True
    description: ClassVar[str] = ("Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct): window-attention ViT + 2x2 merger, "
                                  "no [CLS], 3-D mRoPE positions; budgets per image")
    position_rows: ClassVar[int] = 3
    vision_attribute: ClassVar[str] = "visual"
    processors: ClassVar[tuple[str, ...]] = ("auto", "official", "finepruner")
    encoder_kwargs: ClassVar[tuple[str, ...]] = ("image_grid_thw",)
    #: whether the vision tower permutes its tokens into attention windows (Qwen2.5-VL).
    windowed: ClassVar[bool] = True
    instruction_stop: ClassVar[str | None] = "<|im_end|>"

    # -- parts ----------------------------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.vision_tower.merger

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @classmethod
    def has_cls(cls, config) -> bool:
        return False

    @classmethod
    def crop_tokens(cls, config) -> int:
        return cls.max_tokens(config)

    @classmethod
    def max_tokens(cls, config) -> int:
        """No fixed count: the bound of the released checkpoints' pixel limits (each image's own count is
        checked at its prefill)."""
        return QWEN_MAX_IMAGE_TOKENS

    @classmethod
    def merge_size(cls, config) -> int:
        return int(config.vision_config.spatial_merge_size)

    def processor_max_tokens(self, processor: Any) -> int | None:
        """``max_pixels / (patch_size * merge_size)^2`` of the processor's image processor (its
        ``size["longest_edge"]``), e.g. 144 for the toy Qwen's 336 x 336 limit; None when it has none."""
        return pixel_limit_tokens(processor, "longest_edge")

    def budget_floor(self, processor: Any = None) -> int:
        """The smallest image's visual tokens (``spec/models.md`` §5.1): ``min_pixels / (patch_size *
        merge_size)^2`` of ``processor``'s image processor (its ``size["shortest_edge"]``; 4 for the released
        checkpoints' 3,136 pixels), else 1. ``apply`` refuses a budget only when no count from here to
        ``budget_bound`` fits it; each image's own count is checked at its prefill."""
        smallest = pixel_limit_tokens(processor, "shortest_edge")
        return 1 if smallest is None else max(1, min(smallest, self.budget_bound(processor)))

    def image_token_counts(self, kwargs: Mapping[str, Any]) -> list[int] | None:
        """Each image's visual tokens in a call, from its ``image_grid_thw`` (``t * h * w / merge^2``) before
        the tower runs, so that budgets are checked per image before any encoding; None without a grid."""
        grid = kwargs.get("image_grid_thw")
        if not isinstance(grid, torch.Tensor) or grid.ndim != 2:
            return None
        merge = self.merge_size(self.config) ** 2
        return [int(v) // merge for v in grid.prod(dim=-1).tolist()]

    def token_grids(self, inputs: Mapping[str, Any], sample: int = 0) -> TokenLayout:
        """The sample's image as one merged grid ``(h / merge) x (w / merge)`` of its ``image_grid_thw`` row
        (``spec/models.md`` §1.3-§1.4: raster order), covering the whole image as ``smart_resize`` resized it."""
        self.refuse_video(inputs)
        counts = self.image_token_counts(inputs)
        if counts is None:
            raise ValueError("the inputs have no image_grid_thw: the image's merged grid is unknown")
        index, span = self.single_image(inputs, sample, counts)
        frames, height, width = (int(v) for v in inputs["image_grid_thw"][index].tolist())
        merge = self.merge_size(self.config)
        if frames != 1:
            raise ValueError(f"the image has {frames} temporal patches (a video?): only a single image is drawn")
        return TokenLayout(span.count, (GridRegion(TokenGrid(0, height // merge, width // merge)),))

    # -- positions ------------------------------------------------------------------------------------
    def lm_positions(self, position_ids: torch.Tensor | None, batch: int, length: int, past: int,
                     device: torch.device) -> torch.Tensor:
        """[B, L, 3] mRoPE rows from what the text model accepts: (4, B, L) (``generate``: row 0 is the text
        row, dropped), (3, B, L), (B, L) (the same row three times) or None (counting on from ``past``)."""
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past)[None].expand(batch, -1)
        if position_ids.ndim == 2:
            return position_ids.expand(batch, -1)[..., None].expand(-1, -1, 3)
        if position_ids.ndim != 3 or position_ids.shape[0] not in (3, 4):
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)}; {self.family} takes (4, B, L), (3, B, L) or (B, L)"
            )
        rows = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
        return rows.expand(3, batch, -1).permute(1, 2, 0)

    def rotary_embeddings(self, lm: nn.Module, hidden: torch.Tensor,
                          positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lm.rotary_emb(hidden, positions.permute(2, 0, 1))

    def renumbers(self, method: Any) -> bool:
        """Never: kept tokens keep their original 3-D positions. A method whose official default is to
        renumber (PDrop, the pre-LLM methods) keeps them too, as every Qwen port does (``spec/models.md``
        §2.2); an explicit ``positions="renumber"`` is refused, since a contiguous renumbering of mRoPE
        rows would destroy the image's 2-D layout and the text row alone does not reach the rotary
        embeddings."""
        if method.positions == "renumber" and getattr(method, "explicit_positions", False):
            raise ValueError(
                f"{method.name}: positions='renumber' is not defined on {self.family} (3-D mRoPE positions: "
                "renumbering them contiguously would destroy each image's 2-D layout, spec/models.md §2.2); "
                "use positions='original' (the default here, as every published Qwen port)"
            )
        return False

    def prepare_prefill(self, module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Explicit 4-row position ids for a prefill called without them (``model(**inputs)``): the model's
        ``get_rope_index`` on the full prompt plus the text row ``cumsum - 1`` (padding at 1), as ``generate``
        builds them; ``rope_deltas`` is set from this prompt (never left over from an earlier request)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("position_ids") is not None or (cache is not None and cache.get_seq_length() > 0):
            return None
        input_ids, types = kwargs.get("input_ids"), kwargs.get("mm_token_type_ids")
        if input_ids is None or types is None or kwargs.get("image_grid_thw") is None:
            module.rope_deltas = None
            return None
        mask = kwargs.get("attention_mask")
        rows, deltas = module.get_rope_index(
            input_ids, mm_token_type_ids=types, image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"), attention_mask=mask,
            **({"second_per_grid_ts": kwargs["second_per_grid_ts"]} if kwargs.get("second_per_grid_ts") is not None
               else {}))
        module.rope_deltas = deltas
        if mask is None:
            text = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        else:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return {**kwargs, "position_ids": torch.cat([text[None].to(rows.dtype), rows], dim=0)}

    # -- vision-side signals ----------------------------------------------------------------------------
    def vision_signals_supported(self) -> frozenset[str]:
        """Per image (``adapters.qwen_vision``): the attention each merged token receives in the last vision
        block as ``cls_attention`` (no [CLS]; un-permuted from the window order), the merged tokens as
        ``patch_features``, the language model's input rows as ``projected_features``, the last block's
        RoPE'd head-mean keys per merged token as ``feature_keys`` (VisionZip, LightCompress's port) and the
        attention received at any block as ``received_attention@l`` (HiPrune)."""
        from finepruner.models.adapters.qwen_vision import QWEN_SIGNALS

        return QWEN_SIGNALS

    #: HiPrune's official object layer on this tower family (1-based) and the depth it is set for:
    #: ``HIPRUNE_OBJECT_LAYER=16`` of Qwen2.5-VL's 32 blocks (``methods_more.md`` §4.1); other depths take
    #: the same fraction (Qwen2-VL, Qwen3-VL, tiny towers: our inference).
    hiprune_object_layer: ClassVar[tuple[int, int]] = (16, 32)

    def vision_layers(self) -> tuple[int, int]:
        """``(depth, feature block)`` of the vision tower: its blocks, and the block whose output the merger
        reads (the last one; HiPrune's deep layer, official ``attn_list[-1]``)."""
        depth = int(self.vision_config.depth)
        return depth, depth - 1

    @property
    def projects_new_tokens(self) -> bool:
        return False

    def vision_unsupported_reason(self) -> str:
        return ("the Qwen vision tower has no [CLS] token: [CLS]-query signals (the summed [CLS] row and [CLS] "
                "vector of VisionZip's cls_token=True, PruMerge's [CLS] row) have no defined value, and "
                "pre-merger CLIP-style features (CDPruner's CLIP relevance) are not provided")

    @property
    def signals_per_image(self) -> bool:
        return True

    def make_vision_capture(self, needs: tuple[str, ...]) -> Any:
        from finepruner.models.adapters.qwen_vision import QwenVisionCapture

        return QwenVisionCapture(self, needs)

    def window_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """The tower's merged-token order (``window_index``) for images ``grid_thw``; None when the tower
        keeps raster order (no windows)."""
        if not self.windowed:
            return None
        from transformers.vision_utils import get_vision_window_index

        vision = self.vision_config
        order, _ = get_vision_window_index(grid_thw, spatial_merge_size=int(vision.spatial_merge_size),
                                           window_size=int(vision.window_size), patch_size=int(vision.patch_size))
        return order.cpu()

    # -- FLOPs and manual decoding ----------------------------------------------------------------------
    @classmethod
    def merger_vision_shape(cls, config) -> Any:
        """The tower's shape for ``bench.flops.merger_vision_flops``: Qwen2.5-VL's SwiGLU blocks, 112-px windows
        except ``fullatt_block_indexes``, one merger."""
        from finepruner.bench.flops import MergerVisionShape

        vision = config.vision_config
        merge = int(vision.spatial_merge_size)
        return MergerVisionShape(
            hidden=int(vision.hidden_size), intermediate=int(vision.intermediate_size), layers=int(vision.depth),
            patch=int(vision.patch_size), temporal_patch=int(vision.temporal_patch_size),
            channels=int(vision.in_channels), merge=merge, out_hidden=int(vision.out_hidden_size), gated=True,
            window=int(vision.window_size) // merge // int(vision.patch_size),
            full_layers=tuple(int(i) for i in vision.fullatt_block_indexes),
        )

    @classmethod
    def vision_flops(cls, config, visual_tokens, batch, crops, grids) -> dict | None:
        """Tower and merger FLOPs from the encoded images' grids; without them (a prefill the handle did not
        see encode), one square image of ``visual_tokens[0]`` tokens per sample."""
        from finepruner.bench.flops import merger_vision_flops

        shape = cls.merger_vision_shape(config)
        if not grids:
            if not visual_tokens or not visual_tokens[0]:
                return None
            side = max(1, round(int(visual_tokens[0]) ** 0.5)) * shape.merge
            grids = [(1, side, side)] * (crops or batch)
        report = merger_vision_flops(shape, grids)
        report["images"] = len(grids)
        return report

    def tower_grids(self, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[int, int, int]] | None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return None if grid is None else [tuple(int(v) for v in row) for row in grid.tolist()]

    def decode_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """[4, B, 1] position ids of each sample's last prompt token (the text row and the three mRoPE rows of
        ``get_rope_index`` on the prompt): a manual decode call must pass ``last + step`` (transformers 5.24
        cannot derive them from the attention mask, ``spec/models.md`` §2.2)."""
        prepared = self.prepare_prefill(self.llava_model, dict(inputs))
        if prepared is None:
            return None
        return prepared["position_ids"][:, :, -1:]

    # -- processors -------------------------------------------------------------------------------------
    @classmethod
    def load_processor(cls, directory: Path, choice: str, kwargs: Mapping[str, Any]) -> Any:
        """The official processor when torchvision is installed (``"auto"``) or asked for (``"official"``:
        without torchvision a ``MissingPackageError``), else ``finepruner.models.qwen_processor`` (images
        only; ``kwargs`` such as ``min_pixels``/``max_pixels`` go to its image processor)."""
        from finepruner.models.loading import MissingPackageError, load_auto_processor
        from finepruner.models.qwen_processor import QwenImageProcessor

        if choice == "official" and not torchvision_available():
            raise MissingPackageError(
                f"checkpoint {directory}: the official {cls.family_name()} processor needs torchvision, which is "
                "not installed: pip install finepruner[qwen] (or processor='finepruner', images only)"
            )
        if choice == "official" or (choice == "auto" and torchvision_available()):
            return load_auto_processor(directory, kwargs)
        return QwenImageProcessor.from_pretrained(directory, **kwargs)


@register_adapter
class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    """Hugging Face ``Qwen2VLForConditionalGeneration``: the Qwen2.5-VL path with a full-attention tower."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    model_class: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    config_class: ClassVar[str] = "Qwen2VLConfig"
    description: ClassVar[str] = ("Qwen2-VL (Qwen/Qwen2-VL-*-Instruct): ViT + 2x2 merger, no [CLS], 3-D mRoPE "
                                  "positions; budgets per image")
    windowed: ClassVar[bool] = False

    @classmethod
    def merger_vision_shape(cls, config) -> Any:
        """Qwen2-VL's tower: full attention in every block, two-matrix MLPs of ``mlp_ratio``, one merger to the
        language model's width (``vision_config.hidden_size``)."""
        from finepruner.bench.flops import MergerVisionShape

        vision = config.vision_config
        return MergerVisionShape(
            hidden=int(vision.embed_dim), intermediate=int(vision.embed_dim * vision.mlp_ratio),
            layers=int(vision.depth), patch=int(vision.patch_size), temporal_patch=int(vision.temporal_patch_size),
            channels=int(vision.in_channels), merge=int(vision.spatial_merge_size), out_hidden=int(vision.hidden_size),
        )
