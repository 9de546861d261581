"""Pre-LLM methods under ``generate(use_cache=False)``: transformers encodes the images once and passes
the same encoded output to every step, which re-runs (and re-prunes) the whole prompt; the vision
signals of the first step must serve the later ones, giving the tokens of a cached generate.
(``random`` is left out: its draw is keyed by the prompt tokens, which grow at every no-cache step, so
each step draws anew, like FastV's re-pruning.)"""

from __future__ import annotations

import pytest
import torch

import finepruner
from tests.conftest import generate

PRE_LLM = {"vispruner": {"tokens": 12}, "divprune": {"tokens": 12}, "pool": {"tokens": 16},
           "visionzip": {"tokens": 12}, "prumerge_plus": {"tokens": 16},
           "hiprune": {"tokens": 12}}


@pytest.mark.parametrize("method", sorted(PRE_LLM))
def test_no_cache_generate_equals_cached(tiny, batch, method):
    model, _ = tiny
    with finepruner.apply(model, method, **PRE_LLM[method]) as handle:
        cached = generate(model, batch)
        kept = handle.kept[0].clone()
        fresh = generate(model, batch, use_cache=False)
        assert torch.equal(handle.kept[0], kept)
    assert torch.equal(fresh.sequences, cached.sequences)
    for x, y in zip(fresh.scores, cached.scores, strict=True):
        diff = (x - y).nan_to_num(0.0, 0.0, 0.0)
        assert diff.abs().max().item() <= 1e-4
