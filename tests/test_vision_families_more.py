"""VisionZip and HiPrune on LLaVA-NeXT (per image or per crop, newline tokens kept on top), against plain
references; the refusals on OneVision (VisionZip, PruMerge; PruMerge on NeXT: ``tests/test_prumerge_next.py``).

The tower's per-crop signals (the feature layer's [CLS] row summed over heads, its head-mean keys, each
crop's [CLS] vector; the attention each patch receives at an encoder layer) are mapped to each image's token
order by the adapter's ``image_layouts`` (``spec/models.md`` §1.1, §4); the references below read them from
an eager tower run on all crops, packed by the explicit LLaVA-NeXT order of ``tests/test_vision_families.py``,
and select with plain loops (``methods_more.md`` §1.2, §4.1).
"""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.visionzip import split_budget
from tests.conftest import SelectionRecorder, assert_row_equals_alone
from tests.test_vision_families import (
    LAYOUT_IMAGES,
    PROMPTS,
    assert_batch_equals_each_sample_alone,
    crop_batch,
    crop_parts,
    family,
    newlines_of,
    next_order,
    pack_reference,
)


def eager_visionzip_signals(fam, inputs) -> list[dict[str, torch.Tensor]]:
    """Per image, in its token order: the [CLS] row of layer -2's attention summed over heads, the head-mean
    keys of that layer (``k_proj`` of ``layer_norm1`` of its input), its output's patch rows, its crop (-1 at
    newlines); and per crop its output's [CLS] vector, from an eager tower run on all the call's crops."""
    model = fam.eager
    pixels, crops = crop_batch(model, inputs)
    layers = model.model.vision_tower.encoder.layers
    index = len(layers) - 2
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        scores = out.attentions[-2][:, :, 0, 1:].sum(dim=1)
        layer = layers[index]
        raw = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index]))[:, 1:]
        keys = raw.view(*raw.shape[:2], layer.self_attn.num_heads, -1).mean(dim=2)
        hidden = out.hidden_states[-2]
    patches = scores.shape[1]
    images = []
    for image, count, part in crop_parts(crops):
        crop = torch.arange(count)[:, None].expand(count, patches).float()[..., None]
        images.append({
            "scores": pack_reference(fam, image, scores[part], inputs),
            "keys": pack_reference(fam, image, keys[part], inputs),
            "features": pack_reference(fam, image, hidden[part, 1:], inputs),
            "crop": pack_reference(fam, image, crop, inputs)[:, 0].long(),
            "cls": hidden[part, 0],
        })
    return images


def reference_visionzip(signals, newline: torch.Tensor, tokens: int, scope: str, cls_token: bool = True):
    """One image's VisionZip on NeXT, plainly: the units are the image's non-newline tokens (``"image"``) or
    each crop's (``"crop"``); per unit ``(dominant, contextual) = split_budget(tokens)`` (per crop capped to
    its patches), the top ``dominant - cls_token`` scores kept (first index on ties), the rest merged into
    contextual tokens (targets at a stride of the remaining list, members by the largest key cosine,
    ``H[t] + mean(H[members])``). Returns the kept ids (newlines + dominant patches, sorted) and the
    pre-projector inserted rows: every unit's [CLS] (the base crop's per image), then every unit's
    contextual tokens."""
    count = newline.shape[0]
    candidates = [i for i in range(count) if not newline[i]]
    if scope == "image":
        units = [(0, candidates)]
    else:
        crops = sorted({int(signals["crop"][i]) for i in candidates})
        units = [(c, [i for i in candidates if int(signals["crop"][i]) == c]) for c in crops]
    kept = [i for i in range(count) if newline[i]]
    heads, contexts = [], []
    features = signals["features"].double()
    for crop, members in units:
        dominant, contextual = split_budget(tokens)
        patches = dominant - int(cls_token)
        if scope == "crop":
            patches = min(patches, len(members))
            contextual = min(contextual, len(members) - patches)
        order = sorted(members, key=lambda i: (-float(signals["scores"][i]), i))
        top = sorted(order[:patches])
        kept += top
        if cls_token:
            heads.append(signals["cls"][crop].double())
        remaining = [i for i in members if i not in top]
        if not contextual:
            continue
        step = max(1, len(remaining) // contextual)
        targets = [remaining[p * step] for p in range(contextual)]
        groups: dict[int, list[int]] = {t: [] for t in targets}
        for r in remaining:
            if r in targets:
                continue
            sims = [torch.nn.functional.cosine_similarity(signals["keys"][r], signals["keys"][t], dim=0).item()
                    for t in targets]
            groups[targets[sims.index(max(sims))]].append(r)
        for t in targets:
            merged = features[t].clone()
            if groups[t]:
                merged += sum(features[m] for m in groups[t]) / len(groups[t])
            contexts.append(merged)
    rows = heads + contexts
    return sorted(kept), (torch.stack(rows).float() if rows else None)


@pytest.mark.parametrize(("scope", "tokens", "cls_token"),
                         [("image", 9, True), ("image", 13, False), ("crop", 7, True), ("crop", 40, True)])
def test_visionzip_on_next_equals_plain_per_unit_reference(scope, tokens, cls_token):
    """Kept ids and inserted tokens (through the projector) equal the plain reference, for images of several
    layouts (unpadded rows or columns, a square one, one crop); ``tokens=40`` per crop exceeds the patches
    unpadding leaves some crops (they keep all their patches)."""
    fam = family("llava_next")
    method = finepruner.methods.create("visionzip", tokens=tokens, budget_scope=scope, cls_token=cls_token)
    record = SelectionRecorder(method)
    projector = fam.model.model.multi_modal_projector
    with finepruner.apply(fam.model, method) as handle:
        for image in LAYOUT_IMAGES:
            inputs = fam.build(["USER: <image>\nwhat is it ? ASSISTANT:"], [[image]])
            signals = eager_visionzip_signals(fam, inputs)[0]
            newline = newlines_of(fam, inputs)[0]
            kept, rows = reference_visionzip(signals, newline, tokens, scope, cls_token)
            with torch.no_grad():
                fam.model(**inputs)
            answer = record.answers[-1]
            assert answer.keep[0].tolist() == kept
            assert [i for i in handle.kept[0][0].tolist() if i >= 0] == kept
            if rows is None:
                assert answer.insert is None
                continue
            with torch.no_grad():
                expected = projector(rows)
            assert answer.insert.shape[1:] == expected.shape
            assert torch.allclose(answer.insert[0].float(), expected, atol=2e-5, rtol=1e-4)
            assert handle.merged[0].shape == (1, rows.shape[0])


@pytest.mark.parametrize("params", [{"tokens": 6}, {"tokens": 3, "budget_scope": "crop"},
                                    {"tokens": 7, "cls_token": False, "positions": "original"}])
def test_visionzip_padded_batch_of_different_images_equals_each_sample_alone(params):
    """Rows of different image sizes (counts), a two-image row and a text-only row, left-padded: each row's
    scores within 1e-4 and its kept and merged ids equal the sample alone."""
    fam = family("llava_next")
    inputs = fam.inputs()
    with finepruner.apply(fam.model, "visionzip", **params) as handle:
        together = fam.generate(inputs)
        kept, merged = handle.kept[0].clone(), handle.merged[0].clone()
        for row in range(len(PROMPTS)):
            alone = fam.generate(fam.inputs([row]))
            assert_row_equals_alone(alone, together, row, atol=1e-4)
            if row < 3:
                width = handle.kept[0].shape[1]
                assert torch.equal(kept[row, :width], handle.kept[0][0]), (params, row)
                assert bool((kept[row, width:] == -1).all())
                count = handle.merged[0].shape[1]
                assert int((merged[row] >= 0).sum()) == count
    assert bool((kept[3] == -1).all())


def test_visionzip_budget_counts_per_image_with_newlines_on_top():
    fam = family("llava_next")
    inputs = fam.inputs()
    newlines = [int(n.sum()) for n in newlines_of(fam, inputs)]
    with finepruner.apply(fam.model, "visionzip", tokens=8) as handle, torch.no_grad():
        fam.model(**inputs)
    dominant, contextual = split_budget(8)  # 7 + 1: [CLS] + 6 patches kept, [CLS] + 1 contextual inserted
    assert (handle.kept[0] >= 0).sum(dim=1).tolist() == [
        dominant - 1 + newlines[0], dominant - 1 + newlines[1], 2 * (dominant - 1) + newlines[2] + newlines[3], 0]
    assert (handle.merged[0] >= 0).sum(dim=1).tolist() == [1 + contextual, 1 + contextual, 2 * (1 + contextual), 0]


def test_visionzip_errors_on_next():
    fam = family("llava_next")
    with finepruner.apply(fam.model, "visionzip", tokens=80) as handle, pytest.raises(
            ValueError, match="tokens=80 is not allowed"):
        handle.model(**fam.inputs([0]))  # 64 patches + 6 newlines
    with pytest.raises(ValueError, match="budget_scope='pixel'"):
        finepruner.methods.create("visionzip", budget_scope="pixel")


# -- HiPrune ------------------------------------------------------------------------------------------------
def eager_received(fam, inputs, layers: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Per image, in its token order: the attention each patch receives at the two encoder layers (eager, mean
    over heads and all queries, [CLS] column dropped), and each token's crop and patch (-1 at newlines), from
    the explicit LLaVA-NeXT order."""
    model = fam.eager
    pixels, crops = crop_batch(model, inputs)
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True)
    received = [out.attentions[layer].mean(dim=(1, 2))[:, 1:] for layer in layers]
    patches = received[0].shape[1]
    images = []
    for image, count, part in crop_parts(crops):
        height, width = inputs["image_sizes"][image].tolist()
        order = next_order(model.config, height, width, count)
        images.append({
            "object": pack_reference(fam, image, received[0][part], inputs),
            "deep": pack_reference(fam, image, received[1][part], inputs),
            "crop": [-1 if s < 0 else s // patches for s in order],
            "patch": [-1 if s < 0 else s % patches for s in order],
        })
    return images


def reference_hiprune(signals, tokens: int, alpha: float, scope: str, side: int, wrap: str) -> list[int]:
    """One image's HiPrune on NeXT, plainly: per unit (the image's non-newline tokens, or each crop's) of N'
    tokens (per crop: at most its patches), ``round(N' alpha / 5)`` anchors by object-layer score, buffers at
    patch +-1 and +-side of the anchor's crop grid (clamped to the crop, or dropped across edges with
    ``"grid"``) where that patch is a token, registers by deep-layer score; newline tokens kept."""
    crops, patch = signals["crop"], signals["patch"]
    candidates = [i for i in range(len(crops)) if crops[i] >= 0]
    token_of = {(crops[i], patch[i]): i for i in candidates}
    units = [candidates] if scope == "image" else [
        [i for i in candidates if crops[i] == c] for c in sorted({crops[i] for i in candidates})]
    kept = {i for i in range(len(crops)) if crops[i] < 0}
    for members in units:
        count = tokens if scope == "image" else min(tokens, len(members))
        anchors = sorted(members, key=lambda i: (-float(signals["object"][i]), i))[:round(count * alpha / 5)]
        chosen = set(anchors)
        for a in anchors:
            p, column = patch[a], patch[a] % side
            for step in (-1, 1, -side, side):
                q = p + step
                if wrap == "grid" and (not 0 <= q < side * side or (step == -1 and column == 0)
                                       or (step == 1 and column == side - 1)):
                    continue
                q = min(max(q, 0), side * side - 1)
                if (crops[a], q) in token_of:
                    chosen.add(token_of[(crops[a], q)])
        rest = sorted((i for i in members if i not in chosen), key=lambda i: (-float(signals["deep"][i]), i))
        chosen |= set(rest[:count - len(chosen)])
        kept |= chosen
    return sorted(kept)


@pytest.mark.parametrize(("scope", "tokens", "alpha", "wrap"),
                         [("image", 10, 1.0, "official"), ("image", 12, 0.45, "grid"),
                          ("crop", 5, 1.0, "official"), ("crop", 10, 0.5, "grid")])
def test_hiprune_on_next_equals_plain_per_unit_reference(scope, tokens, alpha, wrap):
    fam = family("llava_next")
    config = fam.model.config.vision_config
    side = config.image_size // config.patch_size
    method = finepruner.methods.create("hiprune", tokens=tokens, alpha=alpha, wrap=wrap, budget_scope=scope,
                                       object_layer=1)
    with finepruner.apply(fam.model, method) as handle:
        layers = method._layers
        for image in LAYOUT_IMAGES:
            inputs = fam.build(["USER: <image>\nwhat is it ? ASSISTANT:"], [[image]])
            signals = eager_received(fam, inputs, layers)[0]
            with torch.no_grad():
                fam.model(**inputs)
            assert [i for i in handle.kept[0][0].tolist() if i >= 0] == reference_hiprune(
                signals, tokens, alpha, scope, side, wrap)


@pytest.mark.parametrize("params", [{"tokens": 10, "alpha": 1.0}, {"tokens": 5, "budget_scope": "crop",
                                                                    "wrap": "grid", "alpha": 1.0}])
def test_hiprune_padded_batch_of_different_images_equals_each_sample_alone(params):
    assert_batch_equals_each_sample_alone(family("llava_next"), "hiprune", **params)


@pytest.mark.parametrize("method", ["visionzip", "prumerge", "prumerge_plus"])
def test_onevision_refusals_say_why(method):
    """OneVision (SigLIP): no [CLS] row for VisionZip's and PruMerge's signals (VisionZip's [CLS]-free port
    reads keys that are not mapped there); the message names the family and the reason. HiPrune runs there
    (``tests/test_cls_free_ports.py``)."""
    fam = family("llava_onevision")
    with pytest.raises(ValueError, match=r"llava_onevision \(SigLIP has no \[CLS\] token"):
        finepruner.apply(fam.model, method, tokens=8)


@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
def test_next_runs_prumerge_per_crop_signals(method):
    """PruMerge(+) runs on LLaVA-NeXT now (its per-crop last-layer signals are mapped through the packing);
    the references are in ``tests/test_prumerge_next.py``."""
    fam = family("llava_next")
    assert {"last_layer_attention", "last_layer_keys"} <= fam.adapter.vision_signals_supported()
    with finepruner.apply(fam.model, method, tokens=8) as handle, torch.no_grad():
        fam.model(**fam.inputs([0]))
    assert handle.merged[0].shape[1] >= 8
