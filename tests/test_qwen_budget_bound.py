"""Budgets on Qwen are validated at ``apply`` against the images the bound processor can produce
(``ModelAdapter.budget_bound`` and the Qwen adapter's ``budget_floor``, from its max_pixels and min_pixels), not
only against the released checkpoints' 16,384-token limit: ``apply`` refuses what no such image fits, and a
budget that depends on the image's own count is checked per image at its prefill
(``tests/test_variable_count_budgets.py``)."""

from __future__ import annotations

import pytest

import finepruner
from finepruner.models.adapters import adapter_for
from finepruner.models.tiny_families import build_tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen2_5_vl()


def test_bound_comes_from_the_processors_max_pixels(qwen):
    model, processor = qwen
    adapter = adapter_for(model)
    size = processor.image_processor.size
    expected = int(size["longest_edge"]) // (14 * 2) ** 2
    assert adapter.budget_bound(processor) == min(expected, adapter.max_visual_tokens)
    assert adapter.budget_bound() == adapter.max_visual_tokens == 16384


def test_a_layer_average_budget_is_checked_against_the_processor_bound(qwen):
    model, processor = qwen
    bound = adapter_for(model).budget_bound(processor)
    # a layer average of the bound itself needs images larger than the processor allows (64 tokens here)
    with pytest.raises(ValueError, match=rf"tokens={bound} .*this model's images have 4\.\.{bound} visual tokens"):
        finepruner.apply(model, "pdrop", tokens=bound, processor=processor)
    with finepruner.apply(model, "pdrop", tokens=bound) as handle:  # up to 16,384 tokens: some image fits
        assert handle.method.tokens == bound
    tokens = bound // 2  # reachable as a layer average for images of the processor's size
    for extra in ({}, {"processor": processor}):
        with finepruner.apply(model, "pdrop", tokens=tokens, **extra) as handle:
            assert handle.method.tokens == tokens
    # an upper bound on the count: refused against the processor's bound, accepted against 16,384
    with pytest.raises(ValueError, match=rf"tokens={bound + 1} is not allowed; this model has {bound} visual"):
        finepruner.apply(model, "fastv", tokens=bound + 1, processor=processor)
    finepruner.apply(model, "fastv", tokens=bound + 1).remove()


def test_pool_before_the_projector_is_refused_at_apply_and_after_it_runs(qwen):
    import torch

    model, processor = qwen
    with pytest.raises(ValueError, match="where='post_projector'"):
        finepruner.apply(model, "pool", tokens=4)
    from finepruner.models.tiny_families import qwen_inputs, tiny_image

    content = [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = qwen_inputs(processor, [prompt], [[tiny_image(84, 84, 2)]])  # a 3 x 3 merged grid
    with finepruner.apply(model, "pool", tokens=4, where="post_projector") as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert handle.stats.visual_tokens[-1] == 4  # 9 merged tokens pooled into a 2 x 2 grid
