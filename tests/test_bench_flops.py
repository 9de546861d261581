"""The analytic FLOPs model against hand-computed values, the papers' sanity numbers, PruneStats.flops,
and the eager scoring option."""

from __future__ import annotations

import json

import pytest
import torch

import finepruner
from finepruner.bench import flops as F
from finepruner.engine.signals import eager_last_query_attention, last_query_attention
from tests.conftest import PROMPTS, noise_images

# d=8, m=16, 2 layers, 2 query heads of 4 sharing 1 kv head (GQA), vocab 10
SMALL = F.DecoderShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)
LLAVA_7B = F.DecoderShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32064)


def test_decoder_layer_by_hand():
    layer = F.decoder_layer_flops(SMALL, 3)
    # q,k,v,o: 2*3*8*(8 + 2*4) + 2*3*8*8 = 768 + 384
    assert layer["projections"] == 1152
    # QK^T and AV over the full 3 x 3 square: 2*2*9*8
    assert layer["attention"] == 288
    # SwiGLU gate, up, down: 2*3*3*8*16
    assert layer["mlp"] == 2304
    assert layer["total"] == 3744
    assert F.decoder_layer_flops(SMALL, 3, causal=True)["attention"] == 2 * 2 * 6 * 8  # 6 causal pairs
    ungated = F.DecoderShape(**{**SMALL.__dict__, "gated": False})
    assert F.decoder_layer_flops(ungated, 3)["mlp"] == 2 * 2 * 3 * 8 * 16


def test_prefill_schedule_and_decode_by_hand():
    # a pruned schedule: 3 tokens in layer 0, 2 in layer 1, batch 2
    report = F.prefill_flops(SMALL, [3, 2], batch=2)
    layer1 = 2 * 2 * 8 * 16 + 2 * 2 * 8 * 8 + 2 * 2 * 4 * 8 + 2 * 3 * 2 * 8 * 16  # 768 + 128 + 1536
    assert layer1 == 2432
    assert report["layers"] == [2 * 3744, 2 * 2432]
    assert report["decoder"] == 12352
    assert report["lm_head"] == 2 * (2 * 8 * 10)  # last token of each sample
    assert report["total"] == 12352 + 320
    # one decode step after that prefill: layer 0 attends to 3 + 1 keys, layer 1 to 2 + 1
    step0 = 384 + 2 * 2 * 4 * 8 + 768
    step1 = 384 + 2 * 2 * 3 * 8 + 768
    assert F.decode_step_flops(SMALL, [3, 2], batch=2) == 2 * (step0 + step1 + 160)
    with pytest.raises(ValueError):
        F.prefill_flops(SMALL, [3], batch=1)


def test_scoring_flops_by_hand():
    # cheap: q of the last token 2*8*8, k over n=5 tokens 2*5*8*4, one 1 x 5 product per head 2*5*8
    assert F.scoring_flops(SMALL, 5) == 128 + 320 + 80
    # eager: q and k over 5 tokens 2*5*8*(8+4), the 5 x 5 product 2*25*8
    assert F.scoring_flops(SMALL, 5, "eager") == 960 + 400
    assert F.scoring_flops(SMALL, 5, keys_reused=True) == 128 + 80  # no k projection
    assert F.prefill_flops(SMALL, [5, 3], score_lengths=[5, 3], score_keys_reused=[True])["scoring"] == (
        208 + 128 + 192 + 48)
    assert F.prefill_flops(SMALL, [5, 3], score_lengths=[5])["scoring"] == 528


def test_paper_sanity_numbers_llava_1_5_7b():
    """spec methods.md §0.4: 90 non-image tokens, 4nd² + 2n²d + 2ndm, multiply-add = 1."""
    tflops = [F.paper_flops(LLAVA_7B, [90 + v] * 32) / F.TFLOP for v in (576, 192, 128, 64)]
    assert [round(t, 2) for t in tflops] == [3.47, 1.44, 1.11, 0.78]
    fastv = F.paper_flops(LLAVA_7B, [666] * 2 + [90 + 288] * 30) / F.TFLOP  # K=2, R=50%
    assert round(fastv, 2) == 2.04
    pdrop = F.paper_flops(LLAVA_7B, [666] * 8 + [378] * 8 + [234] * 8 + [162] * 8) / F.TFLOP  # default schedule
    assert round(pdrop, 2) == 1.86
    # our convention: multiply-add = 2 and the SwiGLU gate; the gate variant is SparseVLM's 3ndm
    ours = F.prefill_flops(LLAVA_7B, [666] * 32)["decoder"]
    assert ours == 2 * F.paper_flops(LLAVA_7B, [666] * 32, gate=True)


def test_vision_tower_and_projector_by_hand():
    vision = F.VisionShape(hidden=4, intermediate=8, layers=3, image_size=4, patch=2, channels=3, projector_out=6)
    assert (vision.patches, vision.tokens, vision.layers_used) == (4, 5, 2)
    per_layer = 2 * (4 * 5 * 16 + 2 * 25 * 4 + 2 * 5 * 4 * 8)
    embed = 2 * 4 * 3 * 2 * 2 * 4
    report = F.vision_flops(vision, images=2)
    assert report["total"] == 2 * (embed + 3 * per_layer)
    assert report["layers_run"] == 3
    assert F.projector_flops(vision, images=2) == 2 * 2 * 4 * (4 * 6 + 6 * 6)
    # CLIP ViT-L/14-336: 577 tokens through 24 layers
    clip = F.VisionShape(hidden=1024, intermediate=4096, layers=24, image_size=336, patch=14, channels=3,
                         projector_out=4096)
    assert clip.tokens == 577 and clip.layers_used == 23


def test_kv_cache_bytes_analytic():
    assert F.kv_cache_bytes(SMALL, [3, 2], batch=2, bytes_per_value=4) == 2 * 2 * 4 * 4 * 5


def test_prune_stats_flops(tiny, batch):
    model, _ = tiny
    with finepruner.apply(model, "fastv", tokens=16, K=2) as handle, torch.no_grad():
        model(**batch)
    stats = handle.stats
    assert stats.batch == 3 and stats.score_lengths == [stats.sequence_length[1]]
    assert stats.score_keys_reused == [True]  # FastV scores with layer K-1, whose keys are in the cache
    assert stats.selection_seconds > 0
    shape = F.DecoderShape.from_config(model.config)
    expected = F.prefill_flops(shape, stats.sequence_length, 3, stats.score_lengths, score_keys_reused=[True])
    report = stats.flops
    assert report["decoder"] == expected["decoder"]
    assert report["language_model"] == expected["total"]
    assert report["vision_tower"] == F.vision_flops(F.VisionShape.from_config(model.config), 3)["total"]
    assert report["decode_step"] == F.decode_step_flops(shape, stats.sequence_length, 3)
    assert report["total"] == expected["total"] + report["vision_tower"] + report["projector"]
    json.dumps(stats.as_dict())  # JSON-serialisable, for eval runs' records


def test_eager_signal_equals_cheap_signal(tiny):
    model, processor = tiny
    inputs = processor(images=noise_images(3), text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    lm = model.model.language_model
    positions = torch.arange(inputs["input_ids"].shape[1])[None].expand(3, -1)
    hidden = out.hidden_states[1]
    embeddings = lm.rotary_emb(hidden, position_ids=positions)
    with torch.no_grad():
        cheap = last_query_attention(lm.layers[1], hidden, embeddings, inputs["attention_mask"])
        eager = eager_last_query_attention(lm.layers[1], hidden, embeddings, inputs["attention_mask"])
    assert eager.dtype == torch.float32
    assert (cheap - eager).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name, params", [("fastv", {"tokens": 16}), ("pdrop", {"tokens": 32}),
                                          ("finepruner", {"tokens": 16, "heads": 2})])
def test_score_impl_eager_keeps_the_same_tokens(tiny, batch, name, params):
    model, _ = tiny
    kept = {}
    for impl in ("cheap", "eager"):
        with finepruner.apply(model, name, score_impl=impl, **params) as handle, torch.no_grad():
            model(**batch)
        kept[impl] = handle.kept
        assert handle.stats.score_impl == impl
    assert all(torch.equal(a, b) for a, b in zip(kept["cheap"], kept["eager"], strict=True))
    with pytest.raises(ValueError, match="score_impl"):
        finepruner.methods.create(name, score_impl="flash", **params)
