"""The engine on LLaVA-NeXT and LLaVA-OneVision: images with different numbers of visual tokens.

Budgets count per image there (``ModelAdapter.per_image_budget``); a batch mixes images of different
sizes, a two-image prompt and a text-only row, so rows are re-padded after every stage
(``finepruner/engine/units.py``). References are plain transformers (``spec/models.md`` §7.2).
"""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.engine import loop, units
from finepruner.methods import available
from finepruner.methods import get as method_class
from finepruner.methods.base import ModelShape, PruningMethod, Stage
from finepruner.models.adapters import (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    adapter_class,
    adapter_for,
    families,
)
from finepruner.models.clip_text import build_tiny_clip_text
from finepruner.models.tiny_families import (
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    next_inputs,
    onevision_inputs,
    tiny_image,
    visual_token_counts,
)

PROMPTS = [
    "USER: <image>\nwhat color is the circle ? answer using a single word . ASSISTANT:",
    "USER: <image>\nhow many red objects are there in this image ? ASSISTANT:",
    "USER: <image> and <image>\nwhich one is on the left of the square ? ASSISTANT:",
    "USER: what is the color of the sky ? ASSISTANT:",
]
IMAGES = [[tiny_image(60, 40, 1)], [tiny_image(64, 64, 2)], [tiny_image(90, 30, 3), tiny_image(60, 40, 4)], []]


class Family:
    """A tiny model of one family with its input builder."""

    def __init__(self, name: str, attn: str) -> None:
        self.name = name
        if name == "llava_next":
            self.model, processor = build_tiny_llava_next(seed=0, attn=attn, qk_scale=8.0)
            self.processor = processor
            self.build = lambda prompts, images: next_inputs(self.model, processor, prompts, images)
        else:
            self.model, image_processor, tokenizer = build_tiny_llava_onevision(seed=0, attn=attn, qk_scale=8.0)
            self.processor = tokenizer
            self.build = lambda prompts, images: onevision_inputs(self.model, image_processor, tokenizer, prompts,
                                                                  images)
        self.model.eval()
        self.image_token = int(self.model.config.image_token_id)

    def inputs(self, rows: list[int] | None = None) -> dict:
        rows = list(range(len(PROMPTS))) if rows is None else rows
        return self.build([PROMPTS[r] for r in rows], [IMAGES[r] for r in rows])

    def generate(self, inputs: dict, **extra):
        options = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
                   "suppress_tokens": [self.image_token], **extra}
        with torch.no_grad():
            return self.model.generate(**inputs, **options)


_CACHE: dict[tuple[str, str], Family] = {}


def family(name: str, attn: str = "sdpa") -> Family:
    if (name, attn) not in _CACHE:
        torch.set_num_threads(2)
        _CACHE[(name, attn)] = Family(name, attn)
    return _CACHE[(name, attn)]


FAMILIES = ["llava_next", "llava_onevision"]


def assert_same(pruned, reference, atol: float = 1e-5) -> None:
    assert torch.equal(pruned.sequences, reference.sequences)
    for x, y in zip(pruned.scores, reference.scores, strict=True):
        finite = torch.isfinite(x) & torch.isfinite(y)
        assert (x[finite] - y[finite]).abs().max().item() <= atol


def assert_row_alone(together, alone, row: int, atol: float = 1e-4) -> None:
    """The sample's new tokens (it may stop at EOS before the batch does) and every step's scores."""
    new = len(alone.scores)
    start = together.sequences.shape[1] - len(together.scores)
    assert torch.equal(together.sequences[row, start:start + new], alone.sequences[0, -new:])
    for step, scores in enumerate(alone.scores):
        diff = (scores[0] - together.scores[step][row]).nan_to_num(0.0, 0.0, 0.0)
        assert diff.abs().max().item() <= atol


class KeepAll(PruningMethod):
    """Keeps every visual token at the given stage layers (keep-all equivalence)."""

    name = "keep_all"

    def __init__(self, layers: tuple[int, ...], positions: str = "original") -> None:
        super().__init__(positions)
        self.layers = layers

    def plan(self, num_layers, num_visual):
        return [Stage(layer=layer, keep=num_visual) for layer in self.layers]

    def select(self, stage_index, stage, ctx):
        return torch.arange(ctx.num_visual).expand(ctx.visual_ids.shape[0], -1)


class EveryOther(PruningMethod):
    """Keeps every ``step``-th current visual token of each image at each stage layer."""

    name = "every_other"

    def __init__(self, layers: tuple[int, ...], positions: str, step: int = 2) -> None:
        super().__init__(positions)
        self.layers, self.step = layers, step

    def plan(self, num_layers, num_visual):
        stages, count = [], num_visual
        for layer in self.layers:
            count = len(range(0, count, self.step))
            stages.append(Stage(layer=layer, keep=count))
        return stages

    def select(self, stage_index, stage, ctx):
        return torch.arange(0, ctx.num_visual, self.step)[: stage.keep].expand(ctx.visual_ids.shape[0], -1)


# -- the registry -------------------------------------------------------------------------------------------
def test_families_lists_the_three_llava_families():
    assert families()[:3] == ["llava", "llava_next", "llava_onevision"]
    assert adapter_class("llava_next") is LlavaNextAdapter
    assert adapter_class("llava_onevision") is LlavaOnevisionAdapter
    assert adapter_class("llava") is LlavaAdapter
    assert isinstance(adapter_for(family("llava_next").model), LlavaNextAdapter)


def test_unsupported_model_type_lists_the_families():
    with pytest.raises(ValueError, match="'qwen9_vl' is not supported; finepruner supports: llava, llava_next"):
        adapter_class("qwen9_vl")


def test_the_batch_really_has_different_counts():
    for name in FAMILIES:
        fam = family(name)
        counts = visual_token_counts(fam.model, fam.inputs())
        assert len(set(counts)) >= 2, counts
        assert len(counts) == 4  # three single-image rows' images and two of the two-image row, no text row


# -- equivalence with plain transformers ------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["vanilla", "keep_all_0", "keep_all_2", "keep_all_renumber"])
def test_keep_all_equals_transformers(name, attn, method):
    fam = family(name, attn)
    inputs = fam.inputs()
    reference = fam.generate(inputs)
    if method == "vanilla":
        applied = finepruner.apply(fam.model, "vanilla")
    else:
        layers = {"keep_all_0": (0,), "keep_all_2": (2,), "keep_all_renumber": (0, 2)}[method]
        applied = finepruner.apply(fam.model, KeepAll(layers, "renumber" if "renumber" in method else "original"))
    with applied:
        assert_same(fam.generate(inputs), reference)


def _methods_on(fam: Family) -> list[str]:
    supported = adapter_for(fam.model).vision_signals_supported()
    return [m for m in available()
            if supported is None or set(method_class(m).needs_vision) <= supported]


def _params(name: str, fam: Family) -> dict:
    adapter = adapter_for(fam.model)
    shape = ModelShape(adapter.num_layers, adapter.num_heads, 68)
    base = {"vanilla": {}, "pdrop": {"layers": [1, 2], "ratios": [0.5, 0.5]},
            "sparsevlm": {"layers": [0, 1, 2], "keeps": [30, 20, 10]},
            "dart": {"tokens": 8, "pivot_text_tokens": 2}}.get(name, {"tokens": 8})
    if name == "cdpruner" and fam.name == "llava_next":  # CLIP relevance: a tiny CLIP text tower
        base = {**base, "clip_text": build_tiny_clip_text(32, seed=3, max_positions=8)}
    return method_class(name).defaults_for(shape, base)


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_of_different_images_equals_each_sample_alone(name):
    """Every method the family supports: rows of 70, 88, 68 + 70 visual tokens and a text-only row."""
    fam = family(name)
    inputs = fam.inputs()
    tested = []
    for method in _methods_on(fam):
        with finepruner.apply(fam.model, method, processor=fam.processor, **_params(method, fam)) as handle:
            together = fam.generate(inputs)
            kept = [k.clone() for k in handle.kept]
            for row in range(len(PROMPTS)):
                alone = fam.generate(fam.inputs([row]))
                assert_row_alone(together, alone, row)
                if not IMAGES[row]:  # the text-only row keeps nothing (and its lone run prunes nothing)
                    assert all(bool((k[row] == -1).all()) for k in kept)
                    continue
                for stage, alone_kept in enumerate(handle.kept):
                    if alone_kept.shape[1]:
                        width = alone_kept.shape[1]
                        assert torch.equal(kept[stage][row, :width], alone_kept[0]), (method, row, stage)
                        assert bool((kept[stage][row, width:] == -1).all())
        tested.append(method)
    assert {"fastv", "pdrop", "sparsevlm", "random", "finepruner", "dart", "divprune", "vispruner",
            "cdpruner", "pool"} <= set(tested)


@pytest.mark.parametrize("name", FAMILIES)
def test_methods_without_their_signals_on_a_family_raise_naming_it(name):
    fam = family(name)
    supported = adapter_for(fam.model).vision_signals_supported()
    refused = [m for m in available() if supported is not None and not set(method_class(m).needs_vision) <= supported]
    for method in refused:
        with pytest.raises(ValueError, match=name):
            finepruner.apply(fam.model, method, tokens=8)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("layers", "positions"), [((0,), "renumber"), ((2,), "original"), ((1, 3), "renumber"),
                                                   ((0, 2), "original")])
def test_each_decode_step_equals_fresh_forward(name, layers, positions):
    """Cached decode logits == a no-cache forward over the prompt plus the generated tokens (the engine
    re-prunes the same kept set with the same positions)."""
    fam = family(name)
    inputs = fam.inputs()
    with finepruner.apply(fam.model, EveryOther(layers, positions)):
        out = fam.generate(inputs)
        prompt = inputs["input_ids"].shape[1]
        for step in range(1, len(out.scores)):
            ids = out.sequences[:, : prompt + step]
            mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], step, dtype=torch.long)], 1)
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            with torch.no_grad():
                fresh = fam.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
            finite = torch.isfinite(out.scores[step])
            assert (fresh[finite] - out.scores[step][finite]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_fastv_keeps_the_top_tokens_of_each_image_by_eager_attention(name):
    """FastV (K=2, last prompt token, mean over heads) per image, from plain eager attentions per sample."""
    fam = family(name, "eager")
    budget = 6
    for row in range(3):
        inputs = fam.inputs([row])
        with torch.no_grad():
            attentions = fam.model(**inputs, output_attentions=True).attentions
        image = (inputs["input_ids"][0] == fam.image_token).nonzero()[:, 0]
        scores = attentions[1][0, :, -1, image].float().mean(dim=0)
        counts = visual_token_counts(fam.model, inputs)
        expected, offset = [], 0
        for count in counts:
            top = scores[offset:offset + count].topk(budget).indices.sort().values + offset
            expected.append(top)
            offset += count
        with finepruner.apply(fam.model, "fastv", tokens=budget, K=2) as handle, torch.no_grad():
            fam.model(**inputs)
        assert handle.kept[0][0].tolist() == torch.cat(expected).tolist()


def test_ratio_prunes_a_fraction_of_each_image():
    fam = family("llava_next")
    inputs = fam.inputs()
    counts = visual_token_counts(fam.model, inputs)  # [70, 88, 68, 70]
    with finepruner.apply(fam.model, "fastv", ratio=0.5, K=1) as handle, torch.no_grad():
        fam.model(**inputs)
    per_row = (handle.kept[0] >= 0).sum(dim=1).tolist()
    half = [round(c * 0.5) for c in counts]
    assert per_row == [half[0], half[1], half[2] + half[3], 0]


def test_a_budget_above_an_images_count_is_a_clear_error():
    fam = family("llava_next")
    with finepruner.apply(fam.model, "fastv", tokens=80) as handle, pytest.raises(ValueError, match="tokens=80"):
        handle.model(**fam.inputs([0]))  # 70 visual tokens in this image


def test_uniform_batches_keep_the_plain_kept_tensor():
    """Images of one size: ``handle.kept`` is the [batch, n_kept] tensor of LLaVA-1.5, without padding."""
    fam = family("llava_next")
    inputs = fam.build([PROMPTS[0], PROMPTS[1]], [IMAGES[0], [tiny_image(60, 40, 7)]])
    with finepruner.apply(fam.model, "fastv", tokens=5) as handle, torch.no_grad():
        fam.model(**inputs)
    assert handle.kept[0].shape == (2, 5) and bool((handle.kept[0] >= 0).all())


# -- the ragged rebuild equals the batched path -------------------------------------------------------------
@pytest.mark.parametrize("renumber", [False, True])
@pytest.mark.parametrize("insert", [False, True])
def test_rebuild_equals_the_batched_keep_and_insert(renumber, insert):
    torch.manual_seed(0)
    batch, length, width, visual = 3, 12, 5, 6
    hidden = torch.randn(batch, length, width)
    mask2d = torch.ones(batch, length, dtype=torch.long)
    mask2d[0, :2] = 0
    positions = (mask2d.cumsum(1) - 1).masked_fill(mask2d == 0, 1)
    source = torch.arange(length).expand(batch, -1)
    shift = torch.zeros(batch, dtype=torch.long)
    index = torch.arange(3, 3 + visual).expand(batch, -1)
    local = torch.tensor([[0, 2, 5], [1, 2, 3], [0, 4, 5]])
    new = torch.randn(batch, 2, width) if insert else None
    insert_from = torch.tensor([[1, 3], [0, 5], [2, 2]]) if insert else None
    valid = torch.tensor([[True, False], [True, True], [False, True]]) if insert else None

    tokens = loop._Tokens(hidden, positions, mask2d, source, index, torch.arange(visual).expand(batch, -1), shift)
    if insert and not renumber:
        insert_positions = positions.gather(1, index.gather(1, insert_from))
    expected = loop._keep(tokens, local, renumber)
    if insert:
        expected = loop._insert(expected, new, None if renumber else insert_positions, visual, None, valid)

    unit_list = units.make_units([[units.ImageSpan(r, 0, 0, visual)] for r in range(batch)],
                                 torch.zeros(batch, length, dtype=torch.bool).index_fill(1, index[0], True))
    choices = [units.Choice(local[r], None if new is None else new[r], None if new is None else insert_from[r],
                            None if new is None else valid[r]) for r in range(batch)]
    built = units.rebuild(hidden, positions, mask2d, source, shift, unit_list, choices, renumber, [visual] * batch)
    assert torch.equal(built.hidden, expected.hidden)
    assert torch.equal(built.position_ids, expected.position_ids)
    assert torch.equal(built.mask2d, expected.mask2d)
    assert torch.equal(built.source_index, expected.source_index)
    assert torch.equal(built.shift, expected.shift)
    assert torch.equal(torch.stack([u.index for u in unit_list]), expected.visual_index)
    assert torch.equal(torch.stack([u.ids for u in unit_list]), expected.visual_ids)


@pytest.mark.parametrize("name", FAMILIES)
def test_stats_count_the_crops_the_tower_encoded(name):
    """``PruneStats.crops`` (vision FLOPs per crop): every image's base crop and tiles, padding crops excluded."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    fam = family(name)
    inputs = fam.inputs()
    config = fam.model.config
    multi = {2}  # the two-image row: OneVision encodes each of its images as one base crop
    expected = 0
    for row, images in enumerate(IMAGES):
        for image in images:
            if name == "llava_onevision" and row in multi:
                expected += 1
            else:
                expected += image_size_to_num_patches((image.height, image.width), config.image_grid_pinpoints,
                                                      config.vision_config.image_size)
    for method in ("vanilla", "fastv"):
        with finepruner.apply(fam.model, method, **({} if method == "vanilla" else {"tokens": 6})) as handle:
            fam.generate(inputs)
        assert handle.stats.crops == expected
        assert handle.stats.flops["vision_crops"] == expected
