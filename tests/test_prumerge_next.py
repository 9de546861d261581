"""PruMerge and PruMerge+ on LLaVA-NeXT (per image or per crop, newline tokens kept on top), against a plain
reference written from the spec (``methods_more.md`` §5.1, §5.3; ``docs/methods/prumerge.md``, "LLaVA-NeXT").

The reference computes each crop's last-layer merged-head [CLS] row and keys by hand from an eager tower run
on all crops (``softmax(q_0 k^T / sqrt(Dv))`` of layer -1's ``q_proj``/``k_proj`` on ``layer_norm1`` of its
input), maps them to the image's token order with the explicit LLaVA-NeXT order (base crop, unpadded tile rows,
a newline after each row; ``tests/test_vision_families.py``), and applies the rule with plain loops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import finepruner
from tests.conftest import SelectionRecorder
from tests.test_vision_families import (
    LAYOUT_IMAGES,
    assert_batch_equals_each_sample_alone,
    crop_batch,
    crop_parts,
    family,
    newlines_of,
    next_order,
    pack_reference,
)

PROMPT = "USER: <image>\nwhat is it ? ASSISTANT:"


def eager_prumerge_signals(fam, inputs) -> list[dict]:
    """Per image, in its token order: the last layer's merged-head [CLS] attention over the patches, its
    ``k_proj`` patch keys, the pre-projector patch features (layer -2's output), each token's crop (-1 at
    newlines)."""
    model = fam.eager
    pixels, crops = crop_batch(model, inputs)
    last = model.model.vision_tower.encoder.layers[-1]
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True)
        hidden = last.layer_norm1(out.hidden_states[-2])
        query = last.self_attn.q_proj(hidden[:, :1]).double()
        keys = last.self_attn.k_proj(hidden).double()
        width = hidden.shape[-1]
        attention = ((query @ keys.transpose(1, 2)) / width**0.5).softmax(dim=-1)[:, 0, 1:]
        features = out.hidden_states[-2][:, 1:]
    patches = attention.shape[1]
    images = []
    for image, count, part in crop_parts(crops):
        height, width = inputs["image_sizes"][image].tolist()
        order = next_order(model.config, height, width, count)
        images.append({
            "a": pack_reference(fam, image, attention[part], inputs).tolist(),
            "keys": pack_reference(fam, image, keys[part, 1:], inputs),
            "features": pack_reference(fam, image, features[part].double(), inputs),
            "crop": [-1 if source < 0 else source // patches for source in order],
        })
    return images


def official_complement(index: list[int], num: int) -> list[int]:
    """``complement_idx``: ``sorted(arange(num) with index set to 0)[len(index):]``."""
    masked = list(range(num))
    for i in index:
        masked[i] = 0
    return sorted(masked)[len(index):]


def reference_entries(a: list[float], plus: bool, tokens, ratio, crops: int, scope: str, dedup: bool) -> list[int]:
    """Kept entries (positions into the unit's U tokens) of one unit."""
    count = len(a)
    order = sorted(range(count), key=lambda p: (-a[p], p))
    if tokens is None and ratio is None:  # adaptive: IQR outliers (numpy's linear percentiles)
        q1, q3 = np.percentile(np.array(a), [25, 75])
        share = sum(v > q3 + 1.5 * (q3 - q1) for v in a) / count
        top = order[:int(count * share)]
        if not plus:
            return top
        step = int(1 / share) if share > 0 else count
        return top + [g for g in range(0, count - 1, max(1, int(step / 3))) if g not in top]
    if tokens is not None and not plus:
        return order[:max(0, tokens - crops)]
    r = min(1.0, tokens / (2 * count)) if tokens is not None else ratio
    top = order[:int(count * r)]
    if not plus:
        return top
    step = int(1 / r)
    grid = list(range(int(step / 2), count - 1, step))
    return top + ([g for g in grid if g not in top] if dedup else grid)


def reference_prumerge(sig: dict, plus: bool, scope: str, tokens=None, ratio=None, dedup: bool = False,
                       neighbours: int = 32) -> tuple[list[int], list[int], torch.Tensor]:
    """One image's PruMerge(+) on NeXT, plainly: newline ids kept; per unit (the image, or each crop) the kept
    entries by the rule; each entry merges its ``neighbours`` most key-similar tokens of its own crop (the crop's
    other entries in output order, then the official complement) with weights a; one extra token per crop.
    Returns (newline ids, inserted origins, pre-projector inserted rows)."""
    crop, a = sig["crop"], sig["a"]
    tokens_of = [i for i in range(len(crop)) if crop[i] >= 0]
    crop_ids = sorted({crop[i] for i in tokens_of})
    units = [tokens_of] if scope == "image" else [[i for i in tokens_of if crop[i] == c] for c in crop_ids]
    feats, keys = sig["features"], torch.nn.functional.normalize(sig["keys"], dim=-1)
    origins, rows = [], []
    for members in units:
        unit_crops = sorted({crop[i] for i in members})
        entries = reference_entries([a[i] for i in members], plus, tokens, ratio, len(unit_crops), scope, dedup)
        kept = [members[p] for p in entries]
        merged = {}
        extras = []
        for c in unit_crops:
            own = [i for i in members if crop[i] == c]
            mine = [k for k, t in enumerate(kept) if crop[t] == c]  # positions in the unit's output
            local = [own.index(kept[k]) for k in mine]
            pool = local + official_complement(local, len(own))
            for slot, k in enumerate(mine):
                t = kept[k]
                others = [j for j in range(len(pool)) if j != slot]
                sims = {j: float(keys[t] @ keys[own[pool[j]]]) for j in others}
                chosen = sorted(others, key=lambda j: (-sims[j], j))[:neighbours]
                merged[k] = feats[t] + sum(a[own[pool[j]]] * feats[own[pool[j]]] for j in chosen)
            rest = official_complement(local, len(own))
            extras.append((own[0], sum(a[own[j]] * feats[own[j]] for j in rest) if rest else feats[0] * 0))
        origins += kept + [o for o, _ in extras]
        rows += [merged[k] for k in range(len(kept))] + [v for _, v in extras]
    lines = [i for i in range(len(crop)) if crop[i] < 0]
    return lines, origins, torch.stack(rows).float()


CASES = [
    ("prumerge", {"tokens": 9}),
    ("prumerge", {"tokens": 5, "budget_scope": "crop"}),
    ("prumerge", {"budget_scope": "crop", "neighbours": 3}),
    ("prumerge", {}),
    ("prumerge_plus", {"tokens": 16}),
    ("prumerge_plus", {"tokens": 12, "budget_scope": "crop"}),
    ("prumerge_plus", {"tokens": 40, "budget_scope": "crop"}),  # r capped at 1 (16-patch crops): every token twice
    ("prumerge_plus", {"ratio": 0.2, "dedup": True, "budget_scope": "crop"}),
    ("prumerge_plus", {}),
    ("prumerge_plus", {"budget_scope": "crop"}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_prumerge_on_next_equals_plain_per_unit_reference(name, params):
    """Kept (newline) ids, inserted origins and tokens (through the projector) equal the plain reference for
    images of several layouts (unpadded rows or columns, a square one, one crop)."""
    fam = family("llava_next")
    method = finepruner.methods.create(name, **params)
    record = SelectionRecorder(method)
    projector = fam.model.model.multi_modal_projector
    reference = {k: v for k, v in params.items() if k in ("tokens", "ratio", "dedup", "neighbours")}
    with finepruner.apply(fam.model, method) as handle:
        for image in LAYOUT_IMAGES:
            inputs = fam.build([PROMPT], [[image]])
            sig = eager_prumerge_signals(fam, inputs)[0]
            lines, origins, rows = reference_prumerge(sig, name == "prumerge_plus",
                                                      params.get("budget_scope", "image"), **reference)
            assert lines == newlines_of(fam, inputs)[0].nonzero()[:, 0].tolist()
            with torch.no_grad():
                fam.model(**inputs)
            answer = record.answers[-1]
            assert answer.keep[0].tolist() == lines
            assert answer.insert_from[0].tolist() == origins, (name, params, image.size)
            with torch.no_grad():
                expected = projector(rows)
            assert answer.insert.shape[1:] == expected.shape
            assert torch.allclose(answer.insert[0].float(), expected, atol=2e-5, rtol=1e-4)
            assert handle.merged[0].shape == (1, rows.shape[0])


@pytest.mark.parametrize(("name", "params"), [("prumerge", {"tokens": 9}),
                                              ("prumerge_plus", {"tokens": 6, "budget_scope": "crop"}),
                                              ("prumerge_plus", {"positions": "original"}),
                                              ("prumerge", {"budget_scope": "crop"})])
def test_prumerge_padded_batch_of_different_images_equals_each_sample_alone(name, params):
    """Rows of different image sizes (counts), a two-image row and a text-only row, left-padded: each row's
    scores within 1e-4 of the sample alone, its kept set the sample's alone."""
    assert_batch_equals_each_sample_alone(family("llava_next"), name, **params)


def test_prumerge_budget_counts_per_image_and_per_crop():
    """``tokens=N`` per image: N - C top tokens + C extra tokens; per crop: N - 1 + 1 per crop; newlines on top."""
    fam = family("llava_next")
    inputs = fam.build([PROMPT], [[LAYOUT_IMAGES[2]]])
    crops = len(set(eager_prumerge_signals(fam, inputs)[0]["crop"]) - {-1})
    lines = int(newlines_of(fam, inputs)[0].sum())
    with finepruner.apply(fam.model, "prumerge", tokens=9) as handle, torch.no_grad():
        fam.model(**inputs)
    assert int((handle.kept[0] >= 0).sum()) == lines
    assert handle.merged[0].shape[1] == 9
    with finepruner.apply(fam.model, "prumerge", tokens=9, budget_scope="crop") as handle, torch.no_grad():
        fam.model(**inputs)
    assert handle.merged[0].shape[1] == 9 * crops


def test_prumerge_errors_on_next():
    fam = family("llava_next")
    inputs = fam.build([PROMPT], [[LAYOUT_IMAGES[0]]])
    with finepruner.apply(fam.model, "prumerge", tokens=80) as handle, pytest.raises(
            ValueError, match="tokens=80 is not allowed for an image of 64 tokens"):
        handle.model(**inputs)
    with finepruner.apply(fam.model, "prumerge", tokens=1) as handle, pytest.raises(
            ValueError, match="one extra token per crop"):
        handle.model(**inputs)
    with finepruner.apply(fam.model, "prumerge_plus", tokens=150) as handle, pytest.raises(
            ValueError, match="2U: r = N / 2U"):
        handle.model(**inputs)
    with pytest.raises(ValueError, match="budget_scope='pixel'"):
        finepruner.methods.create("prumerge", budget_scope="pixel")


def test_prumerge_plus_per_crop_on_the_paper_layout():
    """``layout="paper2880"`` (no unpadding, no newline): ``tokens=8`` per crop of 16 patches is the fixed branch
    with r = 1/4, 4 top + 4 grid + 1 extra per crop, 5 crops, nothing kept in place."""
    from finepruner.models.adapters import adapter_for
    from finepruner.models.tiny_families import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0)
    adapter_for(model).set_layout(processor, "paper2880")
    inputs = processor(images=LAYOUT_IMAGES[:3], text=[PROMPT] * 3, return_tensors="pt", padding=True)
    with finepruner.apply(model.eval(), "prumerge_plus", tokens=8, budget_scope="crop") as handle, torch.no_grad():
        out = model(**inputs)
    assert handle.merged[0].shape == (3, 5 * 9) and handle.kept[0].shape == (3, 0)
    assert torch.isfinite(out.logits).all()
