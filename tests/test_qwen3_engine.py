"""The engine on Qwen3-VL: deepstack features pruned with the visual tokens, q/k norm in the cheap score.

References are plain transformers: ``generate`` without a method, and the decoder layers of the stock text
model run by hand on the kept tokens with their original 3-D positions and the deepstack levels from which
the same tokens were removed by hand (``spec/models.md`` §2.3, §7.2).
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import finepruner
from finepruner.methods.base import PruningMethod, Stage
from finepruner.models.adapters import Qwen3VLAdapter, adapter_for
from finepruner.models.tiny_families import build_tiny_qwen3_vl, qwen_chat_inputs, tiny_image

QUESTIONS = ["what color is the circle ?", "how many red objects are there ?", "which one is on the left ?",
             "what is the color of the sky ?"]
#: 24, 9, 12 + 8 visual tokens (32-px merged units) and a text-only row.
IMAGES = [[tiny_image(192, 128, 1)], [tiny_image(96, 96, 2)], [tiny_image(128, 96, 3), tiny_image(64, 128, 4)], []]
COUNTS = [[24], [9], [12, 8], []]
_CACHE: dict[str, tuple] = {}


def tiny(attn: str = "sdpa"):
    if attn not in _CACHE:
        torch.set_num_threads(2)
        _CACHE[attn] = build_tiny_qwen3_vl(seed=0, attn=attn, qk_scale=8.0)
    return _CACHE[attn]


def inputs_for(processor, rows):
    return qwen_chat_inputs(processor, [QUESTIONS[r] for r in rows], [IMAGES[r] for r in rows])


def generate(model, inputs, **extra):
    options = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
               "suppress_tokens": [int(model.config.image_token_id)], **extra}
    with torch.no_grad():
        return model.generate(**inputs, **options)


def assert_same(pruned, reference, atol: float = 1e-5) -> None:
    assert torch.equal(pruned.sequences, reference.sequences)
    for x, y in zip(pruned.scores, reference.scores, strict=True):
        finite = torch.isfinite(x) & torch.isfinite(y)
        assert (x[finite] - y[finite]).abs().max().item() <= atol


class KeepAll(PruningMethod):
    name = "keep_all"

    def __init__(self, layers):
        super().__init__(None)
        self.layers = layers

    def plan(self, num_layers, num_visual):
        return [Stage(layer=layer, keep=num_visual) for layer in self.layers]

    def select(self, stage_index, stage, ctx):
        return torch.arange(ctx.num_visual).expand(ctx.visual_ids.shape[0], -1)


class EveryOther(PruningMethod):
    name = "every_other"

    def __init__(self, layers):
        super().__init__(None)
        self.layers = layers

    def plan(self, num_layers, num_visual):
        return [Stage(layer=layer, keep=len(range(0, num_visual, 2))) for layer in self.layers]

    def select(self, stage_index, stage, ctx):
        return torch.arange(0, ctx.num_visual, 2).expand(ctx.visual_ids.shape[0], -1)


def test_the_family_is_registered_with_deepstack():
    model, _ = tiny()
    assert isinstance(adapter_for(model), Qwen3VLAdapter)
    assert list(model.config.vision_config.deepstack_visual_indexes) == [0, 1]  # injections after LM layers 0, 1


@pytest.mark.parametrize(("attn", "layers"), [("sdpa", None), ("sdpa", (0,)), ("sdpa", (1,)), ("sdpa", (0, 2)),
                                              ("eager", None), ("eager", (0, 2))])
def test_keep_all_equals_transformers(attn, layers):
    """Keep-all stages before and between the deepstack layers change nothing (the injections follow the
    tokens through the re-padded batch)."""
    model, processor = tiny(attn)
    inputs = inputs_for(processor, [0, 1, 2, 3])
    reference = generate(model, inputs)
    method = "vanilla" if layers is None else KeepAll(layers)
    with finepruner.apply(model, method):
        assert_same(generate(model, inputs), reference)


def _reference_scores(model, inputs, kept_ids, stage_layer, generated):
    """Per step, the last-token logits of the stock decoder layers run by hand over prompt + generated tokens:
    the unkept image tokens removed before ``stage_layer``, every deepstack level restricted by hand to the
    kept tokens' rows from then on (batch 1, no padding)."""
    inner = model.model
    lm = inner.language_model
    with torch.no_grad():
        encoded = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        features = torch.cat(encoded.pooler_output)
        levels = [torch.cat(level) for level in encoded.deepstack_features]
        rows, _ = inner.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                       image_grid_thw=inputs["image_grid_thw"])
    visual = inputs["input_ids"][0] == model.config.image_token_id
    kept_visual = torch.zeros(int(visual.sum()), dtype=torch.bool)
    kept_visual[kept_ids] = True
    scores = []
    for step in range(len(generated) + 1):
        ids = torch.cat([inputs["input_ids"][0], generated[:step]])
        extra = torch.arange(1, step + 1).view(1, 1, -1) + rows[:, :, -1:]
        positions = torch.cat([rows, extra], dim=2)
        vis = torch.cat([visual, torch.zeros(step, dtype=torch.bool)])
        with torch.no_grad():
            hidden = inner.get_input_embeddings()(ids)[None].clone()
            hidden[0, vis] = features
            current_levels = levels
            for index, layer in enumerate(lm.layers):
                if index == stage_layer:
                    keep = ~vis.clone()
                    keep[vis.nonzero()[:, 0][kept_visual]] = True
                    hidden, positions, vis = hidden[:, keep], positions[:, :, keep], vis[keep]
                    current_levels = [level[kept_visual] for level in levels]  # the same tokens, by hand
                cos, sin = lm.rotary_emb(hidden, positions)
                mask = create_causal_mask(config=lm.config, inputs_embeds=hidden,
                                          attention_mask=torch.ones(1, hidden.shape[1], dtype=torch.long),
                                          cache=None, position_ids=None)
                hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
                if index < len(current_levels):
                    hidden = hidden.clone()
                    hidden[0, vis] = hidden[0, vis] + current_levels[index]
            scores.append(model.lm_head(lm.norm(hidden[:, -1])))
    return scores


@pytest.mark.parametrize("stage_layer", [0, 1, 2])
@pytest.mark.parametrize("row", [0, 2])
def test_pruning_with_deepstack_equals_removing_the_tokens_from_the_features_by_hand(stage_layer, row):
    model, processor = tiny()
    inputs = inputs_for(processor, [row])
    with finepruner.apply(model, EveryOther((stage_layer,))) as handle:
        out = generate(model, inputs)
    kept = handle.kept[0][0]
    assert kept.tolist() == [i for c, start in zip(COUNTS[row], [0, *COUNTS[row][:-1]], strict=True)
                             for i in range(start, start + c, 2)]
    generated = out.sequences[0, inputs["input_ids"].shape[1]:]
    reference = _reference_scores(model, inputs, kept, stage_layer, generated[:-1])
    for step, expected in enumerate(reference):
        finite = torch.isfinite(out.scores[step])
        assert (expected[finite] - out.scores[step][finite]).abs().max().item() <= 1e-4, step


@pytest.mark.parametrize("method", ["fastv", "vispruner", "cdpruner", "sparsevlm"])
def test_padded_batch_equals_each_sample_alone(method):
    model, processor = tiny()
    params = {"fastv": {"tokens": 4, "K": 1}, "sparsevlm": {"layers": [0, 1, 2], "keeps": [7, 5, 3]},
              "pdrop": {"layers": [1, 2], "ratios": [0.5, 0.5]}}.get(method, {"tokens": 4})
    inputs = inputs_for(processor, [0, 1, 2, 3])
    with finepruner.apply(model, method, processor=processor, **params) as handle:
        together = generate(model, inputs)
        kept = handle.kept[0].clone()
        for row in range(4):
            alone = generate(model, inputs_for(processor, [row]))
            new = len(alone.scores)
            start = together.sequences.shape[1] - len(together.scores)
            assert torch.equal(together.sequences[row, start:start + new], alone.sequences[0, -new:])
            for step, scores in enumerate(alone.scores):
                diff = (scores[0] - together.scores[step][row]).nan_to_num(0.0, 0.0, 0.0)
                assert diff.abs().max().item() <= 1e-4
            if IMAGES[row]:
                width = handle.kept[0].shape[1]
                assert torch.equal(kept[row, :width], handle.kept[0][0])


def test_fastv_with_q_k_norm_keeps_the_top_tokens_by_eager_attention():
    """The cheap last-query score applies q_norm/k_norm: FastV's kept set equals the eager attention's."""
    model, processor = tiny("eager")
    for row in range(3):
        inputs = inputs_for(processor, [row])
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        scores = attentions[1][0, :, -1, image].float().mean(dim=0)
        expected, offset = [], 0
        for count in COUNTS[row]:
            expected.append(scores[offset:offset + count].topk(4).indices.sort().values + offset)
            offset += count
        with finepruner.apply(model, "fastv", tokens=4, K=2) as handle, torch.no_grad():
            model(**inputs)
        assert handle.kept[0][0].tolist() == torch.cat(expected).tolist()


def test_beam_search_and_several_sequences_equal_transformers():
    """generate repeats positions (dim 1 of the 3-D tensor), encoder outputs and deepstack levels for beams;
    keep-all through two stages changes nothing and a pre-LLM method keeps the same tokens in every copy."""
    model, processor = tiny()
    inputs = inputs_for(processor, [0, 1])
    options = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 3}
    reference = generate(model, inputs, **options)
    with finepruner.apply(model, KeepAll((0, 2))):
        assert_same(generate(model, inputs, **options), reference)
    with finepruner.apply(model, "vispruner", tokens=4) as handle:
        generate(model, inputs, **options)
    kept = handle.kept[0]
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[2], kept[3]) and kept.shape == (4, 4)
