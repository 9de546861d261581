"""Budgets on Qwen are validated at ``apply`` against the largest image the bound processor allows
(``ModelAdapter.budget_bound``), not only against the released checkpoints' 16,384-token limit."""

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
    tokens = bound // 2  # reachable as a layer average for images of the processor's size
    with pytest.raises(ValueError, match="16384 visual tokens"):
        finepruner.apply(model, "pdrop", tokens=tokens)
    with finepruner.apply(model, "pdrop", tokens=tokens, processor=processor) as handle:
        assert handle.method.tokens == tokens
