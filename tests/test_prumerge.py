"""PruMerge / PruMerge+: merged token values against a plain reference of the spec (``methods_more.md`` §5.1,
§5.3), budgets, batches with per-sample counts, errors. Every kept token is a merged one, so no parameter
choice is the identity (no keep-all test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import finepruner
from finepruner.methods.prumerge import complement
from tests.conftest import (
    NUM_VISUAL,
    PROMPTS,
    assert_row_equals_alone,
    generate,
    logits_with_visual_tokens,
    noise_images,
    single,
)


def last_layer(model, pixel_values):
    """Patch features, the merged-head [CLS] attention and the keys of the last CLIP layer, from a plain
    transformers run of the vision tower (float64 lists/tensors)."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
        layer = model.model.vision_tower.encoder.layers[-1]
        hidden = layer.layer_norm1(out.hidden_states[-2])  # the last layer's input
        q, k = layer.self_attn.q_proj(hidden).double(), layer.self_attn.k_proj(hidden).double()
    width = q.shape[-1]
    attention = [((q[b, 0] @ k[b].T) / math.sqrt(width)).softmax(dim=-1)[1:] for b in range(q.shape[0])]
    return out.hidden_states[-2][:, 1:].double(), attention, k[:, 1:]


def reference_ratio(values: list[float]) -> float:
    flat = np.asarray(values, dtype=np.float64)
    q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
    return float((flat > q3 + 1.5 * (q3 - q1)).sum()) / flat.size


def reference_index(attention: list[float], plus: bool, ratio: float | None, adaptive_ratio: float,
                    tokens: int | None, dedup: bool) -> list[int]:
    n = len(attention)
    order = sorted(range(n), key=lambda i: (-attention[i], i))
    if tokens is not None and not plus:
        return order[: tokens - 1]
    if ratio is None and tokens is not None:
        ratio = tokens / (2 * n)
    if ratio is None:  # adaptive
        top = order[: int(n * adaptive_ratio)]
        if not plus:
            return top
        step = int(1 / adaptive_ratio) if adaptive_ratio > 0 else n
        return top + [x for x in range(0, n - 1, max(1, step // 3)) if x not in top]
    top = order[: int(n * ratio)]
    if not plus:
        return top
    step = int(1 / ratio)
    grid = list(range(step // 2, n - 1, step))
    return top + ([x for x in grid if x not in top] if dedup else grid)


def reference_merge(features, attention, keys, index: list[int], normalize: bool = False) -> torch.Tensor:
    """For each kept entry: ``F_i + sum a_j F_j`` over the 32 candidates (other kept entries, then the
    official complement) of largest key cosine; then the extra token over the complement."""
    n = len(attention)
    masked = sorted(0 if i in index else i for i in range(n))
    rest = masked[len(index):]
    rows = []
    for p, i in enumerate(index):
        candidates = index[:p] + index[p + 1:] + rest
        sims = [torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0).item() for j in candidates]
        ranked = sorted(range(len(candidates)), key=lambda c: (-sims[c], c))[:32]
        total = sum(attention[candidates[c]] * features[candidates[c]] for c in ranked)
        if normalize:
            total = total / sum(attention[candidates[c]] for c in ranked)
        rows.append(features[i] + total)
    rows.append(sum(attention[j] * features[j] for j in rest))
    return torch.stack(rows)


def reference_logits(model, inputs, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        projected = model.model.multi_modal_projector(tokens.float())
    return logits_with_visual_tokens(model, inputs, projected)


def test_published_fixed_budgets():
    for tokens, count in [(64, 65), (128, 129), (192, 193)]:
        stage = finepruner.methods.create("prumerge_plus", tokens=tokens).plan(32, 576)[0]
        assert (stage.layer, stage.keep, stage.insert) == (0, 0, count)
    assert [finepruner.methods.create("prumerge_plus", ratio=r).plan(32, 576)[0].insert
            for r in (1 / 6, 1 / 9, 1 / 18)] == [193, 129, 65]
    assert finepruner.methods.create("prumerge", tokens=64).plan(32, 576)[0].insert == 64
    assert finepruner.methods.create("prumerge", ratio=1 / 9).plan(32, 576)[0].insert == 65
    assert finepruner.methods.create("prumerge_plus").plan(32, 576)[0].insert is None  # adaptive
    assert finepruner.methods.create("prumerge_plus", tokens=64, dedup=True).plan(32, 576)[0].insert is None


def test_complement_matches_the_official_rule():
    assert complement(torch.tensor([5, 2]), 7).tolist() == [0, 1, 3, 4, 6]
    assert complement(torch.tensor([0, 3]), 5).tolist() == [1, 2, 4]
    assert complement(torch.tensor([3, 3]), 5).tolist() == [1, 2, 4]  # a duplicate drops the smallest (0)


CASES = [
    ("prumerge", {}), ("prumerge_plus", {}), ("prumerge", {"tokens": 12}), ("prumerge_plus", {"tokens": 16}),
    ("prumerge_plus", {"tokens": 24, "dedup": True}), ("prumerge_plus", {"ratio": 1 / 5}),
    ("prumerge", {"ratio": 0.3, "normalize_merge_weights": True}), ("prumerge_plus", {"tokens": 8}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_merged_tokens_equal_plain_reference(tiny, name, params):
    model, processor = tiny
    for row in range(3):
        inputs = single(processor, row)
        features, attention, keys = last_layer(model, inputs["pixel_values"])
        values = attention[0].tolist()
        index = reference_index(values, name == "prumerge_plus", params.get("ratio"), reference_ratio(values),
                                params.get("tokens"), params.get("dedup", False))
        tokens = reference_merge(features[0], values, keys[0], index, params.get("normalize_merge_weights", False))
        expected = reference_logits(model, inputs, tokens)
        with finepruner.apply(model, name, **params) as handle, torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        assert handle.stats.visual_tokens == [len(index) + 1] * 4, (name, params, row)
        assert (logits - expected).abs().max().item() <= 1e-4, (name, params, row)


def test_duplicates_of_the_fixed_plus_branch_are_kept(tiny):
    """Official non-adaptive "+": a top patch on the grid appears twice (no de-duplication)."""
    model, processor = tiny
    _, attention, _ = last_layer(model, single(processor, 0)["pixel_values"])
    index = reference_index(attention[0].tolist(), True, None, 0.0, 32, False)
    assert len(index) > len(set(index))  # this image has such a duplicate at tokens=32
    with finepruner.apply(model, "prumerge_plus", tokens=32) as handle, torch.no_grad():
        model(**single(processor, 0))
    assert handle.stats.visual_tokens == [33] * 4


@pytest.mark.parametrize(("name", "params"), [("prumerge", {}), ("prumerge_plus", {}),
                                              ("prumerge_plus", {"tokens": 16}),
                                              ("prumerge_plus", {"positions": "original"})])
def test_padded_batch_equals_each_sample_alone(tiny, batch, name, params):
    """Adaptive counts differ per sample (per-image IQR): the shorter samples get padding slots."""
    model, processor = tiny
    with finepruner.apply(model, name, **params) as handle:
        together = generate(model, batch)
        slots = handle.stats.visual_tokens[0]
        counts = []
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            counts.append(handle.stats.visual_tokens[0])
            assert_row_equals_alone(alone, together, row)
    assert slots == max(counts)
    if not params:
        assert len(set(counts)) > 1  # the batch really mixes counts


def test_batch_global_iqr_is_the_official_option(tiny, batch):
    """``iqr="batch"``: one ratio for the whole batch (official), so every sample keeps the same count."""
    model, _ = tiny
    features, attention, _ = last_layer(model, batch["pixel_values"])
    ratio = reference_ratio([v for a in attention for v in a.tolist()])
    with finepruner.apply(model, "prumerge", iqr="batch") as handle, torch.no_grad():
        model(**batch)
    assert handle.stats.visual_tokens == [int(NUM_VISUAL * ratio) + 1] * 4


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 16, "ratio": 0.1}, "tokens or ratio, not both"),
        ({"tokens": 0}, r"tokens=0; allowed: an integer >= 1"),
        ({"ratio": 0}, r"ratio=0; allowed: 0 < ratio <= 1"),
        ({"ratio": 1.5}, r"ratio=1.5; allowed: 0 < ratio <= 1"),
        ({"iqr": "global"}, r"iqr='global'; allowed: \('sample', 'batch'\)"),
        ({"dedup": 1}, r"dedup=1; allowed: True or False"),
        ({"normalize_merge_weights": "no"}, r"normalize_merge_weights='no'; allowed: True or False"),
        ({"neighbours": 0}, r"neighbours=0; allowed: an integer >= 1"),
        ({"positions": "shifted"}, "positions='shifted'"),
    ],
)
@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_bad_parameters(tiny, name, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, name, **params)
    assert "forward" not in vars(model.model.language_model)


def test_budget_beyond_the_model_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"tokens=65 is not allowed.*1\.\.64"):
        finepruner.apply(model, "prumerge", tokens=65)
    with pytest.raises(ValueError, match=r"tokens=129 is not allowed.*1\.\.128"):
        finepruner.apply(model, "prumerge_plus", tokens=129)


def test_two_images_per_sample_is_a_clear_error(tiny):
    model, processor = tiny
    inputs = processor(images=noise_images(2), text=["USER: <image> <image> what ? ASSISTANT:"], return_tensors="pt")
    with (finepruner.apply(model, "prumerge_plus"), torch.no_grad(),
          pytest.raises(ValueError, match="one image per sample")):
        model(**inputs)


def test_captured_signals_equal_plain_reference(tiny, batch):
    """The last-layer hook gives the merged-head [CLS] attention and the keys of the plain computation."""
    from finepruner.methods.base import PruningMethod, Stage

    class Recorder(PruningMethod):
        name = "recorder"
        default_positions = "renumber"
        needs_vision = ("last_layer_attention", "last_layer_keys")

        def plan(self, num_layers, num_visual):
            return [Stage(layer=0, keep=num_visual)]

        def select(self, stage_index, stage, ctx):
            self.seen = ctx.vision
            return ctx.visual_ids.clone()

    model, _ = tiny
    _, attention, keys = last_layer(model, batch["pixel_values"])
    recorder = Recorder()
    with finepruner.apply(model, recorder), torch.no_grad():
        model(**batch)
    seen = recorder.seen
    assert seen.patches_per_image == NUM_VISUAL
    assert (seen.last_layer_attention.double() - torch.stack(attention)).abs().max().item() <= 1e-6
    assert (seen.last_layer_keys.double() - keys).abs().max().item() <= 1e-5


def test_unpadded_batch_with_different_counts_equals_each_sample_alone(tiny):
    """Equal-length prompts (no attention mask needed) whose images keep different counts: the engine builds
    the mask for the padding slots itself."""
    model, processor = tiny
    images = noise_images(3)[:2]
    prompts = [PROMPTS[0], PROMPTS[0]]
    inputs = processor(images=images, text=prompts, return_tensors="pt")
    inputs.pop("attention_mask")
    with finepruner.apply(model, "prumerge_plus") as handle:
        together = generate(model, inputs)
        counts = []
        for row in range(2):
            alone = generate(model, processor(images=images[row:row + 1], text=prompts[:1], return_tensors="pt"))
            counts.append(handle.stats.visual_tokens[0])
            assert_row_equals_alone(alone, together, row)
    assert counts[0] != counts[1]
