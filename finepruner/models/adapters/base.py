"""The model-adapter seam: everything that differs between model families, behind one registry.

An adapter is a read-only view of one loaded model (``spec/models.md``): where its language model and
decoder layers are, which token marks the visual tokens, how many visual tokens each image has and how
a budget is counted (per image or per sample), where the vision-side signals come from, which prompt
template it uses, and which transformers class loads it. Nothing outside ``finepruner.models.adapters``
branches on a model class or ``model_type``: the engine, methods, evaluation and bench ask the adapter
(``adapter_for(model)``), and a new family is one module that registers a subclass (``docs/models.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from finepruner.methods.base import ModelShape


@dataclass(frozen=True)
class PackedLayout:
    """Where each of one image's visual tokens (as the language model receives them) comes from in the
    vision tower's crops: the family's packing (``spec/models.md`` §1.1-§1.2) applied to an index grid.

    Attributes:
        num_crops: crops of the image in the vision batch (base crop first).
        patches: patch tokens per crop after feature selection (the projector's rows per crop).
        source: [V, K] long: flat crop-patch indices (``crop * patches + patch``) each token mixes; unused
            slots and newline tokens hold 0 (with weight 0).
        weight: [V, K] float32 mixing weights (OneVision's bilinear downsampling: up to 4 patches per token),
            or None when every token is one patch (K = 1, a plain copy).
        newline: [V] bool: the ``image_newline`` tokens (no crop patch behind them).
        crop: [V] long: each token's crop (0 base, 1.. tiles in the model's order; the crop of the largest
            weight when a token mixes patches), -1 at newline tokens.
    """

    num_crops: int
    patches: int
    source: torch.Tensor
    weight: torch.Tensor | None
    newline: torch.Tensor
    crop: torch.Tensor

    @property
    def count(self) -> int:
        """The image's visual tokens V (newline tokens included)."""
        return int(self.newline.shape[0])

    @classmethod
    def from_sources(cls, packed: torch.Tensor, num_crops: int, patches: int) -> PackedLayout:
        """A copy layout from the packing of an index grid: ``packed`` [V] holds each token's flat crop-patch
        index, -1 at newline tokens."""
        packed = packed.long()
        newline = packed < 0
        source = packed.clamp(min=0)
        crop = torch.where(newline, torch.full_like(packed, -1), source // patches)
        return cls(num_crops, patches, source[:, None], None, newline, crop)

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-crop values [num_crops, patches, ...] -> [V, ...] in the image's token order: copied (mixed
        with ``weight``, in float32, where the family interpolates), 0 at newline tokens."""
        if tuple(values.shape[:2]) != (self.num_crops, self.patches):
            raise RuntimeError(
                f"per-crop signal of shape {tuple(values.shape)} for an image of {self.num_crops} crops x "
                f"{self.patches} patches"
            )
        flat = values.reshape(self.num_crops * self.patches, *values.shape[2:])
        source = self.source.to(flat.device)
        newline = self.newline.to(flat.device).view(-1, *[1] * (flat.dim() - 1))
        if self.weight is None:
            out = flat[source[:, 0]]
        else:
            weight = self.weight.to(flat.device).view(*source.shape, *[1] * (flat.dim() - 1))
            mixed = (flat[source].to(torch.promote_types(flat.dtype, torch.float32)) * weight).sum(dim=1)
            out = mixed.to(flat.dtype)
        return out.masked_fill(newline, 0)


@dataclass(frozen=True)
class ImageSpan:
    """One image's visual tokens in one sample.

    Attributes:
        row: the sample (batch row).
        image: the image's index within the sample (0, 1, ...).
        offset: index of the image's first token among the sample's visual tokens.
        count: the image's visual tokens (newline tokens included on LLaVA-NeXT/OneVision).
    """

    row: int
    image: int
    offset: int
    count: int


@dataclass(frozen=True)
class TokenGrid:
    """One 2-D grid of an image's visual tokens, in raster order (``spec/models.md`` §1.1-§1.2).

    Attributes:
        start: index of its first token among the image's tokens.
        rows, cols: its shape; its tokens are ``rows x cols`` cells in raster order.
        row_newlines: whether an ``image_newline`` token follows each row (then a row takes ``cols + 1``
            tokens: LLaVA-NeXT's and OneVision's tile grid).
    """

    start: int
    rows: int
    cols: int
    row_newlines: bool = False

    @property
    def count(self) -> int:
        """Its tokens, newline tokens included."""
        return self.rows * (self.cols + int(self.row_newlines))

    def cells(self) -> torch.Tensor:
        """[rows, cols] long: each cell's token index among the image's tokens."""
        width = self.cols + int(self.row_newlines)
        return self.start + (torch.arange(self.rows)[:, None] * width + torch.arange(self.cols)[None])

    def newlines(self) -> torch.Tensor:
        """[rows] long: the token index of each row's newline (empty without ``row_newlines``)."""
        if not self.row_newlines:
            return torch.empty(0, dtype=torch.long)
        return self.start + torch.arange(self.rows) * (self.cols + 1) + self.cols


@dataclass(frozen=True)
class ImageGrids:
    """One image's visual tokens as grids (``ModelAdapter.image_grids``): the grids in token order, then
    ``trailing_newlines`` newline tokens (a one-crop image's single newline); ``crop_side`` is the patch
    side of one vision-tower crop (24 on CLIP-L/336, 27 on SigLIP/384)."""

    grids: tuple[TokenGrid, ...]
    trailing_newlines: int
    crop_side: int

    @property
    def count(self) -> int:
        return sum(grid.count for grid in self.grids) + self.trailing_newlines


@dataclass(frozen=True)
class GridRegion:
    """One grid of an image's visual tokens and the part of the image it covers (``ModelAdapter.token_grids``,
    for drawing: ``finepruner show``).

    Attributes:
        grid: the grid's tokens (``TokenGrid``: indices among the image's tokens, rows x cols cells).
        box: ``(left, top, right, bottom)``: the grid's extent in fractions of the width and height of the
            image handed to the processor; ``(0, 0, 1, 1)`` when the grid covers exactly the image (its cells
            are the image squashed to ``rows x cols``), beyond [0, 1] where it also covers padding.
        name: ``"image"`` (an image's only grid: LLaVA-1.5, Qwen's merged grid), ``"base"`` (the anyres base
            crop: the whole image resized to one crop) or ``"tiles"`` (the anyres tile grid).
    """

    grid: TokenGrid
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    name: str = "image"


@dataclass(frozen=True)
class TokenLayout:
    """The grids of one image's visual tokens (``ModelAdapter.token_grids``): ``count`` tokens (newline tokens
    included; they sit in no grid cell), ``regions`` in token order."""

    count: int
    regions: tuple[GridRegion, ...]

    def cell_of(self) -> dict[int, tuple[int, int, int]]:
        """token index -> ``(region, row, col)`` of every token that sits in a grid cell."""
        out: dict[int, tuple[int, int, int]] = {}
        for r, region in enumerate(self.regions):
            cells = region.grid.cells()
            for i in range(region.grid.rows):
                for j in range(region.grid.cols):
                    out[int(cells[i, j])] = (r, i, j)
        return out


class ModelAdapter:
    """Base class of the family adapters: the parts and shapes of a vision-language model.

    Subclasses set the class attributes and override what differs; the defaults fit the llava-hf
    layout (``model.model.{language_model, vision_tower, multi_modal_projector}``).
    """

    #: ``config.model_type`` values this adapter handles (the first is the family's name).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: transformers class that loads a checkpoint of the family (an attribute name of ``transformers``).
    model_class: ClassVar[str] = ""
    #: configuration class of the family (an attribute name of ``transformers``).
    config_class: ClassVar[str] = ""
    #: ``tokens=N`` / ``ratio=R`` count per image (True) or per sample, all images together (False).
    per_image_budget: ClassVar[bool] = True
    #: a short description of the family for listings and errors.
    description: ClassVar[str] = ""
    #: optional Python packages the family's processor needs: (import name, pip extra).
    processor_requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: whether an image is several vision-tower crops packed into one token sequence (``image_layouts``).
    packs_crops: ClassVar[bool] = False
    #: whether a packed image's tokens mix several patches (OneVision's anyres_max shrink), so per-patch
    #: neighbours are taken on the grids of the image's tokens (``image_grids``) instead of a crop's grid.
    mixes_patches: ClassVar[bool] = False
    #: evaluation image preprocessing by default (``eval.prompting.IMAGE_ASPECT_RATIOS``): ``"original"``
    #: hands the image to the processor as it is (anyres families tile it themselves); LLaVA-1.5: ``"pad"``.
    default_image_aspect_ratio: ClassVar[str] = "original"
    #: the evaluation prompt protocol of :meth:`build_prompt` (recorded in eval runs' config.json).
    conversation: ClassVar[str] = "chat_template"
    #: the token that ends the user turn in the family's chat template, where the instruction text (CDPruner's
    #: relevance) stops; None: the whole prompt tail after the last image token (cut at ``ASSISTANT:``).
    instruction_stop: ClassVar[str | None] = None

    #: rows of the language model's position ids: 1 (plain RoPE) or 3 (mRoPE: temporal, height, width).
    position_rows: ClassVar[int] = 1
    #: attribute of the inner multimodal model that holds the vision tower.
    vision_attribute: ClassVar[str] = "vision_tower"
    #: processor implementations ``load_model(processor=...)`` accepts (``"auto"``: the family's default).
    processors: ClassVar[tuple[str, ...]] = ("auto", "official")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "language_model") or not hasattr(inner, self.vision_attribute):
            raise TypeError(
                f"{type(model).__name__} does not have the layout of the {self.family} family "
                f"(expected .model.language_model and .model.{self.vision_attribute})"
            )

    # -- identity -------------------------------------------------------------------------------------
    @classmethod
    def family_name(cls) -> str:
        """The family's name: its first ``model_type``."""
        return cls.model_types[0]

    @property
    def family(self) -> str:
        return self.family_name()

    # -- parts ----------------------------------------------------------------------------------------
    @property
    def llava_model(self) -> nn.Module:
        """The inner multimodal model (vision tower + projector + language model, no LM head); the
        handle's input hook sits on it."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder-only language model whose layers the engine runs."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        lm = self.language_model
        return lm.layers[: lm.config.num_hidden_layers]

    @property
    def vision_tower(self) -> nn.Module:
        return getattr(self.model.model, self.vision_attribute)

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    # -- visual tokens --------------------------------------------------------------------------------
    # The counts depend on the configuration only (classmethods), so that sweeps can validate budgets
    # from a checkpoint's config.json before any weight is loaded (``shape_of``).
    @classmethod
    def has_cls(cls, config) -> bool:
        """Whether the vision tower prepends a [CLS] token (CLIP) or not (SigLIP)."""
        return True

    @classmethod
    def crop_tokens(cls, config) -> int:
        """Visual tokens of one vision-tower crop after feature selection (576 for CLIP-L/336 without
        [CLS]; 729 for SigLIP-so400m/384)."""
        vision = config.vision_config
        grid = int(vision.image_size) // int(vision.patch_size)
        extra = 1 if config.vision_feature_select_strategy == "full" and cls.has_cls(config) else 0
        return grid * grid + extra

    @classmethod
    def max_tokens(cls, config) -> int:
        """An upper bound of one image's visual tokens (budgets are validated against it before a prefill;
        each image's own count is checked at its prefill)."""
        return cls.crop_tokens(config)

    @classmethod
    def shape_of(cls, config) -> ModelShape:
        """Decoder depth, query heads and the largest image's visual tokens, from the configuration;
        ``variable`` where each image has its own count (its budgets are checked per image at its prefill,
        ``methods.base.check_shape``)."""
        text = config.text_config
        return ModelShape(int(text.num_hidden_layers), int(text.num_attention_heads), cls.max_tokens(config),
                          variable=cls.per_image_budget)

    @property
    def patches_per_crop(self) -> int:
        return self.crop_tokens(self.config)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens of one image when the family has a fixed count (LLaVA-1.5: 576), else of one
        base crop."""
        return self.crop_tokens(self.config)

    @property
    def max_visual_tokens(self) -> int:
        return self.max_tokens(self.config)

    def budget_bound(self, processor: Any = None) -> int:
        """The largest image's visual tokens that budgets are validated against before a prefill: the
        configuration's bound (:meth:`max_tokens`), tightened by ``processor``'s own limits where the family
        has them (:meth:`processor_max_tokens`). Each image's own count is still checked at its prefill."""
        bound = self.max_visual_tokens
        limit = self.processor_max_tokens(processor) if processor is not None else None
        return bound if limit is None else max(1, min(bound, limit))

    def budget_floor(self, processor: Any = None) -> int:
        """The smallest image's visual tokens that ``apply`` checks a budget against on a variable-count
        family (``methods.base.check_shape``): 1 unless the family knows better from ``processor``."""
        return 1

    def vision_layers(self) -> tuple[int, int]:
        """``(depth, feature layer)`` of the vision tower: its encoder layers, and the 0-based index of the
        layer whose output the projector reads (``vision_feature_layer``)."""
        from finepruner.engine.vision import feature_layer_index  # no import cycle

        depth = int(self.config.vision_config.num_hidden_layers)
        return depth, feature_layer_index(depth, self.config.vision_feature_layer)

    def image_token_counts(self, kwargs: Mapping[str, Any]) -> list[int] | None:
        """Each image's visual tokens in a forward call, known from its inputs before the vision tower runs
        (so that budgets are checked per image before any encoding); None (the default) where only the
        encoded features tell (the counts are then checked once the images are encoded)."""
        return None

    def processor_max_tokens(self, processor: Any) -> int | None:
        """One image's largest visual-token count under ``processor``'s settings, or None where the
        configuration alone fixes it (the LLaVA families)."""
        return None

    def image_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Boolean [batch, length] mask of the visual-token positions (as the model's
        ``get_placeholder_mask``)."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        if inputs_embeds is None:
            return None
        embedding = self.llava_model.get_input_embeddings()
        image_embed = embedding(torch.tensor(self.image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embed.to(inputs_embeds.dtype)).all(-1)

    def encode_images(self, module: nn.Module, kwargs: dict[str, Any]) -> Any:
        """The image encoder output the model would compute for ``kwargs`` (its ``get_image_features``
        with the call's feature settings), as ``generate`` places it in ``mm_encoder_outputs["image"]``."""
        options = {name: kwargs[name] for name in self.encoder_kwargs if kwargs.get(name) is not None}
        return module.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True, **options)

    #: keyword arguments of the model's forward that its ``get_image_features`` also takes.
    encoder_kwargs: ClassVar[tuple[str, ...]] = (
        "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
    )

    def image_spans(self, image_mask: torch.Tensor, counts: Sequence[int] | None) -> list[list[ImageSpan]]:
        """Each sample's images: the visual tokens of row b are split into consecutive images of
        ``counts`` in the order the model scatters image features (row-major). ``counts=None`` (families
        with one budget per sample) gives one span per sample holding all its visual tokens."""
        per_row = image_mask.sum(dim=1).tolist()
        if counts is None:
            return [[ImageSpan(row, 0, 0, int(n))] if n else [] for row, n in enumerate(per_row)]
        spans: list[list[ImageSpan]] = []
        queue = [int(c) for c in counts]
        position = 0
        for row, total in enumerate(per_row):
            row_spans: list[ImageSpan] = []
            offset = 0
            while offset < total:
                if position >= len(queue):
                    raise ValueError(
                        f"the prompts hold {sum(per_row)} image tokens but the images give {sum(queue)} "
                        f"visual tokens ({queue}); each <image> must be expanded to its image's token count"
                    )
                count = queue[position]
                if offset + count > total:
                    raise ValueError(
                        f"sample {row} holds {total} image tokens, which do not split into whole images of "
                        f"{queue} tokens (in order); each <image> must be expanded to its image's token count"
                    )
                row_spans.append(ImageSpan(row, len(row_spans), offset, count))
                offset += count
                position += 1
            spans.append(row_spans)
        if position != len(queue):
            raise ValueError(
                f"{len(queue)} images were encoded but the prompts' image tokens hold only {position} of them"
            )
        return spans

    # -- vision-side signals -----------------------------------------------------------------------------
    def vision_signals_supported(self) -> frozenset[str] | None:
        """Names of ``engine.vision.VISION_SIGNALS`` this family's capture provides (None: all of them)."""
        return None

    def vision_unsupported_reason(self) -> str:
        return ""

    @classmethod
    def image_grids(cls, config, newline: torch.Tensor) -> ImageGrids | None:
        """One image's visual tokens as 2-D grids (``ImageGrids``), from its newline mask [V] bool
        (``VisionSignals.newline_mask``); None (the default) where a family has no newline tokens and an
        image is one square patch grid (LLaVA-1.5; Qwen's merged grid). A ValueError when the tokens do not
        form the family's layout."""
        return None

    def token_grids(self, inputs: Mapping[str, Any], sample: int = 0) -> TokenLayout:
        """The grids of the one image of ``sample`` in the processor's output ``inputs`` (``input_ids``, and
        ``image_sizes`` / ``image_grid_thw`` where the family has them), with the image region each covers.
        The default: one square grid of :meth:`crop_tokens` over the whole image (LLaVA-1.5: 24 x 24). A
        ValueError names the reason when the sample holds a video, no image or several images, or when its
        tokens form no grid."""
        count = self.crop_tokens(self.config)
        self.single_image(inputs, sample, [count] * self._image_total(inputs, count))
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} visual tokens per image do not form a square grid (a [CLS] token kept by "
                             "the 'full' feature strategy?)")
        return TokenLayout(count, (GridRegion(TokenGrid(0, side, side)),))

    def _image_total(self, inputs: Mapping[str, Any], count: int) -> int:
        """Images of a fixed-count family's call: the batch's image tokens over ``count``."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("the inputs have no input_ids: the image tokens cannot be located")
        total = int((torch.as_tensor(ids) == self.image_token_id).sum())
        return max(1, -(-total // count))

    @staticmethod
    def refuse_video(inputs: Mapping[str, Any]) -> None:
        """A ValueError when the inputs hold a video (``token_grids`` draws single images only)."""
        if inputs.get("pixel_values_videos") is not None or inputs.get("video_grid_thw") is not None:
            raise ValueError("the prompt holds a video: only a single image per prompt can be drawn")

    def single_image(self, inputs: Mapping[str, Any], sample: int, counts: Sequence[int]) -> tuple[int, ImageSpan]:
        """``(index among the call's images, span)`` of the one image of ``sample`` (``counts``: each image's
        tokens, in order); a ValueError for a video, a sample without an image or with several images."""
        self.refuse_video(inputs)
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("the inputs have no input_ids: the image tokens cannot be located")
        spans = self.image_spans(torch.as_tensor(ids) == self.image_token_id, counts)
        if not 0 <= sample < len(spans):
            raise ValueError(f"sample {sample}: the inputs have {len(spans)} samples")
        if len(spans[sample]) != 1:
            raise ValueError(f"sample {sample} holds {len(spans[sample])} images: only a single image per prompt "
                             "can be drawn")
        return sum(len(row) for row in spans[:sample]), spans[sample][0]

    @property
    def projects_new_tokens(self) -> bool:
        """Whether the projector can map new (e.g. pooled) vision features into the language model's space
        (LLaVA's MLP projector can; Qwen's merger folds 2 x 2 patches and cannot)."""
        return True

    @property
    def signals_per_image(self) -> bool:
        """Whether the vision capture gives its signals per encoded image (``take_images``): families that
        pack crops, and towers that encode every image at its own resolution (Qwen)."""
        return self.packs_crops

    def make_vision_capture(self, needs: tuple[str, ...]) -> Any:
        """The hooks that record the vision signals ``needs`` (``engine.vision.VisionCapture``)."""
        from finepruner.engine.vision import VisionCapture  # the engine imports the adapters

        return VisionCapture(self, needs)

    def image_layouts(self, encoding: Mapping[str, Any], patches: int) -> list[PackedLayout] | None:
        """Each encoded image's ``PackedLayout``, in encoding order, for one ``get_image_features`` call whose
        arguments are ``encoding`` (``image_sizes``, ``batch_num_images``, ``vision_aspect_ratio``, ...) and
        whose vision batch has ``patches`` patch tokens per crop. None (the default): an image is one crop
        whose patches are its tokens in raster order (LLaVA-1.5)."""
        return None

    # -- image layouts --------------------------------------------------------------------------------
    #: image-token layouts the family offers (``set_layout``); the first is the model's own.
    layouts: ClassVar[tuple[str, ...]] = ("hf",)

    @classmethod
    def check_layout(cls, layout: str) -> None:
        """A ValueError unless the family offers ``layout``."""
        if layout not in cls.layouts:
            raise ValueError(
                f"layout={layout!r} is not available on {cls.family_name()}; allowed: {', '.join(cls.layouts)}"
            )

    def set_layout(self, processor: Any, layout: str) -> None:
        """Switch this model instance (and its processor, which must count the same tokens) to another
        image-token layout; ``"hf"`` is the model's own and changes nothing."""
        self.check_layout(layout)
        if layout != self.layouts[0]:
            self._apply_layout(processor, layout)

    def _apply_layout(self, processor: Any, layout: str) -> None:
        raise NotImplementedError

    # -- positions and layer inputs (engine.loop) -----------------------------------------------------------
    def lm_positions(self, position_ids: torch.Tensor | None, batch: int, length: int, past: int,
                     device: torch.device) -> torch.Tensor:
        """The language model call's position ids in the engine's layout: [B, L] (1-D RoPE) or [B, L, 3]
        (mRoPE, ``position_rows=3``); None (a call without them) counts on from ``past``."""
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None] + past
        return position_ids.expand(batch, -1)

    def rotary_embeddings(self, lm: nn.Module, hidden: torch.Tensor,
                          positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` [B, L, head_dim] of the engine-layout ``positions`` (the model's own rotary module)."""
        return lm.rotary_emb(hidden, position_ids=positions)

    def renumbers(self, method: Any) -> bool:
        """Whether the engine renumbers kept tokens' positions for ``method`` (its ``positions``)."""
        return method.positions == "renumber"

    def prepare_prefill(self, module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The multimodal model's keyword arguments for a call with images, changed where the family needs
        it before the call runs (Qwen: explicit 3-D position ids), or None (unchanged)."""
        return None

    def take_layer_injections(self, kwargs: dict[str, Any]) -> Any:
        """Pop from the language model call's ``kwargs`` the per-layer additions to the visual tokens'
        hidden states (Qwen3-VL deepstack) as an object with ``after_layer(index, hidden, source_index)``;
        None when the family has none."""
        return None

    # -- prompts --------------------------------------------------------------------------------------
    def build_prompt(self, text: str, has_image: bool, processor: Any) -> str:
        """The evaluation prompt of one question: the processor's chat template with one user turn."""
        content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": text})
        conversation = [{"role": "user", "content": content}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    # -- processors -------------------------------------------------------------------------------------
    @classmethod
    def check_processor_choice(cls, choice: str) -> None:
        """A ValueError unless ``load_model(processor=choice)`` is offered by the family."""
        if choice not in cls.processors:
            raise ValueError(
                f"processor={choice!r} is not available on {cls.family_name()}; allowed: {', '.join(cls.processors)}"
            )

    @classmethod
    def load_processor(cls, directory: Any, choice: str, kwargs: Mapping[str, Any]) -> Any:
        """The checkpoint's processor (``choice`` from :attr:`processors`; ``kwargs`` go to its
        ``from_pretrained``): the official one by default."""
        from finepruner.models.loading import load_auto_processor

        return load_auto_processor(directory, kwargs)

    # -- FLOPs ------------------------------------------------------------------------------------------
    @classmethod
    def merger_vision_shape(cls, config) -> Any:
        """``bench.flops.MergerVisionShape`` of a tower that encodes every image at its own grid (Qwen-VL);
        None for towers counted per fixed-size crop (``bench.flops.VisionShape``: CLIP, SigLIP)."""
        return None

    @classmethod
    def vision_flops(cls, config, visual_tokens: Sequence[int], batch: int, crops: int | None,
                     grids: Sequence[Sequence[int]] | None) -> dict | None:
        """The tower's and merger's FLOPs of one prefill when the family counts them itself (Qwen-VL), as
        ``bench.flops.merger_vision_flops`` plus ``images``; None: the per-crop model of ``bench.flops``."""
        return None

    def tower_grids(self, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[int, int, int]] | None:
        """The patch grids ``(t, h, w)`` of one vision-tower call (its arguments), for towers that encode every
        image at its own grid; None for towers of fixed-size crops (counted by ``pixel_values.shape[0]``)."""
        return None

    def decode_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Position ids of the last prompt token for manual decode calls (each step passes ``last + step``);
        None where the model counts positions on from the attention mask (1-D RoPE families)."""
        return None

    # -- description ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "layers": self.num_layers, "heads": self.num_heads,
                "per_image_budget": self.per_image_budget}


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: register an adapter under each of its ``model_types`` (a taken one raises)."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__} declares no model_types")
    for model_type in cls.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not cls:
            raise ValueError(f"model_type {model_type!r} is already handled by {_REGISTRY[model_type].__name__}")
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def registered() -> Mapping[str, type[ModelAdapter]]:
    """model_type -> adapter class of every registered family."""
    return dict(_REGISTRY)


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class of ``model_type``; an unsupported one raises a ValueError listing the families."""
    if model_type not in _REGISTRY:
        raise ValueError(
            f"model_type {model_type!r} is not supported; finepruner supports: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[model_type]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a loaded model, chosen by ``model.config.model_type``."""
    config = getattr(model, "config", None)
    return adapter_class(getattr(config, "model_type", None))(model)
