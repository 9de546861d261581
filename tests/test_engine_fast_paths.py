"""What the engine does not redo: a call that prunes nothing runs the model's own forward (vanilla costs what
plain transformers costs, ``docs/performance.md``), and the cheap last-query signal reuses the score layer's
keys from the KV cache instead of running its ``k_proj`` again (``transformers_notes.md`` §3.1)."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.engine import loop
from finepruner.engine.signals import last_query_attention
from finepruner.models.tiny import build_tiny_llava
from tests.conftest import PROMPTS, noise_images

IMAGE_TOKEN_ID = 4
NUM_VISUAL = 64
GEN = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
       "suppress_tokens": [IMAGE_TOKEN_ID]}


def _refuse(*args, **kwargs):
    raise AssertionError("the engine's own decoder loop ran for a call that prunes nothing")


def test_vanilla_runs_the_models_own_forward(tiny, batch, monkeypatch):
    model, _ = tiny
    with torch.no_grad():
        plain = model.generate(**batch, **GEN)
    monkeypatch.setattr(loop, "_prefill", _refuse)
    monkeypatch.setattr(loop, "_decode", _refuse)
    with finepruner.apply(model, "vanilla") as handle, torch.no_grad():
        ours = model.generate(**batch, **GEN)
    assert torch.equal(plain.sequences, ours.sequences)
    for a, b in zip(plain.scores, ours.scores, strict=True):
        assert torch.equal(a, b)  # bit for bit: the same kernels run
    layers = model.config.text_config.num_hidden_layers
    assert handle.stats.sequence_length == [batch["input_ids"].shape[1]] * layers
    assert handle.stats.visual_tokens == [NUM_VISUAL] * layers
    assert handle.stats.batch == 3 and handle.stats.flops["language_model"] > 0
    assert handle.kept == [] and handle.heads == [] and handle.attention == []


def test_vanilla_allows_output_attentions_and_pruning_refuses_them(tiny_eager, batch):
    model, _ = tiny_eager
    with torch.no_grad():
        plain = model(**batch, output_attentions=True)
        with finepruner.apply(model, "vanilla"):
            ours = model(**batch, output_attentions=True)
        for a, b in zip(plain.attentions, ours.attentions, strict=True):
            assert torch.equal(a, b)
        with finepruner.apply(model, "fastv", tokens=16), pytest.raises(ValueError, match="output_attentions"):
            model(**batch, output_attentions=True)


def _count_k_proj(layer, calls: list[int]):
    return layer.self_attn.k_proj.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name, params", [("fastv", {"tokens": 16, "K": 2}),
                                          ("finepruner", {"tokens": 16, "K": 2, "heads": 2})])
def test_cheap_signal_does_not_rerun_the_score_layers_k_proj(tiny, batch, name, params, use_cache):
    model, _ = tiny
    length = batch["input_ids"].shape[1]
    calls: list[int] = []
    hook = _count_k_proj(model.model.language_model.layers[params["K"] - 1], calls)
    try:
        with finepruner.apply(model, name, **params) as handle, torch.no_grad():
            model(**batch, use_cache=use_cache)
    finally:
        hook.remove()
    assert calls == [length]  # the layer's own attention only
    assert handle.stats.score_keys_reused == [True]


def test_score_impl_recompute_projects_the_keys_again_with_the_same_kept_set(tiny, batch):
    model, _ = tiny
    kept = {}
    for impl in ("cheap", "recompute"):
        calls: list[int] = []
        hook = _count_k_proj(model.model.language_model.layers[1], calls)
        try:
            with finepruner.apply(model, "fastv", tokens=16, K=2, score_impl=impl) as handle, torch.no_grad():
                model(**batch)
        finally:
            hook.remove()
        assert len(calls) == (1 if impl == "cheap" else 2), impl
        assert handle.stats.score_keys_reused == [impl == "cheap"]
        kept[impl] = handle.kept[0]
    assert torch.equal(kept["cheap"], kept["recompute"])  # float32: the same keys, the same ranking


def test_pdrop_scores_with_the_next_layer_so_its_keys_are_computed(tiny, batch):
    """PDrop's score layer l runs after the stage, on the kept tokens: its keys over all current tokens are
    not in the cache, so the signal projects them (and the FLOPs count says so)."""
    model, _ = tiny
    calls: list[int] = []
    with finepruner.apply(model, "pdrop", layers=[1, 2], ratios=[0.5, 0.25]) as handle:
        hook = _count_k_proj(model.model.language_model.layers[1], calls)
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            hook.remove()
    length = batch["input_ids"].shape[1]
    assert calls == [length, length - NUM_VISUAL // 2]  # the signal on every token, then the layer on the kept
    assert handle.stats.score_keys_reused == [False, False]


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cached_keys_give_the_recomputed_signal(kv_heads):
    """In float32 the cache's keys (after RoPE) are bit for bit the recomputed ones; the signal then differs only
    by the matmul's rounding for another memory layout (<= 1e-7 here) and ranks the tokens the same way."""
    model, processor = build_tiny_llava(seed=1, qk_scale=8.0, attn_implementation="eager", text_kv_heads=kv_heads)
    inputs = processor(images=noise_images(3), text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs, use_cache=True, output_attentions=True, output_hidden_states=True)
        lm = model.model.language_model
        positions = torch.arange(inputs["input_ids"].shape[1])[None].expand(3, -1)
        for index, layer in enumerate(lm.layers):
            hidden = out.hidden_states[index]
            embeddings = lm.rotary_emb(hidden, position_ids=positions)
            recomputed = last_query_attention(layer, hidden, embeddings, inputs["attention_mask"])
            cached = last_query_attention(layer, hidden, embeddings, inputs["attention_mask"],
                                          rotated_keys=out.past_key_values.layers[index].keys)
            assert cached.dtype == torch.float32
            assert (cached - recomputed).abs().max().item() <= 1e-6
            assert torch.equal(cached.mean(1).argsort(dim=-1, stable=True),
                               recomputed.mean(1).argsort(dim=-1, stable=True))
            assert (cached - out.attentions[index][:, :, -1, :]).abs().max().item() <= 1e-5
