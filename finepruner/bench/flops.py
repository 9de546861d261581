"""Analytic FLOPs of a LLaVA forward from the token count at every decoder layer.

Conventions (``docs/performance.md``, "FLOPs"):

* **Our count** (``*_flops`` functions): hardware FLOPs, one multiply-add = **2 FLOPs**, matrix products
  only (norms, rotary embeddings, softmax, activations and residual adds are ignored: under 1% here).
  Per decoder layer with ``n`` query tokens attending to ``c`` keys (``c = n`` in a prefill), hidden
  size ``d``, query width ``d_q = heads * head_dim``, key/value width ``d_kv = kv_heads * head_dim``
  (GQA) and MLP width ``m``::

      projections  q, k, v, o   2·n·d·(d_q + 2·d_kv) + 2·n·d_q·d
      attention    QKᵀ and A·V  2·2·n·c·d_q          (the full n x c square; ``causal=True`` counts
                                                       only the n(n+1)/2 pairs a causal kernel needs)
      MLP          SwiGLU       2·3·n·d·m            (gate, up and down matrices; 2·2·n·d·m without gate)

  plus the LM head on the last token of each sample (``2·d·vocab``; ``logits_to_keep=1`` as
  ``generate`` does). The engine's scoring signal (one query row: the last token's q projection, the
  score layer's k projection over its ``n`` tokens unless its cached keys are reused, and one 1 x n
  product) is counted separately as ``scoring``; with ``score_impl="eager"`` it is the full q and k
  projections and the n x n product.
* **The papers' count** (``paper_flops``): ``T·(4nd² + 2n²d + 2ndm)`` per sample, spec ``methods.md`` §0.4
  (FastV §4.2, VisPruner, CDPruner): one multiply-add = **1** op, MHA projections, full attention
  square, a two-matrix MLP (SwiGLU's gate not counted) and no LM head. ``gate=True`` gives SparseVLM's
  ``4nd² + 2n²d + 3ndm``. For LLaVA-1.5-7B with 90 text tokens this is 3.47 T (vanilla), 1.44/1.11/0.78 T
  with 192/128/64 visual tokens before the LLM, 2.04 T for FastV K=2 R=50% (tested).
* **Vision tower** (``vision_flops``): one ViT run per **crop** on ``patches + 1`` tokens for CLIP (the
  [CLS] token) or ``patches`` for SigLIP (no [CLS]; the family's adapter says which, ``has_cls``), every
  encoder layer that runs. LLaVA-1.5 reads ``hidden_states[-2]`` (``vision_feature_layer=-2``), so the
  last layer's output is unused, but transformers 5.24 still runs it: ``layers_run`` is what we count,
  ``layers_used`` is reported beside it. Plus the patch-embedding convolution. The projector
  (``projector_flops``) is LLaVA's two-layer MLP on every crop's selected patch features. Both are
  reported apart from the language model: they are identical for every in-LLM method and for the
  pre-LLM ones. LLaVA-1.5 encodes one crop per image; LLaVA-NeXT and OneVision one base crop plus the
  tiles of the image's anyres grid (OneVision multi-image samples: the base crop only), so
  ``prefill_report`` takes the number of crops actually encoded (``crops``; ``spec/models.md`` §1.1-1.2).
  The newline tokens of the anyres families are a learned vector (no FLOPs) and OneVision's bilinear
  downsampling of large grids is not counted.
* **Decode step** (``decode_step_flops``): one new token per sample; each layer attends to its own KV
  length plus the new token (pruned layers hold fewer keys), plus the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

TFLOP = 1e12


@dataclass(frozen=True)
class DecoderShape:
    """Shape of a Llama-style decoder (the language model of LLaVA)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool = True  # SwiGLU: gate, up and down matrices

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From a ``LlamaConfig`` (or a ``LlavaConfig``, whose ``text_config`` is used)."""
        config = getattr(config, "text_config", None) or config
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            vocab=int(config.vocab_size),
            gated=True,  # Llama/Vicuna MLPs are SwiGLU (gate, up, down)
        )


@dataclass(frozen=True)
class VisionShape:
    """Shape of the vision tower (CLIP with [CLS], SigLIP without) and the projector, per crop."""

    hidden: int
    intermediate: int
    layers: int
    image_size: int
    patch: int
    channels: int
    projector_out: int  # the language model's hidden size
    feature_layer: int = -2
    cls_token: bool = True  # CLIP prepends [CLS]; SigLIP does not
    select_strategy: str = "default"  # "default" drops [CLS] before the projector, "full" keeps it
    projector_in: int | None = None  # the projector's input width (default ``hidden``: one feature layer)

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def tokens(self) -> int:
        """Tokens through the encoder per crop: patches, + [CLS] on CLIP."""
        return self.patches + (1 if self.cls_token else 0)

    @property
    def projected(self) -> int:
        """Features per crop through the projector (the crop's visual tokens): the patches, + [CLS] with
        ``vision_feature_select_strategy="full"`` on a tower that has one."""
        return self.patches + (1 if self.cls_token and self.select_strategy == "full" else 0)

    @property
    def layers_used(self) -> int:
        """Encoder layers whose output LLaVA reads (``hidden_states[feature_layer]``)."""
        layer = self.feature_layer
        return self.layers + 1 + layer if layer < 0 else layer

    @classmethod
    def from_config(cls, config: Any) -> VisionShape:
        """From a multimodal configuration of any registered family (``LlavaConfig``,
        ``LlavaNextConfig``, ``LlavaOnevisionConfig``); whether the tower has a [CLS] token is the
        family adapter's ``has_cls`` (CLIP when the family is unknown)."""
        vision, text = config.vision_config, config.text_config
        layer = config.vision_feature_layer
        layers_read = len(layer) if isinstance(layer, list | tuple) else 1
        return cls(
            hidden=int(vision.hidden_size),
            intermediate=int(vision.intermediate_size),
            layers=int(vision.num_hidden_layers),
            image_size=int(vision.image_size),
            patch=int(vision.patch_size),
            channels=int(getattr(vision, "num_channels", 3)),
            projector_out=int(text.hidden_size),
            feature_layer=int(layer) if isinstance(layer, int) else -2,
            cls_token=_has_cls(config),
            select_strategy=str(getattr(config, "vision_feature_select_strategy", "default")),
            projector_in=int(vision.hidden_size) * layers_read,
        )


def _family(config: Any):
    """The adapter class of the configuration's family, or None for an unregistered one."""
    from finepruner.models.adapters import adapter_class

    try:
        return adapter_class(getattr(config, "model_type", None))
    except ValueError:
        return None


def _has_cls(config: Any) -> bool:
    """The family adapter's answer (``ModelAdapter.has_cls``); True (CLIP) for an unregistered family."""
    family = _family(config)
    return True if family is None else bool(family.has_cls(config))


# -- language model -----------------------------------------------------------------------------------
def attention_pairs(n: int, keys: int | None = None, causal: bool = False) -> int:
    """Query-key pairs multiplied: ``n * keys`` (full square), or the causal count."""
    keys = n if keys is None else keys
    if not causal:
        return n * keys
    past = keys - n  # keys before the first query (decode / cached prefix)
    return n * past + n * (n + 1) // 2


def decoder_layer_flops(shape: DecoderShape, n: int, keys: int | None = None, causal: bool = False) -> dict:
    """FLOPs of one decoder layer for ``n`` query tokens over ``keys`` keys (default ``n``), one sample."""
    d, dq, dkv = shape.hidden, shape.q_width, shape.kv_width
    projections = 2 * n * d * (dq + 2 * dkv) + 2 * n * dq * d
    attention = 2 * 2 * attention_pairs(n, keys, causal) * dq
    mlp = 2 * (3 if shape.gated else 2) * n * d * shape.intermediate
    return {"projections": projections, "attention": attention, "mlp": mlp,
            "total": projections + attention + mlp}


def lm_head_flops(shape: DecoderShape, rows: int = 1) -> int:
    """LM head over ``rows`` positions (1 = the last token, as ``generate``)."""
    return 2 * rows * shape.hidden * shape.vocab


def scoring_flops(shape: DecoderShape, n: int, impl: str = "cheap", keys_reused: bool = False) -> int:
    """The engine's attention signal at one stage, over a score layer holding ``n`` tokens, one sample.

    ``"cheap"``: the last token's q projection, k over ``n`` tokens (not when ``keys_reused``: the score
    layer's cached keys are used), one 1 x n product per head.
    ``"eager"``: q and k over all ``n`` tokens and the n x n product (the materialised attention).
    """
    d, dq, dkv = shape.hidden, shape.q_width, shape.kv_width
    if impl == "eager":
        return 2 * n * d * (dq + dkv) + 2 * n * n * dq
    return 2 * d * dq + (0 if keys_reused else 2 * n * d * dkv) + 2 * n * dq


def prefill_flops(
    shape: DecoderShape,
    sequence_length: Sequence[int],
    batch: int = 1,
    score_lengths: Sequence[int] = (),
    score_impl: str = "cheap",
    causal: bool = False,
    score_keys_reused: Sequence[bool] = (),
) -> dict:
    """FLOPs of a prefill whose layer ``i`` holds ``sequence_length[i]`` tokens per sample.

    Returns a dict of totals for the whole batch: ``layers`` (list), ``decoder``, ``lm_head``,
    ``scoring`` (the engine's signals at the ``score_lengths`` stages; ``score_keys_reused[s]`` says
    whether stage s reused the score layer's keys, False where not given) and ``total`` (their sum).
    """
    if len(sequence_length) != shape.layers:
        raise ValueError(f"{len(sequence_length)} layer lengths for a {shape.layers}-layer decoder")
    layers = [batch * decoder_layer_flops(shape, n, causal=causal)["total"] for n in sequence_length]
    decoder = sum(layers)
    head = batch * lm_head_flops(shape)
    reused = list(score_keys_reused) + [False] * (len(score_lengths) - len(score_keys_reused))
    scoring = batch * sum(scoring_flops(shape, n, score_impl, r) for n, r in zip(score_lengths, reused))
    return {"layers": layers, "decoder": decoder, "lm_head": head, "scoring": scoring,
            "total": decoder + head + scoring}


def decode_step_flops(shape: DecoderShape, kv_lengths: Sequence[int], batch: int = 1) -> int:
    """FLOPs of one decode step: one new token per sample; layer ``i`` already caches ``kv_lengths[i]``."""
    if len(kv_lengths) != shape.layers:
        raise ValueError(f"{len(kv_lengths)} KV lengths for a {shape.layers}-layer decoder")
    per_sample = sum(decoder_layer_flops(shape, 1, keys=c + 1)["total"] for c in kv_lengths)
    return batch * (per_sample + lm_head_flops(shape))


def paper_flops(shape: DecoderShape, sequence_length: Sequence[int], gate: bool = False) -> int:
    """The papers' count for one sample: sum over layers of ``4nd² + 2n²d + (3 if gate else 2)·ndm``
    (multiply-add = 1 op, MHA, full square, no LM head; spec ``methods.md`` §0.4)."""
    d, m = shape.hidden, shape.intermediate
    return sum(4 * n * d * d + 2 * n * n * d + (3 if gate else 2) * n * d * m for n in sequence_length)


def kv_cache_bytes(shape: DecoderShape, kv_lengths: Sequence[int], batch: int = 1, bytes_per_value: int = 2) -> int:
    """Analytic KV-cache size: keys and values of ``kv_lengths[i]`` tokens per layer."""
    return batch * 2 * shape.kv_width * bytes_per_value * sum(kv_lengths)


# -- vision side --------------------------------------------------------------------------------------
def vision_flops(shape: VisionShape, images: int = 1) -> dict:
    """ViT FLOPs (CLIP or SigLIP: MHA, two-matrix MLP) for ``images`` crops (one per image on LLaVA-1.5):
    patch embedding + every encoder layer that runs (``layers_run``; ``per_layer`` lets you subtract the
    unused last layer)."""
    t, d, m = shape.tokens, shape.hidden, shape.intermediate
    per_layer = 2 * (4 * t * d * d + 2 * t * t * d + 2 * t * d * m)  # MHA, two-matrix (non-gated) MLP
    embed = 2 * shape.patches * shape.channels * shape.patch * shape.patch * d
    total = images * (embed + shape.layers * per_layer)
    return {"per_layer": images * per_layer, "embedding": images * embed, "layers_run": shape.layers,
            "layers_used": shape.layers_used, "total": total}


def projector_flops(shape: VisionShape, images: int = 1) -> int:
    """LLaVA's projector (Linear(Dv, D), GELU, Linear(D, D)) on the selected features of ``images``
    crops."""
    d = shape.projector_out
    width = shape.projector_in if shape.projector_in is not None else shape.hidden
    return images * 2 * shape.projected * (width * d + d * d)


# -- Qwen-VL towers: every image at its own grid, 2x2 mergers (spec/models.md §1.3-§1.4) --------------
@dataclass(frozen=True)
class MergerVisionShape:
    """A Qwen-VL vision tower: a ViT over each image's patches (Conv3d patch embedding of ``temporal_patch``
    frames), blocks with full attention per frame or windowed attention, and MLP mergers that fold
    ``merge x merge`` patches into one language-model token (``mergers``: the main one plus Qwen3-VL's
    deepstack mergers, all of the same shape)."""

    hidden: int
    intermediate: int
    layers: int
    patch: int
    temporal_patch: int
    channels: int
    merge: int
    out_hidden: int
    gated: bool = False  # Qwen2.5-VL's SwiGLU MLP (gate, up, down); Qwen2/Qwen3-VL: two matrices
    window: int | None = None  # merged tokens per attention-window side (Qwen2.5-VL: 112 px / 28 = 4)
    full_layers: tuple[int, ...] = ()  # the full-attention blocks of a windowed tower
    mergers: int = 1


def _window_sides(side: int, window: int) -> list[int]:
    """Window extents along one axis of ``side`` merged tokens (full windows, then the remainder)."""
    return [window] * (side // window) + ([side % window] if side % window else [])


def merger_vision_flops(shape: MergerVisionShape, grids: Sequence[Sequence[int]]) -> dict:
    """FLOPs of one tower call on images of patch grids ``grids`` [(t, h, w), ...] (2 FLOPs per multiply-add):
    ``total`` (patch embedding + every block), ``merger`` (all mergers), ``per_layer`` (the blocks' linear and
    MLP parts summed over images: attention differs between windowed and full blocks)."""
    d, m, unit = shape.hidden, shape.intermediate, shape.merge * shape.merge
    embed = linear = full_pairs = window_pairs = 0
    merged = 0
    for t, h, w in ((int(a), int(b), int(c)) for a, b, c in grids):
        n = t * h * w
        merged += n // unit
        embed += 2 * n * shape.channels * shape.temporal_patch * shape.patch * shape.patch * d
        linear += 2 * n * 4 * d * d + 2 * (3 if shape.gated else 2) * n * d * m
        full_pairs += t * (h * w) ** 2  # full attention: each frame's patches (cu_seqlens per frame)
        if shape.window is not None:
            rows, cols = _window_sides(h // shape.merge, shape.window), _window_sides(w // shape.merge, shape.window)
            window_pairs += t * sum((a * b * unit) ** 2 for a in rows for b in cols)
    full = range(shape.layers) if shape.window is None else [i for i in shape.full_layers if i < shape.layers]
    windowed = shape.layers - len(full)
    attention = 2 * 2 * d * (len(full) * full_pairs + windowed * window_pairs)
    width = unit * d
    merger = shape.mergers * 2 * merged * (width * width + width * shape.out_hidden)
    return {"per_layer": linear, "embedding": embed, "attention": attention, "layers_run": shape.layers,
            "layers_used": shape.layers, "merger": merger, "tokens": merged,
            "total": embed + shape.layers * linear + attention}


# -- one prefill, as PruneStats sees it ---------------------------------------------------------------
def prefill_report(
    config: Any,
    sequence_length: Sequence[int],
    visual_tokens: Sequence[int],
    batch: int = 1,
    score_lengths: Sequence[int] = (),
    score_impl: str = "cheap",
    score_keys_reused: Sequence[bool] = (),
    crops: int | None = None,
    vision_grids: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Everything about one prefill's FLOPs, JSON-serialisable (``PruneStats.flops``).

    Families whose tower encodes every image at its own grid (Qwen-VL: ``ModelAdapter.vision_flops``) count
    the tower and the merger(s) from ``vision_grids`` (the patch grids ``(t, h, w)`` the tower encoded).

    ``config`` is the model's multimodal configuration (or a bare text config: the vision fields are
    then None). ``crops``: vision-tower crops encoded in this prefill over the whole batch (LLaVA-NeXT /
    OneVision: base + tiles of every image, base only for OneVision multi-image samples); None infers
    them from the visual tokens entering layer 0 (one crop per ``projected`` tokens, as LLaVA-1.5's one
    crop per image), exact on LLaVA-1.5 only.
    """
    decoder = DecoderShape.from_config(config)
    lm = prefill_flops(decoder, sequence_length, batch, score_lengths, score_impl,
                       score_keys_reused=score_keys_reused)
    report = {
        "convention": "FLOPs, multiply-add = 2, SwiGLU gate counted, full attention square",
        "batch": batch,
        "decoder": lm["decoder"],
        "lm_head": lm["lm_head"],
        "scoring": lm["scoring"],
        "language_model": lm["total"],
        "layers": lm["layers"],
        "paper_tflops_per_sample": paper_flops(decoder, sequence_length) / TFLOP,
        "paper_gate_tflops_per_sample": paper_flops(decoder, sequence_length, gate=True) / TFLOP,
        "decode_step": decode_step_flops(decoder, sequence_length, batch),
        "vision_tower": None,
        "projector": None,
        "total": lm["total"],
    }
    family = _family(config)
    custom = family.vision_flops(config, visual_tokens, batch, crops, vision_grids) if family is not None else None
    if custom is not None:
        report.update(vision_tower=custom["total"], vision_layers_run=custom["layers_run"],
                      vision_layers_used=custom["layers_used"], vision_crops=custom["images"],
                      projector=custom["merger"], total=lm["total"] + custom["total"] + custom["merger"])
    elif getattr(config, "vision_config", None) is not None and (visual_tokens or crops):
        vision = VisionShape.from_config(config)
        if crops is None:
            crops = batch * max(1, round(visual_tokens[0] / vision.projected))
        tower = vision_flops(vision, crops)
        projector = projector_flops(vision, crops)
        report.update(vision_tower=tower["total"], vision_layers_run=tower["layers_run"],
                      vision_layers_used=tower["layers_used"], vision_crops=crops, projector=projector,
                      total=lm["total"] + tower["total"] + projector)
    return report


def shape_dict(config: Any) -> dict:
    """The decoder and vision shapes of a model's configuration as plain dicts (recorded with bench
    results)."""
    out = {"decoder": asdict(DecoderShape.from_config(config))}
    family = _family(config)
    merger = family.merger_vision_shape(config) if family is not None else None
    if merger is not None:
        out["vision"] = asdict(merger)
    elif getattr(config, "vision_config", None) is not None:
        out["vision"] = asdict(VisionShape.from_config(config))
    return out
