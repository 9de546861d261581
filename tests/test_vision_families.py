"""Vision-side signals and the pre-LLM methods that read them on LLaVA-NeXT and LLaVA-OneVision.

The tower's per-crop signals are mapped to each image's token order by the adapters' ``image_layouts``
(``spec/models.md`` §1.1-§1.2, §4); VisPruner and CDPruner keep every newline token and spend ``tokens``
per image (or per crop) on the others (§5.2). References: the models' own ``pack_image_features`` and
``get_image_features``, eager vision towers (``output_attentions``) and plain per-image selections.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution

import finepruner
from finepruner.engine.vision import VISION_SIGNALS
from finepruner.methods import available
from finepruner.methods import get as method_class
from finepruner.methods.base import PruningMethod, Stage
from finepruner.models.adapters import adapter_for
from finepruner.models.clip_text import build_tiny_clip_text
from finepruner.models.tiny import build_tiny_llava
from finepruner.models.tiny_families import (
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    next_inputs,
    onevision_inputs,
    tiny_image,
    visual_token_counts,
)
from tests.conftest import NUM_VISUAL, assert_row_equals_alone, noise_images
from tests.test_cdpruner import reference_dpp, reference_text_embeds
from tests.test_vispruner import reference_vispruner

PROMPTS = [
    "USER: <image>\nwhat color is the circle ? ASSISTANT:",
    "USER: <image>\nhow many red objects are there in this image ? ASSISTANT:",
    "USER: <image> and <image>\nwhich one is on the left of the square ? ASSISTANT:",
    "USER: what is the color of the sky ? ASSISTANT:",
]
IMAGES = [[tiny_image(60, 40, 1)], [tiny_image(64, 64, 2)], [tiny_image(90, 30, 3), tiny_image(40, 60, 4)], []]
#: Images of several layouts (2-4 tiles, unpadded rows or columns, a square one) for the packing checks.
LAYOUT_IMAGES = [tiny_image(60, 40, 1), tiny_image(64, 64, 2), tiny_image(90, 30, 3), tiny_image(40, 60, 4),
                 tiny_image(32, 32, 5), tiny_image(20, 90, 6)]
#: The three layouts: NeXT (CLIP), OneVision (SigLIP), OneVision with anyres_max_1 (every multi-crop grid
#: bilinearly shrunk, spec §1.2).
FAMILIES = ["llava_next", "llava_onevision", "onevision_shrunk"]
GENERATE = {"max_new_tokens": 2, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}


class Family:
    """A tiny model of one layout (sdpa, and eager with the same weights) and its input builder."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "llava_next":
            self.model, self.processor = build_tiny_llava_next(seed=0, qk_scale=8.0)
            self.eager, _ = build_tiny_llava_next(seed=0, attn="eager", qk_scale=8.0)
            self.tokenizer = self.processor.tokenizer
            self.build = lambda prompts, images: next_inputs(self.model, self.processor, prompts, images)
        else:
            aspect = "anyres_max_1" if name == "onevision_shrunk" else "anyres_max_9"
            self.model, image_processor, self.tokenizer = build_tiny_llava_onevision(
                seed=0, qk_scale=8.0, vision_aspect_ratio=aspect)
            self.eager, _, _ = build_tiny_llava_onevision(seed=0, attn="eager", qk_scale=8.0,
                                                          vision_aspect_ratio=aspect)
            self.processor = self.tokenizer
            self.build = lambda prompts, images: onevision_inputs(self.model, image_processor, self.tokenizer,
                                                                  prompts, images)
        self.adapter = adapter_for(self.model)

    def inputs(self, rows: list[int] | None = None, images: list | None = None) -> dict:
        rows = list(range(len(PROMPTS))) if rows is None else rows
        images = IMAGES if images is None else images
        return self.build([PROMPTS[r] for r in rows], [images[r] for r in rows])

    def generate(self, inputs: dict):
        with torch.no_grad():
            return self.model.generate(**inputs, **GENERATE)


_CACHE: dict[str, Family] = {}


def family(name: str) -> Family:
    if name not in _CACHE:
        torch.set_num_threads(2)
        _CACHE[name] = Family(name)
    return _CACHE[name]


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip_text(32, seed=3, max_positions=8)


# -- references ---------------------------------------------------------------------------------------------
def crop_batch(model, inputs) -> tuple[torch.Tensor, list[int]]:
    """All crops of the call's images as the model's vision batch, and the crops per image."""
    crops = adapter_for(model).crops_per_image(
        {"image_sizes": inputs["image_sizes"], "batch_num_images": inputs.get("batch_num_images")})
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], crops, strict=True)])
    return pixels, crops


def crop_parts(crops: list[int]):
    """``(image, its crop count, the rows of its crops in the vision batch)`` for each image, in batch order."""
    start = 0
    for image, count in enumerate(crops):
        yield image, count, slice(start, start + count)
        start += count


def next_order(config, height: int, width: int, crops: int) -> list[int]:
    """LLaVA-NeXT's token order of one image, written from the spec (§1.1): each token's flat crop-patch index
    (``crop * P + patch``), -1 for a newline. Base crop in raster order; then the unpadded rows of the tile
    grid in global raster order (the row of tile 0, the same row of tile 1, ...), a newline after each row."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    patches = side * side
    order = list(range(patches))
    if crops == 1:
        return order + [-1]
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    tiles_w = best_w // config.vision_config.image_size
    rows, cols = side * (best_h // config.vision_config.image_size), side * tiles_w
    top, left = 0, 0
    if width / height > cols / rows:
        top = (rows - int(round(height * (cols / width), 7))) // 2
    else:
        left = (cols - int(round(width * (rows / height), 7))) // 2
    for y in range(top, rows - top):
        for x in range(left, cols - left):
            tile = (y // side) * tiles_w + x // side
            order.append((1 + tile) * patches + (y % side) * side + x % side)
        order.append(-1)
    return order


def pack_reference(fam: Family, image: int, values: torch.Tensor, inputs) -> torch.Tensor:
    """One image's per-crop values [crops, P, ...] in its token order: the explicit order on NeXT; on OneVision
    the model's own ``pack_image_features`` applied to the values (float64, newline 0), which includes the
    bilinear shrink. Newline rows are 0."""
    config = fam.model.config
    crops = values.shape[0]
    if fam.name == "llava_next":
        height, width = inputs["image_sizes"][image].tolist()
        order = torch.tensor(next_order(config, height, width, crops))
        flat = values.reshape(-1, *values.shape[2:])
        out = flat[order.clamp(min=0)]
        return out.masked_fill((order < 0).view(-1, *[1] * (flat.dim() - 1)), 0)
    channels = values.double().reshape(crops, values.shape[1], -1)
    packed = fam.model.model.pack_image_features(
        [channels], inputs["image_sizes"][image:image + 1], image_newline=torch.zeros(channels.shape[-1]),
        vision_aspect_ratio=config.vision_aspect_ratio)[0][0]
    return packed.reshape(packed.shape[0], *values.shape[2:]).float()


def eager_signals(fam: Family, inputs) -> list[dict[str, torch.Tensor]]:
    """Per image, in token order, from an eager tower run on all crops: the [CLS] row of layer -2's attention
    averaged over heads and the layer -2 patch features (NeXT, [CLS] dropped); the column mean of the
    feature layer's (-1) attention over heads and queries and its hidden states (OneVision, no [CLS])."""
    model = fam.eager
    pixels, crops = crop_batch(model, inputs)
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        if fam.name == "llava_next":
            attention = out.attentions[-2][:, :, 0, 1:].mean(dim=1)
            features = out.hidden_states[-2][:, 1:]
        else:
            attention = out.attentions[-1].mean(dim=(1, 2))
            features = out.hidden_states[-1]
        normed = model.model.vision_tower.post_layernorm(features)
    images = []
    for image, _, part in crop_parts(crops):
        images.append({name: pack_reference(fam, image, values[part], inputs)
                       for name, values in (("cls_attention", attention), ("patch_features", features),
                                            ("post_layernorm_features", normed))})
    return images


def image_features(fam: Family, inputs) -> list[torch.Tensor]:
    """Each image's tokens as the language model receives them (``get_image_features``)."""
    with torch.no_grad():
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        return list(fam.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                       **extra).pooler_output)


def newlines_of(fam: Family, inputs) -> list[torch.Tensor]:
    """Each image's newline mask: the rows of ``get_image_features`` equal to ``image_newline``."""
    newline = fam.model.model.image_newline
    return [(features == newline).all(dim=-1) for features in image_features(fam, inputs)]


class Recorder(PruningMethod):
    """Keeps every token at layer 0 and records the vision signals of every group."""

    name = "recorder"
    default_positions = "renumber"
    needs_vision = ("cls_attention", "patch_features", "post_layernorm_features", "projected_features")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def plan(self, num_layers, num_visual):
        return [Stage(layer=0, keep=num_visual)]

    def select(self, stage_index, stage, ctx):
        self.seen.append(ctx.vision)
        return ctx.visual_ids.clone()


# -- the packed order ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_layouts_equal_the_models_packing(name):
    """The adapter's layout applied to the per-crop projector outputs gives ``get_image_features`` exactly
    (OneVision's shrunk grids to float32 rounding); newline tokens are where the model put ``image_newline``."""
    fam = family(name)
    images = [[image] for image in LAYOUT_IMAGES] + [LAYOUT_IMAGES[:2]]  # + one two-image sample
    prompts = ["<image> x"] * len(LAYOUT_IMAGES) + ["<image> <image> x"]
    inputs = fam.build(prompts, images)
    model = fam.model
    pixels, crops = crop_batch(model, inputs)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        selected = hidden[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        projected = model.model.multi_modal_projector(selected)
    encoding = {"image_sizes": inputs["image_sizes"], "batch_num_images": inputs.get("batch_num_images"),
                "vision_aspect_ratio": None}
    layouts = fam.adapter.image_layouts(encoding, projected.shape[1])
    expected = image_features(fam, inputs)
    assert [layout.count for layout in layouts] == visual_token_counts(model, inputs) == [len(e) for e in expected]
    assert [layout.num_crops for layout in layouts] == crops
    shrunk, start = 0, 0
    for image, (layout, packed) in enumerate(zip(layouts, expected, strict=True)):
        mine = layout.pack(projected[start:start + layout.num_crops])
        start += layout.num_crops
        keep = ~layout.newline
        assert torch.allclose(mine[keep], packed[keep], atol=1e-6, rtol=0)
        assert bool((mine[layout.newline] == 0).all())
        assert bool((packed[layout.newline] == model.model.image_newline).all())
        assert bool(((packed == model.model.image_newline).all(-1) == layout.newline).all())
        assert bool((layout.crop[layout.newline] == -1).all()) and int(layout.crop.max()) < layout.num_crops
        shrunk += layout.weight is not None
        if name == "llava_next":
            height, width = inputs["image_sizes"][image].tolist()
            source = torch.where(layout.newline, -1, layout.source[:, 0])
            assert source.tolist() == next_order(model.config, height, width, layout.num_crops)
    assert (shrunk > 0) == (name == "onevision_shrunk")


# -- the signals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_signals_equal_eager_references(name):
    """Per image, in its token order, from the hooks during generate == eager per-crop references packed
    (NeXT: CLIP [CLS] row of layer -2; OneVision: SigLIP column mean of the feature layer)."""
    fam = family(name)
    inputs = fam.inputs()
    references = eager_signals(fam, inputs)
    newlines = newlines_of(fam, inputs)
    features = image_features(fam, inputs)
    recorder = Recorder()
    with finepruner.apply(fam.model, recorder), torch.no_grad():
        fam.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    counts = visual_token_counts(fam.model, inputs)
    # groups are images of equal counts in order of first appearance; map each stacked row back to its image
    seen = [(signals, u) for signals in recorder.seen for u in range(signals.cls_attention.shape[0])]
    assert len(seen) == len(references)
    order = sorted(range(len(counts)), key=lambda i: ([c for c in dict.fromkeys(counts)].index(counts[i]), i))
    for image, (signals, u) in zip(order, seen, strict=True):
        reference = references[image]
        assert torch.equal(signals.newline_mask[u], newlines[image])
        for key in ("cls_attention", "patch_features", "post_layernorm_features"):
            got = getattr(signals, key)[u]
            assert got.shape == reference[key].shape
            assert torch.allclose(got.float(), reference[key], atol=2e-6, rtol=1e-5), key
            assert bool((got[newlines[image]] == 0).all())
        assert torch.allclose(signals.projected_features[u], features[image], atol=1e-6)


# -- kept sets against plain per-image references -----------------------------------------------------------
def _split(counts: list[int], rows: list[list[int]]) -> list[tuple[int, int, int]]:
    """(image, sample, offset of the image among the sample's visual tokens) per image."""
    result, image = [], 0
    for row, images in enumerate(rows):
        offset = 0
        for _ in images:
            result.append((image, row, offset))
            offset += counts[image]
            image += 1
    return result


def _expected_kept(fam, inputs, pick, scope, tokens):
    """Per sample, the sample-level ids the rule ``pick(image, candidates, count)`` keeps (plus newlines)."""
    counts = visual_token_counts(fam.model, inputs)
    newlines = newlines_of(fam, inputs)
    rows = [IMAGES[r] for r in range(len(PROMPTS))]
    crops_of = _crops_of(fam, inputs)
    expected: list[list[int]] = [[] for _ in rows]
    for image, row, offset in _split(counts, rows):
        candidates = [i for i in range(counts[image]) if not newlines[image][i]]
        crops = sorted({crops_of[image][i] for i in candidates})
        groups = [candidates] if scope == "image" else [
            [i for i in candidates if crops_of[image][i] == c] for c in crops]
        kept = [i for i in range(counts[image]) if newlines[image][i]]
        for group in groups:
            kept += [group[k] for k in pick(image, group, min(tokens, len(group)))]
        expected[row] += [offset + i for i in sorted(kept)]
    return expected


def _crops_of(fam, inputs) -> list[list[int]]:
    """Each image's token -> crop (NeXT: from the explicit order)."""
    _, crops = crop_batch(fam.model, inputs)
    out = []
    side = fam.model.config.vision_config.image_size // fam.model.config.vision_config.patch_size
    for image, count in enumerate(crops):
        height, width = inputs["image_sizes"][image].tolist()
        out.append([-1 if s < 0 else s // (side * side) for s in next_order(fam.model.config, height, width, count)])
    return out


def _kept_rows(handle) -> list[list[int]]:
    return [[i for i in row if i >= 0] for row in handle.kept[0].tolist()]


@pytest.mark.parametrize("scope", ["image", "crop"])
def test_vispruner_on_next_equals_plain_per_image_reference(scope):
    fam = family("llava_next")
    inputs = fam.inputs()
    tokens, ratio = (9, 0.5) if scope == "image" else (3, 0.34)
    references = eager_signals(fam, inputs)

    def pick(image, candidates, count):
        attention = references[image]["cls_attention"][candidates].tolist()
        features = references[image]["patch_features"][candidates]
        return reference_vispruner(attention, features, count, ratio)

    with finepruner.apply(fam.model, "vispruner", tokens=tokens, important_ratio=ratio, budget_scope=scope) as handle:
        fam.generate(inputs)
    assert _kept_rows(handle) == _expected_kept(fam, inputs, pick, scope, tokens)


@pytest.mark.parametrize("scope", ["image", "crop"])
def test_cdpruner_on_next_equals_plain_per_image_reference(clip, scope):
    """CLIP rule (negative sign, min-max over the image's non-newline tokens, all crops jointly), S on the
    projected tokens, one DPP per image (per crop)."""
    fam = family("llava_next")
    inputs = fam.inputs()
    tokens = 7 if scope == "image" else 2
    references = eager_signals(fam, inputs)
    features = image_features(fam, inputs)
    newlines = newlines_of(fam, inputs)
    texts = ["what color is the circle?", "how many red objects?", "which one is on the left?", "sky"]
    images_rows = [r for r, images in enumerate(IMAGES) for _ in images]
    relevance = []
    for image, row in enumerate(images_rows):
        with torch.no_grad():
            e = references[image]["post_layernorm_features"].float() @ clip.visual_projection.weight.T
        e = e / e.norm(dim=-1, keepdim=True)
        t = reference_text_embeds(clip, texts[row])
        t = t / t.norm(dim=-1, keepdim=True)
        rel = (-(e @ t.T)).mean(dim=-1)
        valid = rel[~newlines[image]]
        relevance.append((rel - valid.min() + 1e-6) / (valid.max() - valid.min()))

    def pick(image, candidates, count):
        x = features[image][candidates]
        x = (x / x.norm(dim=-1, keepdim=True)).float()
        r = relevance[image][candidates]
        return reference_dpp(r[:, None] * (x @ x.T) * r[None, :], count)

    with finepruner.apply(fam.model, "cdpruner", tokens=tokens, clip_text=clip, budget_scope=scope) as handle:
        handle.set_instructions(texts)
        fam.generate(inputs)
    assert _kept_rows(handle) == _expected_kept(fam, inputs, pick, scope, tokens)


def test_cdpruner_on_onevision_uses_the_language_models_embeddings():
    """The Qwen/OneVision rule (spec §5.2): r_i = mean_j cos(x_i, t_j) over the instruction's input
    embeddings, sign +1, min-max per image; kernel on the projected tokens."""
    fam = family("onevision_shrunk")
    inputs = fam.inputs([0, 1])
    features = image_features(fam, inputs)
    newlines = newlines_of(fam, inputs)
    texts = ["what color is the circle?", "how many red objects?"]
    embed = fam.model.model.get_input_embeddings()
    tokens = 6
    expected = []
    for image, text in enumerate(texts):
        with torch.no_grad():
            t = embed(torch.tensor(fam.tokenizer(text, add_special_tokens=False)["input_ids"])).float()
        x = features[image].float()
        cand = (~newlines[image]).nonzero()[:, 0]
        xn = x[cand] / x[cand].norm(dim=-1, keepdim=True)
        rel = (xn @ (t / t.norm(dim=-1, keepdim=True)).T).mean(dim=-1)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
        picks = reference_dpp(rel[:, None] * (xn @ xn.T) * rel[None, :], tokens)
        expected.append(sorted(newlines[image].nonzero()[:, 0].tolist() + cand[picks].tolist()))
    with finepruner.apply(fam.model, "cdpruner", tokens=tokens, processor=fam.tokenizer) as handle:
        handle.set_instructions(texts)
        fam.generate(inputs)
    assert _kept_rows(handle) == expected
    assert handle.method.describe()["relevance"] == "auto"


# -- batch invariance ---------------------------------------------------------------------------------------
def _configs(name: str, clip) -> list[tuple[str, dict]]:
    """Both methods and both scopes on NeXT; on OneVision (shrunk or not) the two methods, one scope each."""
    if name == "llava_next":
        return [("vispruner", {"tokens": 5}), ("vispruner", {"tokens": 2, "budget_scope": "crop"}),
                ("cdpruner", {"tokens": 5, "clip_text": clip}),
                ("cdpruner", {"tokens": 2, "budget_scope": "crop", "clip_text": clip})]
    if name == "llava_onevision":
        return [("vispruner", {"tokens": 5}), ("cdpruner", {"tokens": 2, "budget_scope": "crop"})]
    return [("vispruner", {"tokens": 2, "budget_scope": "crop"}), ("cdpruner", {"tokens": 5})]


def assert_batch_equals_each_sample_alone(fam: Family, method: str, atol: float = 1e-4, **params) -> None:
    """``fam.inputs()`` (rows of different images, a two-image row, a text-only row; left-padded) under
    ``method``: each row's generation equals the sample alone within ``atol``, its kept set (stage 0)
    equals the sample's alone with padding slots (-1) after it, and the text-only row keeps nothing."""
    inputs = fam.inputs()
    with finepruner.apply(fam.model, method, **params) as handle:
        together = fam.generate(inputs)
        kept = handle.kept[0].clone()
        for row in range(len(PROMPTS)):
            alone = fam.generate(fam.inputs([row]))
            assert_row_equals_alone(alone, together, row, atol=atol)
            if row < 3:
                width = handle.kept[0].shape[1]
                assert torch.equal(kept[row, :width], handle.kept[0][0]), (method, params, row)
                assert bool((kept[row, width:] == -1).all())
    assert bool((kept[3] == -1).all())


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_of_different_images_equals_each_sample_alone(name, clip):
    """Rows of different images (counts), a two-image row and a text-only row, left-padded: each row's
    logits and kept set equal the sample alone (1e-5), for every newly supported configuration."""
    fam = family(name)
    inputs = fam.inputs()
    assert len(set(visual_token_counts(fam.model, inputs))) >= 2
    for method, params in _configs(name, clip):
        with finepruner.apply(fam.model, method, processor=fam.processor, **params) as handle:
            together = fam.generate(inputs)
            kept = handle.kept[0].clone()
            texts = handle.instructions
            for row in range(len(PROMPTS)):
                if method == "cdpruner" and row == 3:  # a text-only prompt has no <image> to decode it from
                    handle.set_instructions([texts[row]])
                alone = fam.generate(fam.inputs([row]))
                assert_row_equals_alone(alone, together, row, atol=1e-5)
                if row < 3:
                    width = handle.kept[0].shape[1]
                    assert torch.equal(kept[row, :width], handle.kept[0][0]), (method, params, row)
                    assert bool((kept[row, width:] == -1).all())
                    if method == "cdpruner":
                        assert handle.instructions == [texts[row]]
            assert bool((kept[3] == -1).all())


def test_budget_counts_per_image_with_newlines_on_top():
    fam = family("llava_next")
    inputs = fam.inputs()
    newlines = [int(n.sum()) for n in newlines_of(fam, inputs)]  # [6, 8, 4, 6]
    with finepruner.apply(fam.model, "vispruner", tokens=5) as handle, torch.no_grad():
        fam.model(**inputs)
    assert (handle.kept[0] >= 0).sum(dim=1).tolist() == [5 + newlines[0], 5 + newlines[1],
                                                          10 + newlines[2] + newlines[3], 0]
    with finepruner.apply(fam.model, "vispruner", tokens=3, budget_scope="crop") as handle, torch.no_grad():
        fam.model(**fam.inputs([0]))
    crops = crop_batch(fam.model, fam.inputs([0]))[1][0]
    assert handle.kept[0].shape[1] == 3 * crops + newlines[0]  # every crop of this image keeps >= 3 tokens


def test_generate_without_cache_and_beams():
    fam = family("llava_next")
    inputs = fam.inputs([0, 1])
    with finepruner.apply(fam.model, "vispruner", tokens=5) as handle:
        cached = fam.generate(inputs)
        kept = handle.kept[0].clone()
        with torch.no_grad():
            uncached = fam.model.generate(**inputs, **GENERATE, use_cache=False)
        assert torch.equal(cached.sequences, uncached.sequences)
        with torch.no_grad():
            fam.model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
        assert torch.equal(handle.kept[0], kept.repeat_interleave(2, dim=0))


# -- refusals and clean removal -----------------------------------------------------------------------------
def test_errors_name_the_reason(clip):
    ov = family("llava_onevision")
    with pytest.raises(ValueError, match=r"relevance='clip' needs a CLIP vision tower.*no \[CLS\]"):
        finepruner.apply(ov.model, "cdpruner", tokens=4, relevance="clip", clip_text=clip)
    llava, _ = build_tiny_llava(seed=0)
    with pytest.raises(ValueError, match="relevance='llm' is available on LLaVA-NeXT and OneVision"):
        finepruner.apply(llava, "cdpruner", tokens=4, relevance="llm", clip_text=clip)
    for method in ("vispruner", "cdpruner"):
        with pytest.raises(ValueError, match="budget_scope='pixel'"):
            finepruner.methods.create(method, budget_scope="pixel")
    fam = family("llava_next")
    with finepruner.apply(fam.model, "vispruner", tokens=66) as handle, pytest.raises(
            ValueError, match="tokens=66 is not allowed for an image of 64 tokens besides its 6 newline tokens"):
        handle.model(**fam.inputs([0]))  # 70 tokens, 6 of them newlines
    with pytest.raises(ValueError, match="relevance_sign"):
        finepruner.methods.create("cdpruner", relevance_sign=2)


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_other_tower_signal_methods_are_still_refused_naming_the_family(name):
    fam = family(name)
    supported = fam.adapter.vision_signals_supported()
    assert {"cls_attention", "patch_features", "post_layernorm_features", "projected_features"} <= supported
    assert supported <= set(VISION_SIGNALS)
    refused = [m for m in available() if not set(method_class(m).needs_vision) <= supported]
    expected = {"prumerge", "prumerge_plus", "visionzip"} if name == "llava_onevision" else set()
    assert expected <= set(refused)
    for method in refused:
        with pytest.raises(ValueError, match=name):
            finepruner.apply(fam.model, method, tokens=8)


def test_remove_restores_the_model():
    fam = family("llava_onevision")
    inner = fam.model.model
    before = {name: len(module._forward_hooks) + len(module._forward_pre_hooks)
              for name, module in fam.model.named_modules()}
    with finepruner.apply(fam.model, "vispruner", tokens=4):
        assert "get_image_features" in vars(inner)
    assert "get_image_features" not in vars(inner)
    after = {name: len(module._forward_hooks) + len(module._forward_pre_hooks)
             for name, module in fam.model.named_modules()}
    assert before == after
    assert math.isfinite(float(fam.generate(fam.inputs([0])).scores[0].max()))


@pytest.mark.parametrize("method", ["vispruner", "cdpruner"])
def test_llava15_crop_scope_selects_per_image(tiny, clip, method):
    """LLaVA-1.5 (one budget per sample): ``budget_scope="crop"`` gives each image of a two-image sample its
    own T tokens, the same as that image alone; the default is unchanged (one selection per sample)."""
    model, processor = tiny
    first, second = noise_images(2, seed=5)
    text = "what color is the circle ?"
    params = {"clip_text": clip} if method == "cdpruner" else {}
    two = processor(images=[first, second], text=[f"USER: <image> <image> {text} ASSISTANT:"], return_tensors="pt")
    with finepruner.apply(model, method, tokens=6, budget_scope="crop", **params) as handle:
        handle.set_instructions([text])
        with torch.no_grad():
            model(**two)
        kept = handle.kept[0][0].tolist()
        alone = []
        for image in (first, second):
            handle.set_instructions([text])
            with torch.no_grad():
                model(**processor(images=[image], text=[f"USER: <image> {text} ASSISTANT:"], return_tensors="pt"))
            alone.append(handle.kept[0][0].tolist())
    assert len(kept) == 12
    if method == "vispruner":  # CDPruner's relevance min-max spans the sample (both images), as the official code
        assert kept == alone[0] + [NUM_VISUAL + i for i in alone[1]]
    else:
        assert all(i < NUM_VISUAL for i in kept[:6]) and all(i >= NUM_VISUAL for i in kept[6:])
    with finepruner.apply(model, method, tokens=6, **params) as handle:
        handle.set_instructions([text])
        with torch.no_grad():
            model(**two)
        assert handle.kept[0].shape == (1, 6)
