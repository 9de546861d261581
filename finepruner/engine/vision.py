"""Vision-side signals for selections made before the language model (VisPruner, CDPruner, VisionZip, PruMerge).

A method that sets ``needs_vision`` (a tuple of names from ``VISION_SIGNALS``) gets, at its stages, a
``VisionSignals`` in ``StageContext.vision``. The handle captures them with forward hooks while the
method is applied, during the vision tower run LLaVA does anyway (no extra tower pass,
``spec/transformers_notes.md`` §4):

* ``cls_attention``: a hook on the self-attention of the vision layer LLaVA reads its features from
  (``vision_feature_layer=-2`` -> ``encoder.layers[N-2]``) recomputes only the [CLS] query row from
  the hook's input hidden states, in float32, softmax over all keys, and averages it over heads.
* ``patch_features`` / ``projected_features``: a hook on ``multi_modal_projector`` keeps its input (the
  selected CLIP hidden state, [CLS] dropped) and its output (the tokens the language model receives).
* ``post_layernorm_features``: the vision tower's own ``post_layernorm`` applied to ``patch_features``
  (CDPruner's input to CLIP's ``visual_projection``), computed on demand.
* ``cls_attention_sum`` / ``feature_keys`` (VisionZip, ``methods_more.md`` §1): the same attention hook
  gives the [CLS] row summed over heads and the head-mean of that layer's key projections (patches).
* ``cls_feature``: a forward hook on the feature layer itself keeps the [CLS] vector of its output (the
  row the ``"default"`` strategy drops before the projector), one per image.
* ``last_layer_attention`` / ``last_layer_keys`` (PruMerge, ``methods_more.md`` §5.1): a hook on the self-
  attention of the *last* encoder layer recomputes its ``q_proj``/``k_proj`` outputs from the hook's input
  (``layer_norm1`` of the previous layer's output) and keeps the [CLS] row of one merged head over the full
  width, ``softmax(q k^T / sqrt(Dv))``, and the patch keys.
* ``received_attention`` (HiPrune, ``methods_more.md`` §4.1): a hook on the self-attention of each layer a
  method names recomputes that layer's full attention from the hook's input (eager, float32) and keeps the
  attention each token *receives*, averaged over heads and over all queries. ``"received_attention"`` alone
  is the feature layer; ``received_attention_signal(l)`` (``"received_attention@l"``) is encoder layer ``l``
  (0-based). Only the named layers are hooked.

Per-image rows are mapped to batch samples in the order in which LLaVA scatters image features into
the ``<image>`` positions (row-major): a sample with several images gets their tokens concatenated.
All signals are indexed by the *original* visual-token ids (0..V-1) of each sample.

Families that pack several crops into one image (``ModelAdapter.packs_crops``: LLaVA-NeXT, OneVision) run
the tower once on all crops of a call's images; the hooks record per crop while the model's
``get_image_features`` runs (the capture wraps it to read the call's ``image_sizes``/``batch_num_images``;
towers run for videos are ignored), and ``VisionCapture.take_images`` maps every per-crop signal to each
image's token order with the adapter's ``image_layouts`` (``spec/models.md`` §1.1-§1.2: base crop, then the
unpadded tile grid in global raster order, a newline after each row; OneVision's anyres_max shrink mixes up
to 4 patches per token with the model's bilinear weights, applied to the signal as well: to the [CLS] or
received attention (a weighted mean of the map) and to features and keys alike); ``cls_feature`` stays
one vector per crop, [crops, Dv] per image. Newline tokens have no patch behind them:
``VisionSignals.newline_mask`` marks them and their signal values are 0. A tower without [CLS] (SigLIP)
gives as ``cls_attention`` the attention each patch *receives* in the feature layer, mean over heads and
over all queries (``spec/models.md`` §4, the VisPruner#1 rule). Budget units there are
images: ``engine.loop._group_vision`` stacks each group's images (``stack_images``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

VISION_SIGNALS: tuple[str, ...] = (
    "cls_attention",
    "patch_features",
    "projected_features",
    "post_layernorm_features",
    "cls_attention_sum",
    "feature_keys",
    "cls_feature",
    "last_layer_attention",
    "last_layer_keys",
    "received_attention",
)
#: Prefix of the per-layer form of ``received_attention`` (``"received_attention@8"``: encoder layer index 8).
RECEIVED_PREFIX = "received_attention@"
#: Signals computed by the hook on the feature layer's self-attention.
_ATTENTION_SIGNALS = frozenset({"cls_attention", "cls_attention_sum", "feature_keys"})
#: Signals computed by the hook on the last layer's self-attention.
_LAST_LAYER_SIGNALS = frozenset({"last_layer_attention", "last_layer_keys"})


def received_attention_signal(layer: int) -> str:
    """The signal name of the attention received per token at encoder layer ``layer`` (0-based)."""
    return f"{RECEIVED_PREFIX}{layer}"


def _received_layer(name: str, num_layers: int, feature_layer: int | None) -> int | None:
    """The encoder layer index a ``received_attention`` name asks for, or None for other signals."""
    if name == "received_attention":
        if feature_layer is None:
            raise ValueError("received_attention needs an integer vision_feature_layer")
        return feature_layer
    if not name.startswith(RECEIVED_PREFIX):
        return None
    text = name[len(RECEIVED_PREFIX):]
    if not text.isdigit() or not int(text) < num_layers:
        raise ValueError(
            f"vision signal {name!r}: the layer must be an encoder layer index in 0..{num_layers - 1}"
        )
    return int(text)


@dataclass
class VisionSignals:
    """Vision-side signals of one prefill, per sample.

    Attributes:
        cls_attention: [B, V] float32 [CLS]-query attention over the visual tokens, mean over heads.
        patch_features: [B, V, Dv] pre-projector CLIP features (the hidden state LLaVA selects).
        projected_features: [B, V, D] projector outputs (the language model's visual inputs).
        post_layernorm_features: [B, V, Dv] ``vision_tower.post_layernorm(patch_features)``.
        prompt_ids: each sample's prompt token ids, padding removed. Methods that read the question
            declare ``needs_instructions`` and get its text in ``StageContext.instructions`` instead.
        image_token_id: the ``<image>`` placeholder id in ``prompt_ids``.
        cls_attention_sum: [B, V] float32 [CLS]-query attention of the same layer, summed over heads.
        feature_keys: [B, V, head_dim] float32 head-mean of that layer's ``k_proj`` outputs (patches).
        cls_feature: [B, I, Dv] the [CLS] vector of the feature layer's output, one per image of the sample
            (I images; pre-projector, the same hidden state as ``patch_features``). On families that pack
            crops: [u, crops, Dv], one per crop of the unit's image in ``crop_index`` order (0 the base crop;
            zero rows pad an image of fewer crops than others of its group).
        last_layer_attention: [B, V] float32 [CLS]-query attention of the last encoder layer as ONE head over
            the full width ``Dv`` (PruMerge's ``softmax(q k^T / sqrt(Dv))[0, 1:]``).
        last_layer_keys: [B, V, Dv] float32 ``k_proj`` outputs of the last encoder layer (patches).
        received_attention: encoder layer index -> [B, V] float32 attention each visual token receives at that
            layer, mean over heads and over all queries ([CLS] included), for the layers the method named.
        feature_layer: the encoder layer index of the feature layer (``received_attention`` without a layer).
        patches_per_image: patch tokens per encoded image (V for one image per sample).
        project: runs the model's ``multi_modal_projector`` on new pre-projector tokens (e.g. ``pool``'s
            pooled features) without the capture recording them.
        newline_mask: [B, V] bool on families that pack crops (LLaVA-NeXT, OneVision): the ``image_newline``
            tokens (all their signal values are 0); None on LLaVA-1.5 (no newline tokens).
        crop_index: [B, V] long on those families: each token's crop (0 base crop, 1.. tiles in the model's
            order; on OneVision's shrunk grids the crop of the patch with the largest bilinear weight), -1 at
            newline tokens.
        patch_index: [B, V] long on those families: each token's patch within its crop (row-major on the crop's
            square patch grid; the patch of the largest bilinear weight on shrunk grids), -1 at newline tokens.
        grid_column: [B, V] long on families whose images are each one grid of their own shape (Qwen's merged
            grids, raster order): each token's column on it; the grid's width is its largest value + 1.
        embed_texts: on those families, maps texts to their token embeddings in the language model's input
            space (one [M, D] tensor per text: the texts tokenized without special tokens by the processor
            bound at ``apply``, through the model's input embeddings); CDPruner's relevance without a CLIP
            text tower.

    Without a [CLS] token (SigLIP, OneVision) ``cls_attention`` is the attention each patch receives in the
    feature layer, averaged over heads and all queries (``spec/models.md`` §4).
    """

    cls_attention: torch.Tensor | None = None
    patch_features: torch.Tensor | None = None
    projected_features: torch.Tensor | None = None
    post_layernorm_features: torch.Tensor | None = None
    cls_attention_sum: torch.Tensor | None = None
    feature_keys: torch.Tensor | None = None
    cls_feature: torch.Tensor | None = None
    last_layer_attention: torch.Tensor | None = None
    last_layer_keys: torch.Tensor | None = None
    received_attention: dict[int, torch.Tensor] | None = None
    feature_layer: int | None = None
    patches_per_image: int | None = None
    prompt_ids: list[list[int]] | None = None
    image_token_id: int | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    newline_mask: torch.Tensor | None = None
    crop_index: torch.Tensor | None = None
    patch_index: torch.Tensor | None = None
    grid_column: torch.Tensor | None = None
    embed_texts: Callable[[list[str]], list[torch.Tensor]] | None = None

    def require(self, method: str, *names: str) -> None:
        """Raise a clear error when a needed signal was not captured (e.g. no ``pixel_values``)."""
        missing = [name for name in names if not self._has(name)]
        if missing:
            raise RuntimeError(
                f"{method}: vision signal(s) {', '.join(missing)} were not captured; pre-LLM methods need the "
                "model to encode the images in the same call (pass pixel_values, not precomputed image features)"
            )


    def _has(self, name: str) -> bool:
        if name == "received_attention" or name.startswith(RECEIVED_PREFIX):
            layer = self.feature_layer if name == "received_attention" else int(name[len(RECEIVED_PREFIX):])
            return self.received_attention is not None and layer in self.received_attention
        return getattr(self, name) is not None


#: VisionSignals tensors with one row per token of an image (stacked by ``stack_images``).
_PER_TOKEN = ("cls_attention", "patch_features", "projected_features", "post_layernorm_features",
              "cls_attention_sum", "feature_keys", "last_layer_attention", "last_layer_keys", "newline_mask",
              "crop_index", "patch_index", "grid_column")


def stack_images(images: list[VisionSignals]) -> VisionSignals:
    """One group's signals from its images' (``VisionCapture.take_images``: unbatched [V, ...] tensors of
    equal V): every per-token tensor stacked to [u, V, ...], ``cls_feature`` to [u, crops, Dv] (zero rows
    where an image has fewer crops), the rest taken from the first image."""
    first = images[0]
    stacked = {f.name: getattr(first, f.name) for f in fields(VisionSignals)}
    for name in _PER_TOKEN:
        values = [getattr(image, name) for image in images]
        stacked[name] = None if any(v is None for v in values) else torch.stack(values)
    if first.cls_feature is not None:  # [crops, Dv] per image: zero rows pad images of fewer crops
        most = max(image.cls_feature.shape[0] for image in images)
        stacked["cls_feature"] = torch.stack([
            torch.cat([image.cls_feature, image.cls_feature.new_zeros(most - image.cls_feature.shape[0],
                                                                      *image.cls_feature.shape[1:])])
            for image in images
        ])
    if first.received_attention is not None:
        stacked["received_attention"] = {
            layer: torch.stack([image.received_attention[layer] for image in images])
            for layer in first.received_attention
        }
    return VisionSignals(**stacked)


BUDGET_SCOPES: tuple[str, ...] = ("image", "crop")


def image_candidates(vision: VisionSignals, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(newline, crop)`` [B, V] of the current visual tokens ``ids``: newline tokens (never on LLaVA-1.5)
    and each token's crop (LLaVA-1.5: the image within the sample, ``ids // patches_per_image``)."""
    device = ids.device
    if vision.newline_mask is None:
        newline = torch.zeros_like(ids, dtype=torch.bool)
    else:
        newline = vision.newline_mask.to(device).gather(1, ids)
    if vision.crop_index is not None:
        crop = vision.crop_index.to(device).gather(1, ids)
    else:
        per_image = vision.patches_per_image or ids.shape[1]
        crop = ids // per_image
    return newline, crop


def select_keeping_newlines(
    method: str, newline: torch.Tensor, crop: torch.Tensor, tokens: int | None, scope: str,
    choose: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """A pre-LLM selection per budget unit that keeps every newline token and spends ``tokens`` on the others.

    Args:
        method: the method's name (errors).
        newline, crop: [B, V] from ``image_candidates``.
        tokens: the budget: per image over all its crops (``scope="image"``) or per crop (``"crop"``, the
            official LLaVA-NeXT rule; a crop left with fewer tokens by unpadding keeps them all); None: a
            quarter of the candidates (of each crop with ``"crop"``), at least 1.
        choose: ``choose(rows, candidates, count)``: ``count`` picks per row among ``candidates`` [r, n]
            (indices into the V tokens) of the units ``rows`` [r], as indices into ``candidates`` (the
            method's rule, batched over units with equal candidate counts).

    Returns:
        [B, W] sorted indices into the V tokens: the newline tokens and the picks. Every row needs the same
        W; in the image scope a unit with fewer newline tokens than another unit of the same token count
        (possible only for two different layouts of equal count) picks the difference on top of
        ``tokens``; in the crop scope differing totals raise.
    """
    batch, _ = newline.shape
    device = newline.device
    candidates = [torch.nonzero(~newline[b])[:, 0] for b in range(batch)]
    lines = [torch.nonzero(newline[b])[:, 0] for b in range(batch)]
    picked: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    if scope == "image":
        budgets = []
        for b, cand in enumerate(candidates):
            count = tokens if tokens is not None else max(1, cand.numel() // 4)
            if not 1 <= count <= cand.numel():
                raise ValueError(
                    f"{method}: tokens={count} is not allowed for an image of {cand.numel()} tokens besides its "
                    f"{lines[b].numel()} newline tokens (always kept); tokens must be in 1..{cand.numel()}"
                )
            budgets.append(count)
        width = max(count + line.numel() for count, line in zip(budgets, lines, strict=True))
        jobs = [(b, candidates[b], width - lines[b].numel()) for b in range(batch)]
    elif scope == "crop":
        jobs = []
        totals = []
        for b, cand in enumerate(candidates):
            total = lines[b].numel()
            for value in torch.unique(crop[b, cand]).tolist():
                members = cand[crop[b, cand] == value]
                count = tokens if tokens is not None else max(1, members.numel() // 4)
                count = min(count, members.numel())
                jobs.append((b, members, count))
                total += count
            totals.append(total)
        if len(set(totals)) > 1:
            raise ValueError(
                f"{method}: budget_scope='crop' keeps {sorted(set(totals))} tokens for images of the same token "
                "count in one batch (different crop layouts); batch them separately or use budget_scope='image'"
            )
    else:
        raise ValueError(f"{method}: budget_scope={scope!r}; allowed: {BUDGET_SCOPES}")
    by_shape: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for b, members, count in jobs:
        by_shape.setdefault((members.numel(), count), []).append((b, members))
    for (_, count), entries in by_shape.items():
        rows = torch.tensor([b for b, _ in entries], device=device)
        members = torch.stack([m for _, m in entries])
        chosen = members.gather(1, choose(rows, members, count).to(device))
        for (b, _), picks in zip(entries, chosen, strict=True):
            picked[b].append(picks)
    return torch.stack([torch.cat([lines[b], *picked[b]]).sort().values for b in range(batch)])


def _patch_index(layout) -> torch.Tensor:
    """[V] each token's patch within its crop (the source of the largest weight), -1 at newline tokens."""
    main = layout.source[:, 0] if layout.weight is None else layout.source.gather(
        1, layout.weight.argmax(dim=1, keepdim=True))[:, 0]
    return torch.where(layout.newline, torch.full_like(main, -1), main % layout.patches)


def feature_layer_index(num_layers: int, vision_feature_layer) -> int:
    """Index of the encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
    if not isinstance(vision_feature_layer, int) or isinstance(vision_feature_layer, bool):
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer!r}: [CLS] attention needs a single feature layer"
        )
    index = num_layers + vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer - 1
    if not 0 <= index < num_layers:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} selects no encoder layer's output")
    return index


@torch.no_grad()
def cls_attention(attention: nn.Module, hidden: torch.Tensor, drop_cls: bool = True) -> torch.Tensor:
    """[CLS]-query attention of a CLIP self-attention module, averaged over heads, in float32.

    Args:
        attention: a ``CLIPAttention`` (``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``).
        hidden: its input hidden states [n, 1 + P, Dv] (after ``layer_norm1``), [CLS] first.
        drop_cls: return the attention over the P patches only (LLaVA's ``"default"`` strategy).

    Returns:
        [n, P] (or [n, 1 + P]) float32: row 0 of the eager attention probabilities, mean over heads.
    """
    n, length, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(hidden[:, :1]).float().view(n, 1, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).float().view(n, length, heads, head_dim).transpose(1, 2)
    probs = ((query @ key.transpose(-1, -2)) * attention.scale).softmax(dim=-1)[:, :, 0]  # [n, heads, L]
    if drop_cls:
        probs = probs[:, :, 1:]
    return probs.mean(dim=1)


@torch.no_grad()
def feature_layer_signals(attention: nn.Module, hidden: torch.Tensor, drop_cls: bool = True) -> dict[str, torch.Tensor]:
    """[CLS]-row attention summed and averaged over heads, and head-mean keys, of a CLIP self-attention
    (``methods_more.md`` §1.2: VisionZip's ``s`` and ``Km``), in float32, from one ``k_proj`` run.

    Returns ``cls_attention`` [n, P] (as ``cls_attention``), ``cls_attention_sum`` [n, P] and
    ``feature_keys`` [n, P, head_dim] (P patches; with ``drop_cls=False`` the [CLS] column/row is kept).
    """
    n, length, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(hidden[:, :1]).float().view(n, 1, heads, head_dim).transpose(1, 2)
    raw_keys = attention.k_proj(hidden).float().view(n, length, heads, head_dim)
    key = raw_keys.transpose(1, 2)
    probs = ((query @ key.transpose(-1, -2)) * attention.scale).softmax(dim=-1)[:, :, 0]  # [n, heads, L]
    keys = raw_keys.mean(dim=2)  # [n, L, head_dim]
    if drop_cls:
        probs, keys = probs[:, :, 1:], keys[:, 1:]
    return {"cls_attention": probs.mean(dim=1), "cls_attention_sum": probs.sum(dim=1), "feature_keys": keys}


@torch.no_grad()
def merged_head_signals(attention: nn.Module, hidden: torch.Tensor, drop_cls: bool = True) -> dict[str, torch.Tensor]:
    """PruMerge's signals of a CLIP self-attention (``methods_more.md`` §5.1), in float32: the [CLS] row of
    one head over the full width, ``softmax(q_0 k^T * Dv**-0.5)`` over all keys, and the keys themselves.

    Returns ``last_layer_attention`` [n, P] and ``last_layer_keys`` [n, P, Dv] (patches; with
    ``drop_cls=False`` the [CLS] column/row is kept).
    """
    width = hidden.shape[-1]
    query = attention.q_proj(hidden[:, :1]).float()  # [n, 1, Dv]
    keys = attention.k_proj(hidden).float()  # [n, L, Dv]
    probs = ((query @ keys.transpose(-1, -2)) * width**-0.5).softmax(dim=-1)[:, 0]  # [n, L]
    if drop_cls:
        probs, keys = probs[:, 1:], keys[:, 1:]
    return {"last_layer_attention": probs, "last_layer_keys": keys}


@torch.no_grad()
def received_attention(attention: nn.Module, hidden: torch.Tensor, drop_cls: bool = True) -> torch.Tensor:
    """Attention received per token at a CLIP self-attention (HiPrune's ``g``, ``methods_more.md`` §4.1), in
    float32: the eager probabilities ``softmax(q k^T * scale)`` averaged over heads and over all queries.

    Returns [n, P] (patch columns; with ``drop_cls=False`` [n, 1 + P], [CLS] column kept).
    """
    n, length, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(hidden).float().view(n, length, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).float().view(n, length, heads, head_dim).transpose(1, 2)
    received = ((query @ key.transpose(-1, -2)) * attention.scale).softmax(dim=-1).mean(dim=(1, 2))  # [n, L]
    return received[:, 1:] if drop_cls else received


class VisionCapture:
    """Forward hooks on a LLaVA model's vision side that record the signals named in ``needs``.

    On families that pack crops (``ModelAdapter.packs_crops``) the model's ``get_image_features`` is
    wrapped too (an instance attribute, removed by ``remove``): the hooks record only while it runs, and
    its arguments give the images' layouts (``take_images``).
    """

    def __init__(self, adapter, needs: tuple[str, ...]) -> None:
        unknown = sorted(n for n in set(needs) - set(VISION_SIGNALS) if not n.startswith(RECEIVED_PREFIX))
        if unknown:
            raise ValueError(
                f"unknown vision signal(s) {unknown}; available: {VISION_SIGNALS} or {RECEIVED_PREFIX}<layer>"
            )
        self.adapter = adapter
        self.needs = tuple(needs)
        self._hooks: list = []
        self._cls: list[torch.Tensor] = []
        self._features: list[torch.Tensor] = []
        self._projected: list[torch.Tensor] = []
        self._attention: dict[str, list[torch.Tensor]] = {
            "cls_attention_sum": [], "feature_keys": [], "last_layer_attention": [], "last_layer_keys": []
        }
        self._cls_feature: list[torch.Tensor] = []
        self._quiet = False  # True while ``project`` runs: those projector calls are not LLaVA's encoding
        config = adapter.model.config
        self._drop_cls = config.vision_feature_select_strategy == "default"
        self._has_cls = adapter.has_cls(config)  # without it, cls_attention is the received attention
        self._packs = bool(adapter.packs_crops)
        self._encoding = False  # packs_crops: inside the model's get_image_features
        self._encoding_args: dict | None = None  # packs_crops: the arguments of the last image encoding
        self._unwrap: Callable[[], None] | None = None
        tower = adapter.vision_tower
        num_tower_layers = len(tower.encoder.layers)
        feature = config.vision_feature_layer
        feature_index = (  # only resolved for the bare ``received_attention`` name
            feature_layer_index(num_tower_layers, feature) if "received_attention" in needs
            and isinstance(feature, int) and not isinstance(feature, bool) else None
        )
        self._feature_index = feature_index
        received_layers = sorted({
            layer for name in needs
            if (layer := _received_layer(name, num_tower_layers, feature_index)) is not None
        })
        self._received: dict[int, list[torch.Tensor]] = {layer: [] for layer in received_layers}
        self._hooks.append(tower.register_forward_pre_hook(self._on_tower))
        for layer in received_layers:
            hook = functools.partial(self._on_received, layer)
            self._hooks.append(tower.encoder.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True))
        if _ATTENTION_SIGNALS & set(needs) or "cls_feature" in needs:
            layers = tower.encoder.layers
            index = feature_layer_index(len(layers), config.vision_feature_layer)
            if _ATTENTION_SIGNALS & set(needs):
                self._hooks.append(
                    layers[index].self_attn.register_forward_hook(self._on_attention, with_kwargs=True)
                )
            if "cls_feature" in needs:
                self._hooks.append(layers[index].register_forward_hook(self._on_feature_layer))
        if _LAST_LAYER_SIGNALS & set(needs):
            last = tower.encoder.layers[-1].self_attn
            self._hooks.append(last.register_forward_hook(self._on_last_attention, with_kwargs=True))
        if {"patch_features", "projected_features", "post_layernorm_features"} & set(needs):
            projector = adapter.llava_model.multi_modal_projector
            self._hooks.append(projector.register_forward_hook(self._on_projector))
        if self._packs:
            self._wrap_encoder()

    def _wrap_encoder(self) -> None:
        """Wrap the multimodal model's ``get_image_features`` (``generate`` and the model's forward both call
        it) so that the hooks record its crops and its arguments are kept for the layouts."""
        model = self.adapter.llava_model
        if "get_image_features" in vars(model):
            raise RuntimeError("the model's get_image_features is already replaced by other code")
        original = model.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            try:
                arguments = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                arguments = kwargs
            self.reset()  # a new image encoding: forget signals that no prefill consumed
            self._encoding_args = {name: arguments.get(name) for name in
                                   ("image_sizes", "batch_num_images", "vision_aspect_ratio")}
            self._encoding = True
            try:
                return original(*args, **kwargs)
            finally:
                self._encoding = False

        model.get_image_features = get_image_features

        def unwrap() -> None:
            if vars(model).get("get_image_features") is get_image_features:
                del model.get_image_features

        self._unwrap = unwrap

    def _recording(self) -> bool:
        """Whether a hook call belongs to an image encoding (always on families that do not pack crops)."""
        return self._encoding or not self._packs

    def _on_tower(self, module, args) -> None:
        if not self._packs:
            self.reset()  # a new image encoding: forget signals that no prefill consumed

    def _on_attention(self, module, args, kwargs, output) -> None:
        if not self._recording():
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not self._has_cls:  # SigLIP: the attention each patch receives stands in for [CLS] (models.md §4)
            self._cls.append(received_attention(module, hidden, drop_cls=False))
            return
        if not {"cls_attention_sum", "feature_keys"} & set(self.needs):
            self._cls.append(cls_attention(module, hidden, self._drop_cls))
            return
        signals = feature_layer_signals(module, hidden, self._drop_cls)
        if "cls_attention" in self.needs:
            self._cls.append(signals["cls_attention"])
        for name in ("cls_attention_sum", "feature_keys"):
            if name in self.needs:
                self._attention[name].append(signals[name])

    def _on_last_attention(self, module, args, kwargs, output) -> None:
        if not self._recording():
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        signals = merged_head_signals(module, hidden, self._drop_cls)
        for name in _LAST_LAYER_SIGNALS & set(self.needs):
            self._attention[name].append(signals[name])

    def _on_received(self, layer: int, module, args, kwargs, output) -> None:
        if not self._recording():
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._received[layer].append(received_attention(module, hidden, self._drop_cls))

    def _on_feature_layer(self, module, args, output) -> None:
        if not self._recording():
            return
        hidden = output[0] if isinstance(output, tuple) else output
        self._cls_feature.append(hidden[:, 0].detach())

    def _on_projector(self, module, args, output) -> None:
        if self._quiet or not self._recording():
            return
        if "patch_features" in self.needs or "post_layernorm_features" in self.needs:
            self._features.append(args[0].detach())
        if "projected_features" in self.needs:
            self._projected.append(output.detach())

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The model's projector applied to ``features``, not recorded as a captured signal."""
        self._quiet = True
        try:
            return self.adapter.llava_model.multi_modal_projector(features)
        finally:
            self._quiet = False

    def reset(self) -> None:
        """Forget what earlier calls captured."""
        self._cls, self._features, self._projected = [], [], []
        self._attention = {name: [] for name in self._attention}
        self._cls_feature = []
        self._received = {layer: [] for layer in self._received}
        self._encoding_args = None

    def _patches_per_image(self) -> int:
        """Patch tokens per image of the captured encodings (from the captured per-image signals)."""
        for chunks in (*self._attention.values(), *self._received.values(), self._cls):
            if chunks:
                return int(chunks[0].shape[1])
        tower = self.adapter.vision_tower
        side = tower.config.image_size // tower.config.patch_size
        return side * side + (0 if self._drop_cls else 1)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None
        self.reset()

    @torch.no_grad()
    def take_images(self) -> list[VisionSignals] | None:
        """Families that pack crops: the signals of the last image encoding, one ``VisionSignals`` per
        encoded image in encoding order, with unbatched [V, ...] tensors in the image's token order
        (``ModelAdapter.image_layouts``; newline tokens marked and 0), consumed. None when no image was
        encoded since the last take (e.g. images encoded before the method was applied)."""
        encoding = self._encoding_args
        if encoding is None:
            self.reset()
            return None
        per_crop: dict[str, torch.Tensor] = {}
        if self._cls:
            per_crop["cls_attention"] = torch.cat(self._cls)
        features = torch.cat(self._features) if self._features else None
        if features is not None and "patch_features" in self.needs:
            per_crop["patch_features"] = features
        if features is not None and "post_layernorm_features" in self.needs:
            per_crop["post_layernorm_features"] = self.adapter.vision_tower.post_layernorm(features)
        for name, chunks in self._attention.items():
            if chunks:
                per_crop[name] = torch.cat(chunks)
        received = {layer: torch.cat(chunks) for layer, chunks in self._received.items() if chunks}
        cls_feature = torch.cat(self._cls_feature) if self._cls_feature else None  # [crops, Dv]
        tensors = [*per_crop.values(), *received.values()]
        patches = int(tensors[0].shape[1]) if tensors else self.adapter.patches_per_crop
        layouts = self.adapter.image_layouts(encoding, patches)
        crops = sum(layout.num_crops for layout in layouts)
        if any(t.shape[0] != crops for t in tensors) or (cls_feature is not None and cls_feature.shape[0] != crops):
            self.reset()
            raise RuntimeError(
                f"captured {sorted({int(t.shape[0]) for t in tensors})} crops of vision signals for images of "
                f"{crops} crops in all; the vision tower ran on crops that do not match the encoded images"
            )
        device = tensors[0].device if tensors else torch.device("cpu")
        images = []
        start = 0
        for layout in layouts:
            part = slice(start, start + layout.num_crops)
            start += layout.num_crops
            values = {name: layout.pack(tensor[part]) for name, tensor in per_crop.items()}
            images.append(VisionSignals(
                **values,
                received_attention={layer: layout.pack(t[part]) for layer, t in received.items()} or None,
                cls_feature=None if cls_feature is None else cls_feature[part],
                feature_layer=self._feature_index,
                patches_per_image=layout.count,
                image_token_id=self.adapter.image_token_id,
                project=self.project,
                newline_mask=layout.newline.to(device),
                crop_index=layout.crop.to(device),
                patch_index=_patch_index(layout).to(device),
            ))
        self.reset()
        return images

    @torch.no_grad()
    def take(self, batch: int, num_visual: int, prompt_ids: list[list[int]] | None) -> VisionSignals:
        """The captured signals as [batch, num_visual, ...] tensors (consumed).

        ``generate`` encodes the images once before the prefill and then repeats every sample for beams
        or several returned sequences (``repeat_interleave``): when the batch is a multiple of the
        encoded samples, each encoded sample is repeated the same way.
        """

        def per_sample(chunks: list[torch.Tensor], name: str) -> torch.Tensor | None:
            if not chunks:
                return None
            rows = torch.cat([c.reshape(-1, *c.shape[2:]) for c in chunks], dim=0)
            encoded, rest = divmod(rows.shape[0], num_visual)
            if rest or not encoded or batch % encoded:
                raise RuntimeError(
                    f"captured {rows.shape[0]} visual rows for {name}, expected {batch} x {num_visual}; "
                    "the vision tower ran on images that do not match the prompt's <image> tokens"
                )
            rows = rows.view(encoded, num_visual, *rows.shape[1:])
            return rows.repeat_interleave(batch // encoded, dim=0) if batch != encoded else rows

        features = per_sample(self._features, "patch_features")
        cls_feature = None
        if self._cls_feature:
            images = torch.cat(self._cls_feature, dim=0)  # [n_images, Dv]
            patches = self._patches_per_image()
            per_prompt, rest = divmod(num_visual, patches) if patches else (0, 1)
            if rest or not per_prompt or images.shape[0] % per_prompt:
                raise RuntimeError(
                    f"captured {images.shape[0]} [CLS] vectors of {patches} patches each for {batch} samples of "
                    f"{num_visual} visual tokens; the images do not match the prompt's <image> tokens"
                )
            encoded = images.shape[0] // per_prompt
            if not encoded or batch % encoded:
                raise RuntimeError(f"captured [CLS] vectors of {encoded} samples for a batch of {batch}")
            cls_feature = images.view(encoded, per_prompt, -1).repeat_interleave(batch // encoded, dim=0)
        signals = VisionSignals(
            cls_attention=per_sample(self._cls, "cls_attention"),
            cls_attention_sum=per_sample(self._attention["cls_attention_sum"], "cls_attention_sum"),
            feature_keys=per_sample(self._attention["feature_keys"], "feature_keys"),
            cls_feature=cls_feature,
            last_layer_attention=per_sample(self._attention["last_layer_attention"], "last_layer_attention"),
            last_layer_keys=per_sample(self._attention["last_layer_keys"], "last_layer_keys"),
            received_attention={
                layer: per_sample(chunks, f"{RECEIVED_PREFIX}{layer}") for layer, chunks in self._received.items()
                if chunks
            } or None,
            feature_layer=self._feature_index,
            patches_per_image=self._patches_per_image(),
            patch_features=features if "patch_features" in self.needs else None,
            projected_features=per_sample(self._projected, "projected_features"),
            prompt_ids=prompt_ids,
            image_token_id=self.adapter.image_token_id,
            project=self.project,
        )
        if "post_layernorm_features" in self.needs and features is not None:
            signals.post_layernorm_features = self.adapter.vision_tower.post_layernorm(features)
        self.reset()
        return signals
