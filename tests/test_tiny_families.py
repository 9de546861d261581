"""Tiny LLaVA-NeXT / LLaVA-OneVision from config and their processor-free inputs (spec/models.md §1.1,
§1.2, §6): inputs equal the real processors' output, token counts match the spec and the models' own
packing, forward and generate run, and a padded batch row equals the sample alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaOnevisionProcessor

from finepruner.models.tiny_families import (
    TinyNextSpec,
    TinyOnevisionSpec,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    next_image_token_count,
    next_inputs,
    onevision_image_token_count,
    onevision_inputs,
    tiny_image,
    visual_token_counts,
)

ATTNS = ("sdpa", "eager")

#: spec/models.md §6 counts of the tiny NeXT, keyed by (height, width) of the image.
NEXT_SPEC_COUNTS = {(40, 60): 70, (60, 40): 72, (64, 64): 88, (30, 90): 68, (32, 32): 36}

NEXT_PROMPTS = [
    "USER: <image>\nwhat color is the circle ? ASSISTANT:",
    "USER: how many objects are there ? ASSISTANT:",
    "USER: <image>\nis there a square ? ASSISTANT:",
    "USER: <image> <image>\nwhich image is left ? ASSISTANT:",
]
OV_PROMPTS = [
    "<|im_start|>user <image>\nwhat color is the circle ?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user <image> <image>\nwhich image is left ?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nhow many objects are there ?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user <image>\nis there a square ?<|im_end|>\n<|im_start|>assistant\n",
]


def _next_images():
    """One list per NEXT_PROMPTS row: three sizes (two counts differ), none, and two images."""
    return [[tiny_image(60, 40, 1)], [], [tiny_image(40, 64, 2)], [tiny_image(90, 30, 3), tiny_image(32, 32, 4)]]


def _ov_images():
    """One list per OV_PROMPTS row: batch_num_images mixes 1 and 2 (and a text-only row)."""
    return [[tiny_image(60, 40, 1)], [tiny_image(40, 60, 2), tiny_image(64, 64, 3)], [], [tiny_image(96, 50, 4)]]


@pytest.fixture(scope="module")
def next_models():
    torch.set_num_threads(2)
    return {attn: build_tiny_llava_next(seed=0, attn=attn) for attn in ATTNS}


@pytest.fixture(scope="module")
def ov_models():
    torch.set_num_threads(2)
    return {attn: build_tiny_llava_onevision(seed=0, attn=attn) for attn in ATTNS}


class _OnevisionProcessorNoVideo(LlavaOnevisionProcessor):
    """The real OneVision processor without its video processor (spec §6 workaround (a): the check of
    the attribute classes fails without torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _last_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, position_ids=_positions(inputs["attention_mask"]))
    return out.logits[:, -1]


# -- builders ------------------------------------------------------------------------------------------


def test_next_model_shape(next_models):
    model, processor = next_models["sdpa"]
    text, vision = model.config.text_config, model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (32, 8, 32, 3)
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    assert processor.tokenizer.padding_side == "left"
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == processor.image_token_id == image_id
    assert type(model.model.language_model).__name__ == "LlamaModel"


def test_onevision_model_shape(ov_models):
    model, image_processor, tokenizer = ov_models["sdpa"]
    text, vision = model.config.text_config, model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (32, 8, 32, 2)
    assert not vision.vision_use_head
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "full"
    assert model.config.image_grid_pinpoints == image_processor.image_grid_pinpoints
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<video>")
    assert max(model.config.image_token_id, model.config.video_token_id) < text.vocab_size
    assert type(model.model.language_model).__name__ == "Qwen2Model"


def test_same_seed_same_weights_for_both_attentions_and_rng_untouched(next_models, ov_models):
    for models in (next_models, ov_models):
        sdpa, eager = models["sdpa"][0], models["eager"][0]
        assert eager.config.text_config._attn_implementation == "eager"
        assert eager.config.vision_config._attn_implementation == "eager"
        for (name, a), b in zip(sdpa.state_dict().items(), eager.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    state = torch.random.get_rng_state()
    other, _ = build_tiny_llava_next(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = other.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, next_models["sdpa"][0].model.language_model.layers[0].self_attn.q_proj.weight)


def test_spec_overrides_and_qk_scale():
    model, _ = build_tiny_llava_next(text_layers=3, qk_scale=4.0)
    base, _ = build_tiny_llava_next(TinyNextSpec(text_layers=3))
    assert model.config.text_config.num_hidden_layers == 3
    q, q0 = (m.model.language_model.layers[0].self_attn.q_proj.weight for m in (model, base))
    torch.testing.assert_close(q, 4.0 * q0)
    ov, _, _ = build_tiny_llava_onevision(TinyOnevisionSpec(vision_aspect_ratio="anyres_max_4"), text_layers=3)
    assert ov.config.vision_aspect_ratio == "anyres_max_4" and ov.config.text_config.num_hidden_layers == 3


def test_chat_templates(next_models, ov_models):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    _, processor = next_models["sdpa"]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt == "USER: <image>\nwhat color ? ASSISTANT:"
    _, _, tokenizer = ov_models["sdpa"]
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user <image>\nwhat color ?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt).input_ids
    assert tokenizer.unk_token_id not in ids and ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1


def test_tiny_image_is_deterministic():
    image = tiny_image(60, 40, seed=3)
    assert image.size == (60, 40) and image.mode == "RGB"
    assert image.tobytes() == tiny_image(60, 40, seed=3).tobytes()
    assert image.tobytes() != tiny_image(60, 40, seed=4).tobytes()


# -- token counts --------------------------------------------------------------------------------------


def test_next_counts_match_spec_processor_and_model(next_models):
    model, processor = next_models["sdpa"]
    sizes = list(NEXT_SPEC_COUNTS)
    images = [tiny_image(w, h, seed) for seed, (h, w) in enumerate(sizes)]
    prompts = ["USER: <image> what ASSISTANT:"] * len(images)
    expected = [NEXT_SPEC_COUNTS[size] for size in sizes]
    assert [next_image_token_count(model.config, h, w) for h, w in sizes] == expected
    reference = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (reference["input_ids"] == processor.image_token_id).sum(1).tolist() == expected
    assert visual_token_counts(model, reference) == expected
    assert reference["image_sizes"].tolist() == [list(size) for size in sizes]
    # crops per image: base + tiles (30 x 90: 4, 32 x 32: 3)
    assert (reference["pixel_values"].flatten(2).abs().sum(-1) > 0).sum(1).tolist() == [5, 5, 5, 4, 3]


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_4", "anyres_max_1"])
def test_onevision_counts_match_model(aspect):
    model, image_processor, tokenizer = build_tiny_llava_onevision(vision_aspect_ratio=aspect)
    sizes = [(40, 60), (60, 40), (64, 64), (30, 90), (32, 32), (96, 50), (100, 100), (20, 70)]
    images = [[tiny_image(w, h, seed)] for seed, (h, w) in enumerate(sizes)]
    prompts = ["<|im_start|>user <image>\nwhat<|im_end|>"] * len(images)
    inputs = onevision_inputs(model, image_processor, tokenizer, prompts, images)
    counts = [onevision_image_token_count(model.config, h, w) for h, w in sizes]
    assert visual_token_counts(model, inputs) == counts
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == counts
    if aspect == "anyres_max_9":
        assert counts[:5] == [70, 72, 88, 68, 36]  # the NeXT counts: same grids, no [CLS] to drop
    else:  # the downsampling branch of §1.2 is exercised
        default = build_tiny_llava_onevision()[0].config
        assert counts != [onevision_image_token_count(default, h, w) for h, w in sizes]


def test_onevision_multi_image_is_base_only(ov_models):
    model, image_processor, tokenizer = ov_models["sdpa"]
    inputs = onevision_inputs(model, image_processor, tokenizer, OV_PROMPTS, _ov_images())
    assert inputs["batch_num_images"].tolist() == [1, 2, 1]
    assert onevision_image_token_count(model.config, 40, 60, multi_image=True) == 17
    counts = visual_token_counts(model, inputs)
    assert counts[1:3] == [17, 17]
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [
        counts[0], 34, 0, counts[3]]


# -- inputs equal the processors' ----------------------------------------------------------------------


def test_next_inputs_equal_processor(next_models):
    model, processor = next_models["sdpa"]
    images = _next_images()
    ours = next_inputs(model, processor, NEXT_PROMPTS, images)
    flat = [image for row in images for image in row]
    reference = processor(images=flat, text=NEXT_PROMPTS, padding=True, return_tensors="pt")
    assert set(ours) == set(reference) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    for key in reference:
        assert ours[key].dtype == reference[key].dtype, key
        assert torch.equal(ours[key], reference[key]), key
    assert ours["pixel_values"].shape == (4, 5, 3, 32, 32)
    assert (ours["attention_mask"][:, 0] == 0).any() and (ours["attention_mask"][:, -1] == 1).all()
    assert visual_token_counts(model, ours) == [70, 72, 68, 36]


def test_onevision_inputs_equal_processor(ov_models):
    model, image_processor, tokenizer = ov_models["sdpa"]
    processor = _OnevisionProcessorNoVideo(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio=model.config.vision_aspect_ratio,
    )
    images = _ov_images()
    ours = onevision_inputs(model, image_processor, tokenizer, OV_PROMPTS, images)
    reference = processor(images=images, text=OV_PROMPTS, padding=True, return_tensors="pt")
    assert set(ours) == set(reference)
    for key in reference:
        assert ours[key].dtype == reference[key].dtype, key
        assert torch.equal(ours[key], reference[key]), key
    assert ours["pixel_values"].shape[:2] == (4, 7)


def test_text_only_batch_and_validation(next_models, ov_models):
    model, processor = next_models["sdpa"]
    text_only = next_inputs(model, processor, ["USER: what ASSISTANT:", "USER: a b c ASSISTANT:"], [None, []])
    assert set(text_only) == {"input_ids", "attention_mask"}
    single = next_inputs(model, processor, ["USER: <image> what ASSISTANT:"], [tiny_image(60, 40)])
    assert (single["input_ids"] == processor.image_token_id).sum().item() == 70
    with pytest.raises(ValueError, match="placeholders"):
        next_inputs(model, processor, ["USER: <image> what ASSISTANT:"], [[]])
    with pytest.raises(ValueError, match="one per prompt"):
        next_inputs(model, processor, ["USER: what ASSISTANT:"], [])
    ov, image_processor, tokenizer = ov_models["sdpa"]
    other, _, _ = build_tiny_llava_onevision(pinpoints=((32, 32), (64, 64)))
    with pytest.raises(ValueError, match="pinpoints"):
        onevision_inputs(other, image_processor, tokenizer, ["<image> what"], [[tiny_image(32, 32)]])


# -- the models run, and a padded row equals the sample alone -----------------------------------------


@pytest.mark.parametrize("attn", ATTNS)
def test_next_forward_generate_and_rows_alone(next_models, attn):
    model, processor = next_models[attn]
    images = _next_images()
    inputs = next_inputs(model, processor, NEXT_PROMPTS, images)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[model.config.image_token_id],
                             output_logits=True, return_dict_in_generate=True)
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert out.sequences.shape == (4, inputs["input_ids"].shape[1] + 3)
    batched = _last_logits(model, inputs)
    for row, (prompt, row_images) in enumerate(zip(NEXT_PROMPTS, images, strict=True)):
        alone = next_inputs(model, processor, [prompt], [row_images])
        torch.testing.assert_close(_last_logits(model, alone)[0], batched[row], atol=1e-5, rtol=0)
        if row == 0:
            with torch.no_grad():
                single = model.generate(**alone, max_new_tokens=3, do_sample=False,
                                        suppress_tokens=[model.config.image_token_id],
                                        output_logits=True, return_dict_in_generate=True)
            assert torch.equal(single.sequences[0, -3:], out.sequences[row, -3:])
            for step_alone, step_batch in zip(single.logits, out.logits, strict=True):
                torch.testing.assert_close(step_alone[0], step_batch[row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTNS)
def test_onevision_forward_generate_and_rows_alone(ov_models, attn):
    model, image_processor, tokenizer = ov_models[attn]
    images = _ov_images()
    inputs = onevision_inputs(model, image_processor, tokenizer, OV_PROMPTS, images)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[model.config.image_token_id],
                             output_logits=True, return_dict_in_generate=True)
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert out.sequences.shape == (4, inputs["input_ids"].shape[1] + 3)
    batched = _last_logits(model, inputs)
    for row, (prompt, row_images) in enumerate(zip(OV_PROMPTS, images, strict=True)):
        alone = onevision_inputs(model, image_processor, tokenizer, [prompt], [row_images])
        torch.testing.assert_close(_last_logits(model, alone)[0], batched[row], atol=1e-5, rtol=0)
        if row == 1:
            with torch.no_grad():
                single = model.generate(**alone, max_new_tokens=3, do_sample=False,
                                        suppress_tokens=[model.config.image_token_id],
                                        output_logits=True, return_dict_in_generate=True)
            assert torch.equal(single.sequences[0, -3:], out.sequences[row, -3:])
            for step_alone, step_batch in zip(single.logits, out.logits, strict=True):
                torch.testing.assert_close(step_alone[0], step_batch[row], atol=1e-5, rtol=0)


def test_sdpa_equals_eager(next_models, ov_models):
    inputs = next_inputs(next_models["sdpa"][0], next_models["sdpa"][1], NEXT_PROMPTS, _next_images())
    torch.testing.assert_close(_last_logits(next_models["sdpa"][0], inputs),
                               _last_logits(next_models["eager"][0], inputs), atol=1e-5, rtol=0)
    model, image_processor, tokenizer = ov_models["sdpa"]
    inputs = onevision_inputs(model, image_processor, tokenizer, OV_PROMPTS, _ov_images())
    torch.testing.assert_close(_last_logits(model, inputs), _last_logits(ov_models["eager"][0], inputs),
                               atol=1e-5, rtol=0)
