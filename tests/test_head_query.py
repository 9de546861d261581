"""``finepruner``'s ``query="instruction"``: tokens ranked by the largest attention from any instruction token
(the extension the toy head study motivates, docs/head_study.md), against a plain eager reference."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner import heads as head_lib
from tests.conftest import single

IMAGE_TOKEN = 4


def instruction_rows(model, inputs, layer: int) -> list[torch.Tensor]:
    """Per sample: [H, V] max over the real tokens after the last image token of the eager attention of
    decoder layer ``layer`` to the image tokens."""
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[layer]
    out = []
    for row, ids in enumerate(inputs["input_ids"]):
        visual = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(visual[-1]) + 1, ids.shape[0])
        text = text[inputs["attention_mask"][row, text].bool()]
        out.append(attn[row][:, text][:, :, visual].amax(dim=1))
    return out


@pytest.mark.parametrize(("strategy", "heads"), [("all", None), ("sum", 2), ("entropy", 3)])
def test_kept_set_equals_eager_reference(tiny, tiny_eager, batch, strategy, heads):
    model, _ = tiny
    K, tokens = 2, 12
    params = {"tokens": tokens, "K": K, "strategy": strategy, "query": "instruction"}
    if heads is not None:
        params["heads"] = heads
    with finepruner.apply(model, "finepruner", **params) as handle, torch.no_grad():
        model(**batch)
    rows = instruction_rows(tiny_eager[0], batch, K - 1)
    for row, attn in enumerate(rows):
        chosen = torch.arange(attn.shape[0]) if strategy == "all" else head_lib.select(attn, strategy, heads=heads)
        if strategy != "all":
            assert torch.equal(handle.heads[0][row], chosen)
        reference = attn[chosen].mean(0).topk(tokens).indices.sort().values
        assert torch.equal(handle.kept[0][row], reference)


def test_differs_from_last_query(tiny, batch):
    model, _ = tiny
    kept = {}
    for query in ("last", "instruction"):
        with finepruner.apply(model, "finepruner", tokens=8, strategy="sum", heads=2, query=query) as h:
            with torch.no_grad():
                model(**batch)
        kept[query] = h.kept[0]
    assert not torch.equal(kept["last"], kept["instruction"])


def test_padded_batch_equals_single(tiny, batch):
    model, processor = tiny
    params = {"tokens": 10, "strategy": "sum", "heads": 2, "query": "instruction"}
    with finepruner.apply(model, "finepruner", **params) as handle, torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    batched = handle.kept[0]
    for i in range(batched.shape[0]):
        with finepruner.apply(model, "finepruner", **params) as alone, torch.no_grad():
            model.generate(**single(processor, i), max_new_tokens=3, do_sample=False)
        assert torch.equal(alone.kept[0][0], batched[i])


def test_bad_query_and_incompatible_strategy_raise():
    with pytest.raises(ValueError, match="query='first'.*allowed"):
        finepruner.methods.get("finepruner")(tokens=8, heads=2, query="first")
    with pytest.raises(ValueError, match="sparsevlm_priority"):
        finepruner.methods.get("finepruner")(tokens=8, strategy="sparsevlm_priority", query="instruction")
