"""Budgets whose feasibility depends on an image's own visual-token count (issue #16, ``spec/models.md`` §5.1).

On families with variable counts (Qwen2/2.5-VL, Qwen3-VL) ``apply`` refuses only what no image the processor
can produce fits; PDrop's layer-average mapping and SparseVLM's scaled schedule are made per image from its
own count at its prefill, and a count a budget cannot take raises there, before the language model runs (and,
called on the model directly, before the vision tower). LLaVA-1.5 (a fixed count) still checks at ``apply``.
"""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods import create
from finepruner.methods.base import ModelShape, check_shape, count_ladder
from finepruner.methods.fastv import average_matched_keep
from finepruner.methods.pdrop import budget_counts, budget_schedule
from finepruner.methods.sparsevlm import sparsevlm_mapping, visual_counts
from finepruner.models.adapters import adapter_for
from finepruner.models.tiny import build_tiny_llava
from finepruner.models.tiny_families import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl, qwen_inputs, tiny_image

QUESTIONS = ["what color is the circle ?", "how many red objects are there ?"]
#: 24 and 12 visual tokens on the tiny Qwen2.5-VL (168x112 -> grid 8x12 merged 4x6; 112x84 -> 3x4); 9 (84x84).
WIDE, SMALL, TINY = tiny_image(168, 112, 1), tiny_image(112, 84, 3), tiny_image(84, 84, 2)
COUNTS = {id(WIDE): 24, id(SMALL): 12, id(TINY): 9}
GEN = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}


@pytest.fixture(scope="module")
def qwen():
    torch.set_num_threads(1)
    return build_tiny_qwen2_5_vl(seed=0, qk_scale=8.0)


def inputs(processor, images, questions=None):
    questions = questions or QUESTIONS[: len(images)]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    return qwen_inputs(processor, prompts, [[image] for image in images])


def generate(model, batch):
    with torch.no_grad():
        return model.generate(**batch, suppress_tokens=[int(model.config.image_token_id)], **GEN)


def kept_per_row(handle) -> list[list[int]]:
    """Each row's kept visual tokens per stage."""
    return [[int(n) for n in (kept >= 0).sum(dim=1)] for kept in handle.kept]


def test_count_ladder_covers_the_range():
    assert count_ladder(1, 8) == list(range(1, 9))
    ladder = count_ladder(4, 16384)
    assert ladder[0] == 4 and ladder[-1] == 16384 and ladder == sorted(set(ladder))
    assert all(b <= max(a + 1, a * 2 ** (1 / 8) + 1) for a, b in zip(ladder, ladder[1:])) and len(ladder) < 200


def test_budget_counts_are_the_images_the_mapping_reaches():
    span = budget_counts(8, 4, [1, 2])
    assert span == (11, 31)
    for count in range(1, 40):
        fits = span[0] <= count <= span[1]
        try:
            budget_schedule(8, 4, count)
        except ValueError:
            assert not fits, count
        else:
            assert fits, count


def test_check_shape_without_weights():
    """``check_shape`` (what ``apply`` runs, from a config's shape): Qwen2.5-VL-7B's 28 layers and images of
    4..16,384 tokens take the papers' ``tokens=64`` (it fits images of 112..895 tokens); one fixed count of
    16,384 does not."""
    qwen7b = ModelShape(28, 28, 16384, variable=True, min_visual=4)
    check_shape(create("pdrop", tokens=64), qwen7b)
    check_shape(create("sparsevlm", tokens=64), qwen7b)
    assert budget_counts(64, 28, [2, 9, 18]) == (112, 895)
    with pytest.raises(ValueError, match="16384 visual tokens"):
        check_shape(create("pdrop", tokens=64), ModelShape(28, 28, 16384))
    with pytest.raises(ValueError, match="fits images of 112..895 visual tokens, but this model's images have 4..100"):
        check_shape(create("pdrop", tokens=64), ModelShape(28, 28, 100, variable=True, min_visual=4))


@pytest.mark.parametrize("with_processor", [False, True])
def test_pdrop_tokens_is_accepted_at_apply_and_mapped_per_image(qwen, with_processor):
    """tokens=8 cannot be the layer average of the 16,384-token bound (nor of the processor's 64), but is for
    images of 11..31 tokens: ``apply`` accepts it and each image gets ``budget_schedule`` of its own count."""
    model, processor = qwen
    extra = {"processor": processor} if with_processor else {}
    for image in (WIDE, SMALL):
        count = COUNTS[id(image)]
        with finepruner.apply(model, "pdrop", tokens=8, **extra) as handle:
            generate(model, inputs(processor, [image]))
        layers, keeps = budget_schedule(8, adapter_for(model).num_layers, count)
        assert kept_per_row(handle) == [[k] for k in keeps]
        assert handle.stats.visual_tokens == [count, keeps[0], keeps[1], keeps[1]]
        assert handle.stats.average_visual_tokens == pytest.approx(8.0)
        assert layers == [1, 2]


@pytest.mark.parametrize(("method", "params"), [("pdrop", {"tokens": 8}), ("sparsevlm", {"tokens": 4}),
                                                ("fastv", {"tokens": 8, "budget": "average", "K": 1})])
def test_padded_batch_of_two_sizes_equals_each_sample_alone(qwen, method, params):
    model, processor = qwen
    images = [WIDE, SMALL]
    with finepruner.apply(model, method, **params) as handle:
        together = generate(model, inputs(processor, images))
    kept_together = [kept.clone() for kept in handle.kept]
    new = len(together.scores)
    for row, image in enumerate(images):
        with finepruner.apply(model, method, **params) as handle:
            alone = generate(model, inputs(processor, [image], [QUESTIONS[row]]))
        assert torch.equal(together.sequences[row, -new:], alone.sequences[0, -new:])
        for step, scores in enumerate(alone.scores):
            diff = (scores[0] - together.scores[step][row]).nan_to_num(0.0, 0.0, 0.0)
            assert diff.abs().max().item() <= 1e-4
        for stage, kept in enumerate(handle.kept):
            width = kept.shape[1]
            assert torch.equal(kept_together[stage][row, :width], kept[0])
            assert bool((kept_together[stage][row, width:] == -1).all())


def test_sparsevlm_tokens_maps_onto_each_images_count(qwen):
    """SparseVLM's mapping per image (the v1.5 schedule of the official budget nearest ``N * 576 / V``, scaled
    by ``V / 576``): 4 of 24 tokens is the 96-of-576 schedule, 4 of 12 the 192-of-576 one. Each row keeps
    ``visual_counts`` of its own mapping, at the same (depth-scaled) layers."""
    model, processor = qwen
    num_layers = adapter_for(model).num_layers
    with finepruner.apply(model, "sparsevlm", tokens=4) as handle:
        generate(model, inputs(processor, [WIDE, SMALL]))
    expected = []
    for image in (WIDE, SMALL):
        mapped = sparsevlm_mapping(4, num_layers, COUNTS[id(image)])
        expected.append([keep for keep, _ in visual_counts(mapped["keeps"], COUNTS[id(image)])])
        assert mapped["layers"] == [0, 1, 2]
    assert expected[0] != expected[1]
    assert kept_per_row(handle) == [list(stage) for stage in zip(*expected, strict=True)]


def test_fastv_average_budget_is_found_between_the_smallest_and_largest_image(qwen):
    """The default ``check_counts`` tries the counts between the smallest and the largest image: FastV's
    average-matched budget (bounded on both sides by the count) is accepted and matched per image."""
    model, processor = qwen
    with finepruner.apply(model, "fastv", tokens=8, budget="average", K=1) as handle:
        generate(model, inputs(processor, [WIDE]))
    assert kept_per_row(handle) == [[average_matched_keep(8, 1, 4, 24)]]


def test_an_infeasible_budget_for_the_actual_image_raises_at_its_prefill(qwen):
    """8 tokens cannot be the layer average of a 9-token image: a clear error naming the method, the
    parameter, the image's count and the allowed range, before any decoder layer runs (and, on a direct
    forward, before the vision tower encodes the images)."""
    model, processor = qwen
    adapter = adapter_for(model)
    calls = {"layers": 0, "tower": 0}
    hooks = [adapter.decoder_layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__("layers", 1)),
             adapter.vision_tower.register_forward_pre_hook(lambda *_: calls.__setitem__("tower", 1))]
    message = (r"pdrop: tokens=8 cannot be the layer average with stage layers \[1, 2\] on 4 layers and 9 visual "
               r"tokens; allowed: more than 2\.2 and at most 6\.8 .*fits images of 11\.\.31 visual tokens "
               r"\[an image of 9 visual tokens in this batch")
    try:
        with finepruner.apply(model, "pdrop", tokens=8) as handle:
            with pytest.raises(ValueError, match=message), torch.no_grad():
                model(**inputs(processor, [TINY]))
            assert calls == {"layers": 0, "tower": 0}
            with pytest.raises(ValueError, match=message):
                generate(model, inputs(processor, [WIDE, TINY]))  # one image of the batch is enough
            assert calls["layers"] == 0
            generate(model, inputs(processor, [WIDE]))  # the handle still serves other images
            assert calls["layers"] == 1 and kept_per_row(handle) == [[4], [2]]
    finally:
        for hook in hooks:
            hook.remove()
    with finepruner.apply(model, "sparsevlm", tokens=8), pytest.raises(
            ValueError, match=r"sparsevlm: tokens=8 of 9 visual tokens is 512 .*\[an image of 9 visual tokens"):
        generate(model, inputs(processor, [TINY]))


def test_apply_refuses_what_no_image_of_the_processor_fits(qwen):
    """With the processor bound (images of 4..64 tokens) a layer average no such image reaches is refused at
    ``apply``; without it (up to 16,384 tokens) it is accepted and checked per image."""
    model, processor = qwen
    assert adapter_for(model).budget_floor(processor) == 4 and adapter_for(model).budget_floor() == 1
    with pytest.raises(ValueError, match=r"pdrop: tokens=50 .* fits images of 67\.\.199 visual tokens, but this "
                                         r"model's images have 4\.\.64 visual tokens"):
        finepruner.apply(model, "pdrop", tokens=50, processor=processor)
    finepruner.apply(model, "pdrop", tokens=50).remove()
    with pytest.raises(ValueError, match=r"layers\[i\]=4 is out of range"):  # count-independent: always at apply
        finepruner.apply(model, "pdrop", tokens=8, layers=[1, 4])
    with pytest.raises(ValueError, match=r"tokens=100 is not allowed; this model has 64 visual tokens"):
        finepruner.apply(model, "fastv", tokens=100, processor=processor)


def test_qwen3_vl_maps_pdrop_per_image():
    model, processor = build_tiny_qwen3_vl(seed=0)
    image = tiny_image(128, 96, 5)  # 16-px patches: grid 6 x 8 merged to 3 x 4 = 12 tokens
    with finepruner.apply(model, "pdrop", tokens=8) as handle:
        generate(model, inputs(processor, [image]))
    assert kept_per_row(handle) == [[k] for k in budget_schedule(8, 4, 12)[1]]


def test_llava_15_still_checks_every_budget_at_apply():
    """A fixed count (the tiny LLaVA-1.5's 64 tokens per sample): the layer average is checked at ``apply``,
    and SparseVLM's tokens must name an official schedule there."""
    model, _ = build_tiny_llava(seed=0)
    with pytest.raises(ValueError, match=r"tokens=8 cannot be the layer average .* and 64 visual tokens"):
        finepruner.apply(model, "pdrop", tokens=8)
    with pytest.raises(ValueError, match="no version '1.5' schedule for tokens=8"):
        finepruner.apply(model, "sparsevlm", tokens=8, layers=[0, 1, 2])
    with pytest.raises(ValueError, match="no version '1.5' schedule for tokens=8"):
        finepruner.apply(model, "sparsevlm", tokens=8)



def test_pre_load_checks_of_eval_sweep_and_lmms_accept_budgets_per_image(qwen):
    """``finepruner eval``/``sweep`` and the lmms-eval runtime validate a method against the checkpoint's
    config.json before loading it (``shape_of``): on a variable-count family they run ``apply``'s checks,
    so a budget that fits the family's real images is not refused against the 16,384-token bound."""
    from finepruner.eval.runner import EvalError, build_method
    from finepruner.models.adapters import adapter_class
    from finepruner.sweep.config import check_method_params

    shape = adapter_class("qwen2_5_vl").shape_of(qwen[0].config)
    assert shape.variable and shape.num_visual >= 1024
    check_method_params("pdrop", {"tokens": 8}, shape)  # was: "cannot be the layer average ... 16384"
    assert build_method("pdrop", {"tokens": 8}, shape) is not None
    # a fixed count (LLaVA-1.5; the toy's 6 layers and 144 tokens) still checks the plan before the load
    fixed = ModelShape(6, 8, 144)
    with pytest.raises(ValueError, match="layer average"):
        check_method_params("pdrop", {"tokens": 16}, fixed)
    with pytest.raises(EvalError, match="layer average"):
        build_method("pdrop", {"tokens": 16}, fixed)
