"""LLaVA-NeXT / LLaVA-1.6 (``model_type="llava_next"``, ``spec/models.md`` §1.1).

Anyres: each image is a base crop (576 tokens at 336 px) plus the tiles of the best grid pinpoint,
unpadded, with one ``image_newline`` token after each unpadded row; the newline tokens share the
``<image>`` id, so they are visual tokens for every method (counted in the image's budget). Counts differ
per image (aspect ratio), hence per sample; budgets are per image. CLIP tower with [CLS], 1-D positions.
``layout="paper2880"`` (``load_model(..., layout=)``) switches an instance to the papers' fixed layout.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from finepruner.models.adapters.base import (
    GridRegion,
    ImageGrids,
    ModelAdapter,
    PackedLayout,
    TokenGrid,
    TokenLayout,
    register_adapter,
)

#: Vision-side signals mapped per image through the packing (``engine.vision``) on every family that packs
#: crops (VisPruner, CDPruner).
PACKED_SIGNALS = frozenset({"projected_features", "cls_attention", "patch_features", "post_layernorm_features"})
#: LLaVA-NeXT (CLIP, [CLS]) also maps VisionZip's signals (the feature layer's [CLS] row summed over heads, its
#: head-mean keys per patch, each crop's [CLS] vector), HiPrune's (the attention received per patch at any
#: encoder layer, ``received_attention@l``) and PruMerge's (the last layer's merged-head [CLS] row and keys, per
#: crop, ``methods_more.md`` §5.1).
NEXT_SIGNALS = PACKED_SIGNALS | {"cls_attention_sum", "feature_keys", "cls_feature", "received_attention",
                                 "last_layer_attention", "last_layer_keys"}


def packed_image_grids(newline: torch.Tensor, patches: int) -> ImageGrids:
    """One packed image's grids (``spec/models.md`` §1.1-§1.2) from its newline mask [V]: the base crop's
    ``side x side`` patches (``patches = side**2``), then either the tile grid with one newline per row (the
    unpadded grid in global raster order; on OneVision possibly bilinearly shrunk), one trailing newline (a
    one-crop image, every image of a multi-image OneVision sample), or, without newline tokens, a square tile
    grid (``layout="paper2880"``: 2 x 2 tiles, no unpadding). Anything else raises a ValueError."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} tokens per crop are no square patch grid (a [CLS] row kept by the "
                         "'full' feature strategy?); the image has no grid layout")
    flags = newline.detach().to("cpu", torch.bool)
    count = int(flags.shape[0])
    if count < patches or bool(flags[:patches].any()):
        raise ValueError(f"an image of {count} tokens does not start with its base crop's {patches} patches")
    base = TokenGrid(0, side, side)
    rest = flags[patches:]
    if not rest.numel():
        return ImageGrids((base,), 0, side)
    if bool(rest.all()):
        return ImageGrids((base,), int(rest.numel()), side)
    lines = torch.nonzero(rest)[:, 0]
    if lines.numel():
        rows = int(lines.numel())
        cols = int(lines[0])
        grid = TokenGrid(patches, rows, cols, row_newlines=True)
        if cols and grid.count == rest.numel() and torch.equal(lines + patches, grid.newlines()):
            return ImageGrids((base, grid), 0, side)
        raise ValueError(f"the {rest.numel()} tokens after the base crop are no grid with one newline per row")
    tile = math.isqrt(int(rest.numel()))
    if tile * tile != rest.numel():
        raise ValueError(f"the {rest.numel()} tile tokens (no newline) are no square grid")
    return ImageGrids((base, TokenGrid(patches, tile, tile)), 0, side)


def anyres_token_layout(adapter: ModelAdapter, inputs: Mapping[str, Any], sample: int) -> TokenLayout:
    """``token_grids`` of the anyres families (``spec/models.md`` §1.1-§1.2): the sample's image packed by the
    model itself (``image_layouts``), split into grids (``image_grids``). The base crop covers the whole image
    (resized to one square crop); the tile grid covers the image as the processor resized it into the best
    pinpoint: the unpadded part (OneVision: possibly shrunk, the same region) or, without newline tokens
    (``layout="paper2880"``), the whole padded pinpoint (its box reaches beyond the image)."""
    from transformers.image_processing_utils import select_best_resolution

    config = adapter.config
    patches = adapter.crop_tokens(config)
    encoding = {key: inputs[key] for key in ("image_sizes", "batch_num_images", "vision_aspect_ratio")
                if inputs.get(key) is not None}
    adapter.refuse_video(inputs)
    if "image_sizes" not in encoding:
        raise ValueError("the inputs have no image_sizes: the anyres layout of the image is unknown")
    layouts = adapter.image_layouts(encoding, patches)
    index, span = adapter.single_image(inputs, sample, [layout.count for layout in layouts])
    grids = adapter.image_grids(config, layouts[index].newline)
    height, width = (int(v) for v in torch.as_tensor(encoding["image_sizes"])[index].tolist())
    crop = int(config.vision_config.image_size)
    side = grids.crop_side
    regions = [GridRegion(grids.grids[0], name="base")]
    for grid in grids.grids[1:]:
        best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
        full_h, full_w = side * (best_h // crop), side * (best_w // crop)
        scale = min(full_h / height, full_w / width)  # grid cells per image pixel (aspect-preserving fit)
        rows, cols = full_h, full_w
        if grid.row_newlines:  # unpadded (transformers' unpad_image on the full grid)
            if width / height > full_w / full_h:
                rows = full_h - 2 * ((full_h - int(round(height * (full_w / width), 7))) // 2)
            else:
                cols = full_w - 2 * ((full_w - int(round(width * (full_h / height), 7))) // 2)
        left, top = (1 - cols / (width * scale)) / 2, (1 - rows / (height * scale)) / 2
        regions.append(GridRegion(grid, (left, top, 1 - left, 1 - top), "tiles"))
    return TokenLayout(span.count, tuple(regions))


def _fixed_grid_features(height, width, patches_height, patches_width, scale_height, scale_width):
    """The processor's count for the fixed layout: every tile patch, no unpadding, no newline."""
    return patches_height * scale_height * patches_width * scale_width, 0


def _pack_fixed_grid(model, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
    """``pack_image_features`` of the fixed layout: each image's base crop, then its tiles in global raster
    order (row r of the grid: row r of tile 0, of tile 1, ...), no unpadding and no newline tokens."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    packed, lengths = [], []
    for image_feature in image_features:
        base, tiles = image_feature[0], image_feature[1:]
        if tiles.shape[0]:
            rows = cols = int(round(tiles.shape[0] ** 0.5))
            grid = tiles.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
            base = torch.cat((base, grid), dim=0)
        packed.append(base)
        lengths.append(base.shape[0])
    return packed, torch.tensor(lengths, dtype=torch.long, device=image_features[0].device)


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    """llava-hf ``LlavaNextForConditionalGeneration`` (vicuna, mistral or other text models)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    model_class: ClassVar[str] = "LlavaNextForConditionalGeneration"
    config_class: ClassVar[str] = "LlavaNextConfig"
    per_image_budget: ClassVar[bool] = True
    description: ClassVar[str] = ("LLaVA-NeXT (llava-hf/llava-v1.6-*-hf): CLIP [CLS], anyres crops, unpadded, "
                                  "image_newline; budgets per image")

    packs_crops: ClassVar[bool] = True
    #: ``"paper2880"``: the papers' fixed layout (``spec/models.md`` §1.1, VisPruner#3): every image is resized
    #: to a 2 x 2 grid of crops, base + 4 tiles = 5 x 576 = 2,880 tokens, no unpadding, no newline tokens.
    layouts: ClassVar[tuple[str, ...]] = ("hf", "paper2880")

    def _apply_layout(self, processor: Any, layout: str) -> None:
        """``paper2880``: one grid pinpoint of 2 x 2 crops in the model and the image processor, the model's
        ``pack_image_features`` replaced on this instance by base + tiles in global raster order (the
        official code's ``spatial`` merge once ``_unpad`` is stripped), and the processor counting the
        same tokens (no unpadding, no newline)."""
        crop = int(self.vision_config.image_size)
        grid = [[2 * crop, 2 * crop]]
        self.config.image_grid_pinpoints = grid
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None or not hasattr(processor, "_get_unpadded_features"):
            raise ValueError("layout='paper2880' needs the LLaVA-NeXT processor (its image processor and token count)")
        image_processor.image_grid_pinpoints = grid
        processor._get_unpadded_features = _fixed_grid_features
        self.llava_model.pack_image_features = types.MethodType(_pack_fixed_grid, self.llava_model)

    def vision_signals_supported(self) -> frozenset[str]:
        """Each image's projected features (its rows of the language model's input, newline tokens
        included) and the CLIP signals of its crops mapped to its token order (``image_layouts``): the
        [CLS] attention of the feature layer per crop (mean and sum over heads), its head-mean keys, the
        attention received per patch at any encoder layer, the last layer's merged-head [CLS] row and keys
        (PruMerge; each crop's own softmax over its 577 keys), the pre-projector features and their
        ``post_layernorm``, and each crop's [CLS] vector (``cls_feature``, [crops, Dv]); newline tokens are
        marked (``VisionSignals.newline_mask``), each token's crop and patch in it given (``crop_index``,
        ``patch_index``)."""
        return NEXT_SIGNALS

    def vision_unsupported_reason(self) -> str:
        return ("only the [CLS] attention (mean and sum over heads), the feature layer's keys, each crop's [CLS] "
                "vector, the per-layer received attention, the last layer's merged-head [CLS] row and keys, "
                "pre-projector and projected features are mapped through anyres packing, unpadding and newline "
                "tokens")

    def crops_per_image(self, encoding: Mapping[str, Any]) -> list[int]:
        """Vision-tower crops of each image of one ``get_image_features`` call (base + tiles), as the model
        splits its vision batch."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                                      patch_size=self.vision_config.image_size)
            for size in torch.as_tensor(encoding["image_sizes"])
        ]

    def image_layouts(self, encoding: Mapping[str, Any], patches: int) -> list[PackedLayout]:
        """Each image's token order, from the model's own ``pack_image_features`` applied to the crop-patch
        index grid (base crop in raster order, then the unpadded tile grid in global raster order with a
        newline, marked -1, at each row end; a one-crop image gets one trailing newline)."""
        sizes = torch.as_tensor(encoding["image_sizes"])
        layouts = []
        for image, crops in enumerate(self.crops_per_image(encoding)):
            grid = torch.arange(crops * patches).view(crops, patches, 1)
            strategy = self.config.vision_feature_select_strategy
            packed, _ = self.llava_model.pack_image_features([grid], sizes[image:image + 1], strategy,
                                                             image_newline=torch.tensor([-1]))
            layouts.append(PackedLayout.from_sources(packed[0][:, 0], crops, patches))
        return layouts

    @classmethod
    def image_grids(cls, config, newline: torch.Tensor) -> ImageGrids:
        """The base crop's patch grid, then the unpadded tile grid with one newline per row (or the one-crop
        image's trailing newline; ``layout="paper2880"``: the square tile grid, no newline)."""
        return packed_image_grids(newline, cls.crop_tokens(config))

    def token_grids(self, inputs: Mapping[str, Any], sample: int = 0) -> TokenLayout:
        """The base crop's grid over the whole image, then the unpadded tile grid over the image as resized
        into its pinpoint (``anyres_token_layout``)."""
        return anyres_token_layout(self, inputs, sample)

    @classmethod
    def max_tokens(cls, config) -> int:
        """Base crop plus the largest pinpoint grid with one newline per row (no unpadding)."""
        crop = int(config.vision_config.image_size)
        side = crop // int(config.vision_config.patch_size)
        best = max(((h // crop) * side) * ((w // crop) * side + 1) for h, w in config.image_grid_pinpoints)
        return cls.crop_tokens(config) + best
