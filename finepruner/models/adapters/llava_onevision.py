"""LLaVA-OneVision (``model_type="llava_onevision"``, ``spec/models.md`` §1.2).

SigLIP tower without [CLS] (feature layer -1, strategy ``"full"``), Qwen2 text model, 1-D positions.
A single-image sample is encoded anyres (base + unpadded grid, bilinearly shrunk beyond 9 crops, one
newline per row); as soon as a sample has two images every image is base-only plus one newline
(``batch_num_images``). Budgets are per image; newline tokens count as visual tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from finepruner.models.adapters.base import ImageGrids, ModelAdapter, PackedLayout, TokenLayout, register_adapter
from finepruner.models.adapters.llava_next import PACKED_SIGNALS, anyres_token_layout, packed_image_grids

#: ``vision_aspect_ratio`` that never downsamples (the index pass: the unpadded grid before the shrink).
_NO_SHRINK = "anyres_max_1000000000"


@register_adapter
class LlavaOnevisionAdapter(ModelAdapter):
    """llava-hf ``LlavaOnevisionForConditionalGeneration`` (images; video prompts are not pruned)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    model_class: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"
    config_class: ClassVar[str] = "LlavaOnevisionConfig"
    per_image_budget: ClassVar[bool] = True
    description: ClassVar[str] = ("LLaVA-OneVision (llava-hf/llava-onevision-*-hf): SigLIP without [CLS], "
                                  "anyres_max_9, image_newline; budgets per image")
    processor_requires: ClassVar[tuple[tuple[str, str], ...]] = (("torchvision", "onevision"),)
    encoder_kwargs: ClassVar[tuple[str, ...]] = (
        "image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
        "batch_num_images",
    )

    @classmethod
    def has_cls(cls, config) -> bool:
        return False

    packs_crops: ClassVar[bool] = True

    #: a token may mix several patches (the anyres_max shrink, bilinear): a token has no single crop patch, so
    #: methods that work on patch grids use the grids of the image's tokens (``image_grids``) instead.
    mixes_patches: ClassVar[bool] = True

    def vision_signals_supported(self) -> frozenset[str]:
        """Each image's projected features (its rows of the language model's input, newline tokens
        included) and the SigLIP signals of its crops mapped to its token order (``image_layouts``): as
        ``cls_attention`` the attention each patch receives in the feature layer (mean over heads and
        queries; SigLIP has no [CLS], ``spec/models.md`` §4), the pre-projector features and their
        ``post_layernorm``, HiPrune's attention received per patch at any encoder layer
        (``received_attention@l``, mixed with the shrink's bilinear weights like every per-patch signal);
        newline tokens are marked (``VisionSignals.newline_mask``)."""
        return PACKED_SIGNALS | {"received_attention"}

    def vision_unsupported_reason(self) -> str:
        return ("SigLIP has no [CLS] token: VisionZip's signals (the [CLS] row summed over heads, the [CLS] vector "
                "it sends as a dominant token) and PruMerge's (the [CLS] row of the last layer's merged head) "
                "are [CLS]-query signals with no defined value here; only the received attention, pre-projector "
                "and projected features are mapped through anyres packing, unpadding, the anyres_max "
                "downsampling and newline tokens (not the feature layer's keys that VisionZip's [CLS]-free port "
                "reads)")

    def crops_per_image(self, encoding: Mapping[str, Any]) -> list[int]:
        """Vision-tower crops of each image of one ``get_image_features`` call, as the model splits its vision
        batch: base + tiles, or the base crop alone for every image of a multi-image sample
        (``batch_num_images``)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        sizes = torch.as_tensor(encoding["image_sizes"])
        counts = encoding.get("batch_num_images")
        patching = ([True] * len(sizes) if counts is None
                    else [int(n) == 1 for n in torch.as_tensor(counts).tolist() for _ in range(int(n))])
        return [
            image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                                      patch_size=self.vision_config.image_size) if patch else 1
            for size, patch in zip(sizes, patching, strict=True)
        ]

    def image_layouts(self, encoding: Mapping[str, Any], patches: int) -> list[PackedLayout]:
        """Each image's token order from the model's own ``pack_image_features``: the crop-patch index grid
        packed without the anyres_max shrink gives the unpadded grid (newlines marked -1); when the real
        packing shrinks it (bilinear, ``spec/models.md`` §1.2), row and column coordinate channels packed
        with the real ``vision_aspect_ratio`` give each token's two rows and two columns and their bilinear
        weights, hence its (up to 4) source patches and their weights (``_shrunk``)."""
        sizes = torch.as_tensor(encoding["image_sizes"])
        aspect = encoding.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        pack = self.llava_model.pack_image_features
        layouts = []
        for image, crops in enumerate(self.crops_per_image(encoding)):
            size = sizes[image:image + 1]
            grid = torch.arange(crops * patches).view(crops, patches, 1)
            full = pack([grid], size, image_newline=torch.tensor([-1]), vision_aspect_ratio=_NO_SHRINK)[0][0][:, 0]
            layout = PackedLayout.from_sources(full, crops, patches)
            if crops > 1:
                layout = self._shrunk(layout, full, size, aspect) or layout
            layouts.append(layout)
        return layouts

    def _shrunk(self, layout: PackedLayout, full: torch.Tensor, size: torch.Tensor,
                aspect: str) -> PackedLayout | None:
        """The bilinear layout of an image whose unpadded grid the real packing downsamples (None when it
        does not: the copy layout stands). Three channels go through the model's packing: each patch's grid
        row and column and a newline marker; bilinear interpolation (separable, convex) maps the linear row
        channel to ``r0 + λ`` between rows ``r0`` and ``r0 + 1``, so each token's two rows and two columns and
        their weights are read back from it."""
        crops, patches = layout.num_crops, layout.patches
        tiles = full[patches:]
        rows = int((tiles < 0).sum())
        grid = tiles[tiles >= 0].view(rows, -1)  # [R, C] flat crop-patch index of each unpadded grid cell
        cols = grid.shape[1]
        channels = torch.zeros(crops * patches, 3, dtype=torch.float64)
        cells = grid.reshape(-1)
        channels[cells, 0] = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
        channels[cells, 1] = torch.arange(cols, dtype=torch.float64).repeat(rows)
        marker = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        packed = self.llava_model.pack_image_features([channels.view(crops, patches, 3)], size,
                                                      image_newline=marker, vision_aspect_ratio=aspect)[0][0]
        if packed.shape[0] == full.shape[0]:
            return None
        rest = packed[patches:]
        newline = torch.cat([torch.zeros(patches, dtype=torch.bool), rest[:, 2] > 0.5])
        tokens = rest[rest[:, 2] <= 0.5]

        def neighbours(position: torch.Tensor, last: int) -> tuple[torch.Tensor, torch.Tensor]:
            low = position.floor().clamp(0, last)
            frac = (position - low).clamp(0.0, 1.0)
            index = torch.stack([low, (low + 1).clamp(max=last)], dim=1).long()
            return index, torch.stack([1.0 - frac, frac], dim=1)

        row_i, row_w = neighbours(tokens[:, 0], rows - 1)
        col_i, col_w = neighbours(tokens[:, 1], cols - 1)
        sources = grid[row_i[:, :, None], col_i[:, None, :]].flatten(1)  # [n, 4]
        weights = (row_w[:, :, None] * col_w[:, None, :]).flatten(1)
        count = packed.shape[0]
        source = torch.zeros(count, 4, dtype=torch.long)
        weight = torch.zeros(count, 4, dtype=torch.float32)
        source[:patches, 0] = torch.arange(patches)
        weight[:patches, 0] = 1.0
        mixed = torch.nonzero(~newline)[patches:, 0]
        source[mixed], weight[mixed] = sources, weights.float()
        main = source.gather(1, weight.argmax(dim=1, keepdim=True))[:, 0]
        crop = torch.where(newline, torch.full_like(main, -1), main // patches)
        return PackedLayout(crops, patches, source, weight, newline, crop)

    @classmethod
    def image_grids(cls, config, newline: torch.Tensor) -> ImageGrids:
        """The base crop's 27 x 27 grid, then the unpadded tile grid (bilinearly shrunk beyond anyres_max's
        crops: still a grid) with one newline per row; a multi-image sample's image: the base grid and its
        trailing newline."""
        return packed_image_grids(newline, cls.crop_tokens(config))

    def token_grids(self, inputs: Mapping[str, Any], sample: int = 0) -> TokenLayout:
        """The base crop's 27 x 27 grid over the whole image, then the unpadded (possibly shrunk) tile grid over
        the image as resized into its pinpoint (``llava_next.anyres_token_layout``); a multi-image sample is
        refused (one image per prompt)."""
        return anyres_token_layout(self, inputs, sample)

    @classmethod
    def max_tokens(cls, config) -> int:
        """Base crop plus the largest pinpoint grid with one newline per row (anyres_max_9 only shrinks a
        grid, and leaves grids up to 1.1^2 x 9 crops' worth as they are)."""
        crop = int(config.vision_config.image_size)
        side = crop // int(config.vision_config.patch_size)
        best = max(((h // crop) * side) * ((w // crop) * side + 1) for h, w in config.image_grid_pinpoints)
        return cls.crop_tokens(config) + best
