"""The pruning path against plain transformers: keep-all equivalence, batches, cache, decode."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.base import PruningMethod, Stage, StageContext
from tests.conftest import PROMPTS, single

IMAGE_TOKEN_ID = 4  # "<image>" in the tiny tokenizer; never generated, so outputs can be fed back
GEN = {
    "max_new_tokens": 6,
    "do_sample": False,
    "output_scores": True,
    "return_dict_in_generate": True,
    "suppress_tokens": [IMAGE_TOKEN_ID],
}
NUM_VISUAL = 64


def generate(model, inputs, **extra):
    with torch.no_grad():
        return model.generate(**inputs, **{**GEN, **extra})


def max_score_diff(a, b) -> float:
    """Largest difference between two runs' step scores (suppressed tokens are -inf in both)."""
    worst = 0.0
    for x, y in zip(a.scores, b.scores, strict=True):
        finite = torch.isfinite(x)
        assert torch.equal(finite, torch.isfinite(y))
        worst = max(worst, (x[finite] - y[finite]).abs().max().item())
    return worst


class FixedSelection(PruningMethod):
    """Keeps given visual indices at given layers (to compare decode steps with fresh forwards)."""

    name = "fixed"

    def __init__(self, stages: list[tuple[int, list[int]]], positions: str) -> None:
        super().__init__(positions)
        self.fixed = stages

    def plan(self, num_layers, num_visual):
        return [Stage(layer=layer, keep=len(ids)) for layer, ids in self.fixed]

    def select(self, stage_index, stage: StageContext, ctx):
        wanted = torch.tensor(self.fixed[stage_index][1])
        # map original ids to positions among the current visual tokens
        local = [(ctx.visual_ids[row] == wanted[:, None]).nonzero()[:, 1] for row in range(ctx.visual_ids.shape[0])]
        return torch.stack(local).sort(dim=1).values


KEEP_ALL = [
    ("vanilla", {}),
    ("fastv", {"tokens": NUM_VISUAL}),
    ("fastv", {"tokens": NUM_VISUAL, "positions": "renumber"}),
    ("pdrop", {"layers": [1, 2, 3], "ratios": [1.0, 1.0, 1.0]}),
    ("random", {"tokens": NUM_VISUAL, "K": 0}),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("name", "params"), KEEP_ALL)
def test_keep_all_equals_transformers(tiny, tiny_eager, batch, attn, name, params):
    model, _ = tiny if attn == "sdpa" else tiny_eager
    reference = generate(model, batch)
    with finepruner.apply(model, name, **params) as handle:
        pruned = generate(model, batch)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_score_diff(pruned, reference) <= 1e-5
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


def test_keep_all_forward_logits_equal(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        reference = model(**batch).logits
        with finepruner.apply(model, "fastv", tokens=NUM_VISUAL):
            pruned = model(**batch).logits
    assert (pruned - reference).abs().max().item() <= 1e-5


def test_sampling_keep_all_equals_transformers(tiny, batch):
    model, _ = tiny
    torch.manual_seed(3)
    reference = generate(model, batch, do_sample=True, temperature=1.5)
    with finepruner.apply(model, "fastv", tokens=NUM_VISUAL):
        torch.manual_seed(3)
        pruned = generate(model, batch, do_sample=True, temperature=1.5)
    assert torch.equal(pruned.sequences, reference.sequences)


PRUNED = [
    ("fastv", {"tokens": 16}),
    ("fastv", {"tokens": 16, "positions": "renumber"}),
    ("pdrop", {"layers": [1, 2, 3], "ratios": [0.5, 0.25, 0.125]}),
    ("pdrop", {"layers": [1, 3], "ratios": [0.5, 0.25], "positions": "original"}),
    ("random", {"tokens": 12, "seed": 5}),
    ("random", {"tokens": 12, "K": 2, "positions": "original"}),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("name", "params"), PRUNED)
def test_padded_batch_equals_each_sample_alone(tiny, tiny_eager, batch, attn, name, params):
    model, processor = tiny if attn == "sdpa" else tiny_eager
    with finepruner.apply(model, name, **params) as handle:
        together = generate(model, batch)
        kept_together = [k.clone() for k in handle.kept]
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            for stage, kept in enumerate(handle.kept):
                assert torch.equal(kept[0], kept_together[stage][row])
            new = together.sequences.shape[1] - GEN["max_new_tokens"]
            assert torch.equal(alone.sequences[0, -GEN["max_new_tokens"]:], together.sequences[row, new:])
            for step, scores in enumerate(alone.scores):
                diff = (scores[0] - together.scores[step][row]).nan_to_num(0.0, 0.0, 0.0)
                assert diff.abs().max().item() <= 1e-4


def test_kv_cache_lengths_fastv_and_pdrop(tiny, batch):
    model, _ = tiny
    length = batch["input_ids"].shape[1]
    new = GEN["max_new_tokens"]
    text = length - NUM_VISUAL
    with finepruner.apply(model, "fastv", tokens=16, K=2):
        out = generate(model, batch)
    # the cache holds the prompt plus new-1 generated tokens (the last token is never fed back)
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [length + new - 1] * 2 + [text + 16 + new - 1] * 2
    with finepruner.apply(model, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]):
        out = generate(model, batch)
    expected = [length, text + 32, text + 16, text + 8]
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [e + new - 1 for e in expected]
    with finepruner.apply(model, "random", tokens=10):
        out = generate(model, batch)
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [text + 10 + new - 1] * 4


STAGE_SETS = [
    ([(2, list(range(0, 64, 4)))], "original"),
    ([(2, list(range(0, 64, 4)))], "renumber"),
    ([(0, list(range(5, 64, 3)))], "renumber"),
    ([(0, list(range(5, 64, 3)))], "original"),
    ([(1, list(range(0, 64, 2))), (3, list(range(0, 64, 8)))], "renumber"),
    ([(1, list(range(0, 64, 2))), (3, list(range(0, 64, 8)))], "original"),
]


@pytest.mark.parametrize(("stages", "positions"), STAGE_SETS)
def test_each_decode_step_equals_fresh_forward(tiny, batch, stages, positions):
    """Cached decode logits == a no-cache forward over the kept prompt plus the generated tokens."""
    model, _ = tiny
    method = FixedSelection(stages, positions)
    with finepruner.apply(model, method):
        out = generate(model, batch)
        sequences = out.sequences
        prompt = batch["input_ids"].shape[1]
        for step in range(1, GEN["max_new_tokens"]):
            ids = sequences[:, : prompt + step]
            mask = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], step, dtype=torch.long)], 1)
            with torch.no_grad():
                fresh = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                              use_cache=False).logits[:, -1]
            finite = torch.isfinite(out.scores[step])
            assert (fresh[finite] - out.scores[step][finite]).abs().max().item() <= 1e-4


def test_beam_search_and_multiple_returns(tiny, batch):
    model, processor = tiny
    reference = generate(model, batch, num_beams=3, num_return_sequences=2)
    with finepruner.apply(model, "fastv", tokens=NUM_VISUAL):
        same = generate(model, batch, num_beams=3, num_return_sequences=2)
    assert torch.equal(same.sequences, reference.sequences)
    with finepruner.apply(model, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]) as handle:
        beams = generate(model, batch, num_beams=3, num_return_sequences=2)
        assert handle.kept[0].shape[0] == 3 * len(PROMPTS)
        alone = generate(model, single(processor, 1), num_beams=3, num_return_sequences=2)
        new = GEN["max_new_tokens"]
        assert torch.equal(beams.sequences[2:4, -new:], alone.sequences[:, -new:])


def test_two_generations_share_no_state(tiny, batch):
    model, processor = tiny
    short = single(processor, 2)
    with finepruner.apply(model, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]):
        first_alone = generate(model, short)
        generate(model, batch)
        again = generate(model, short)
    assert torch.equal(first_alone.sequences, again.sequences)
    assert max_score_diff(first_alone, again) == 0.0


def test_remove_restores_the_model(tiny, batch):
    model, _ = tiny
    lm = model.model.language_model
    with torch.no_grad():
        before = model(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = finepruner.apply(model, "fastv", tokens=8)
    with torch.no_grad():
        pruned = model(**batch).logits
    handle.remove()
    with torch.no_grad():
        after = model(**batch).logits
    assert "forward" not in vars(lm)
    assert not hasattr(lm, "_finepruner_handle")
    assert not model.model._forward_pre_hooks
    assert torch.equal(before, after)
    assert not torch.equal(before, pruned)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    handle.remove()  # idempotent


def test_apply_twice_is_refused(tiny):
    model, _ = tiny
    with finepruner.apply(model, "vanilla"), pytest.raises(RuntimeError, match="already applied"):
        finepruner.apply(model, "fastv", tokens=8)


def test_stats_and_kept_contract(tiny, batch):
    model, _ = tiny
    with finepruner.apply(model, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]) as handle:
        with torch.no_grad():
            model(**batch)
    assert handle.stats.visual_tokens == [64, 32, 16, 8]
    assert handle.stats.average_visual_tokens == 30.0
    for kept, count in zip(handle.kept, (32, 16, 8), strict=True):
        assert kept.shape == (3, count) and kept.dtype == torch.long
        assert torch.equal(kept, kept.sort(dim=1).values)
        assert int(kept.max()) < NUM_VISUAL
    # each stage keeps a subset of the previous one
    for earlier, later in zip(handle.kept, handle.kept[1:]):
        for row in range(3):
            assert set(later[row].tolist()) <= set(earlier[row].tolist())


def test_generate_without_cache_reprunes_each_step(tiny, batch):
    """use_cache=False (FastV's paper mode): every step is a fresh pruned prefill of the whole sequence."""
    model, _ = tiny
    with finepruner.apply(model, "fastv", tokens=NUM_VISUAL) as handle:
        keep_all = generate(model, batch, use_cache=False)
    reference = generate(model, batch)
    assert torch.equal(keep_all.sequences, reference.sequences)
    with finepruner.apply(model, "fastv", tokens=16) as handle:
        out = generate(model, batch, use_cache=False)
        prompt = batch["input_ids"].shape[1]
        # the last step pruned with the newest token as the query: its kept set is the one of a fresh
        # forward over the whole sequence so far
        last_kept = handle.kept[0].clone()
        ids = out.sequences[:, :-1]
        mask = torch.cat([batch["attention_mask"], torch.ones(3, ids.shape[1] - prompt, dtype=torch.long)], 1)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], use_cache=False)
        assert torch.equal(handle.kept[0], last_kept)
