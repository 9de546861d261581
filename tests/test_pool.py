"""Pool: grid mappings, pooled token values against a plain reference of the spec (``methods_more.md`` §6),
batches, keep-all, errors."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.pool import exact_grid, square_grid
from tests.conftest import (
    GEN,
    NUM_VISUAL,
    PROMPTS,
    assert_row_equals_alone,
    assert_same_generation,
    generate,
    logits_with_visual_tokens,
    single,
)

SIDE = 8


def reference_pool(grid: torch.Tensor, h: int, w: int, reduce: str = "avg") -> torch.Tensor:
    """Adaptive pooling written as loops: bin (i, j) covers rows floor(i*G/h) .. ceil((i+1)*G/h) - 1 and
    the same for columns; raster order. ``grid`` is [G, G, D]."""
    side = grid.shape[0]
    rows = []
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * side) // h, -((-(i + 1) * side) // h)
            c0, c1 = (j * side) // w, -((-(j + 1) * side) // w)
            cell = grid[r0:r1, c0:c1].reshape(-1, grid.shape[-1]).double()
            rows.append(cell.mean(dim=0) if reduce == "avg" else cell.max(dim=0).values)
    return torch.stack(rows)


def reference_logits(model, inputs, h: int, w: int, where: str, reduce: str = "avg") -> torch.Tensor:
    """Last-token logits of one prompt whose image span is replaced by the pooled tokens (contiguous
    positions), from a plain transformers run of the language model on hand-built embeddings."""
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        features = out.hidden_states[-2][0, 1:]  # [V, Dv] (the "default" strategy drops [CLS])
        projector = model.model.multi_modal_projector
        if where == "pre_projector":
            pooled = projector(reference_pool(features.view(SIDE, SIDE, -1), h, w, reduce).float())
        else:
            pooled = reference_pool(projector(features).view(SIDE, SIDE, -1), h, w, reduce).float()
    return logits_with_visual_tokens(model, inputs, pooled)


def test_grid_mappings_llava_shape():
    assert [exact_grid(n, 24) for n in (64, 128, 192)] == [(8, 8), (16, 8), (16, 12)]
    assert [square_grid(n, 24) for n in (64, 128, 192)] == [(8, 8), (11, 12), (14, 14)]
    for tokens, count in [(64, 64), (128, 128), (192, 192)]:
        stage = finepruner.methods.create("pool", tokens=tokens).plan(32, 576)[0]
        assert (stage.layer, stage.keep, stage.insert) == (0, 0, count)
    assert finepruner.methods.create("pool", tokens=128, shape="square").plan(32, 576)[0].insert == 132
    assert finepruner.methods.create("pool", tokens=192, shape="square").plan(32, 576)[0].insert == 196
    assert finepruner.methods.create("pool").plan(32, 576)[0].insert == 144


@pytest.mark.parametrize(
    ("params", "grid"),
    [({"tokens": 16}, (4, 4)), ({"tokens": 12}, (4, 3)), ({"tokens": 5}, (5, 1)), ({"grid": (3, 5)}, (3, 5)),
     ({"tokens": 10, "shape": "square"}, (3, 3)), ({"tokens": 16, "where": "post_projector"}, (4, 4)),
     ({"tokens": 12, "reduce": "max"}, (4, 3))],
)
def test_pooled_tokens_equal_plain_reference(tiny, params, grid):
    model, processor = tiny
    where, reduce = params.get("where", "pre_projector"), params.get("reduce", "avg")
    for row in range(3):
        inputs = single(processor, row)
        expected = reference_logits(model, inputs, *grid, where, reduce)
        with finepruner.apply(model, "pool", **params) as handle, torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        assert handle.stats.visual_tokens == [grid[0] * grid[1]] * 4
        assert handle.merged[0].shape == (1, grid[0] * grid[1])
        assert (logits - expected).abs().max().item() <= 1e-4, (params, row)


def test_projector_run_on_pooled_tokens_is_not_captured(tiny, batch):
    """The extra projector call leaves nothing in the vision capture (it would look like another image)."""
    model, _ = tiny
    with finepruner.apply(model, "pool", tokens=16) as handle, torch.no_grad():
        model(**batch)
        capture = handle._vision
        assert capture._features == [] and capture._projected == []
        generate(model, batch, num_beams=2, num_return_sequences=2)  # signals repeated for beams
    assert handle.stats.visual_tokens == [16] * 4


def test_pre_and_post_projector_differ(tiny):
    model, processor = tiny
    inputs = single(processor, 0)
    logits = {}
    for where in ("pre_projector", "post_projector"):
        with finepruner.apply(model, "pool", tokens=16, where=where), torch.no_grad():
            logits[where] = model(**inputs).logits[:, -1]
    assert (logits["pre_projector"] - logits["post_projector"]).abs().max().item() > 1e-3


def test_keep_all_equals_transformers(tiny, batch):
    """An 8x8 pool of the 8x8 grid is the identity: the same generation as plain transformers."""
    model, _ = tiny
    reference = generate(model, batch)
    with finepruner.apply(model, "pool", tokens=NUM_VISUAL) as handle:
        pruned = generate(model, batch)
    assert_same_generation(pruned, reference)
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_padded_batch_equals_each_sample_alone_and_kv_lengths(tiny, batch, positions):
    model, processor = tiny
    new = GEN["max_new_tokens"]
    text = batch["input_ids"].shape[1] - NUM_VISUAL
    with finepruner.apply(model, "pool", tokens=12, positions=positions) as handle:
        together = generate(model, batch)
        assert [layer.keys.shape[2] for layer in together.cache.layers] == [text + 12 + new - 1] * 4
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert handle.stats.visual_tokens == [12] * 4
            assert_row_equals_alone(alone, together, row)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 65}, "tokens=65 is not allowed.*1..64"),
        ({"tokens": 0}, r"tokens=0; allowed: an integer >= 1"),
        ({"tokens": 11}, r"tokens=11 is no h x w grid with h, w <= 8; allowed: .*shape='square' \(here 3x4 = 12\)"),
        ({"grid": (9, 2)}, r"allowed: h, w in 1..8"),
        ({"grid": (2,)}, r"allowed: two integers \(h, w\) >= 1"),
        ({"tokens": 16, "grid": (4, 4)}, "tokens or grid, not both"),
        ({"tokens": 16, "shape": "round"}, r"shape='round'; allowed: \('exact', 'square'\)"),
        ({"tokens": 16, "where": "vision"}, r"where='vision'; allowed: \('pre_projector', 'post_projector'\)"),
        ({"tokens": 16, "reduce": "sum"}, r"reduce='sum'; allowed: \('avg', 'max'\)"),
        ({"tokens": 16, "positions": "shifted"}, "positions='shifted'"),
    ],
)
def test_bad_parameters(tiny, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "pool", **params)
    assert "forward" not in vars(model.model.language_model)


def test_non_square_visual_count_is_a_clear_error():
    with pytest.raises(ValueError, match="not one square grid"):
        finepruner.methods.create("pool", tokens=16).plan(4, 128)

