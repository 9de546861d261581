"""The torchvision-free Qwen processor and loading Qwen checkpoints (``finepruner.models.qwen_processor``)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLProcessor

import finepruner
from finepruner.models.loading import MissingPackageError, load_model
from finepruner.models.qwen_processor import QwenImageProcessor
from finepruner.models.tiny_families import build_tiny_qwen2_5_vl, tiny_image

IMAGES = [tiny_image(168, 112, 0), tiny_image(84, 84, 1), tiny_image(56, 112, 2)]


class _OfficialWithoutVideo(Qwen2_5_VLProcessor):
    """The official processor built without its video processor (which needs torchvision, spec §6)."""

    def check_argument_for_proper_class(self, name, arg):
        return None if arg is None else super().check_argument_for_proper_class(name, arg)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen2_5_vl(seed=0)


def _prompts(processor) -> list[str]:
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "which ?"}]}]
    return [processor.apply_chat_template(c, add_generation_prompt=True) for c in (one, two)]


def test_outputs_equal_the_official_processor(tiny):
    _, processor = tiny
    official = _OfficialWithoutVideo(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                     video_processor=None, chat_template=processor.chat_template)
    prompts = _prompts(processor)
    ours = processor(text=prompts, images=IMAGES, padding=True, return_tensors="pt")
    theirs = official(text=prompts, images=IMAGES, padding=True, return_tensors="pt")
    assert set(ours) == set(theirs) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                        "mm_token_type_ids"}
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["attention_mask"][:, 0].tolist() == [1, 0] and bool(ours["attention_mask"][:, -1].all())  # left
    assert ours["image_grid_thw"].tolist() == [[1, 8, 12], [1, 6, 6], [1, 8, 4]]


def test_placeholder_and_video_errors(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="1 <|image_pad|> placeholders but 2 images"):
        processor(text=[_prompts(processor)[0]], images=IMAGES[:2])
    with pytest.raises(MissingPackageError, match=r"pip install finepruner\[qwen\]"):
        processor(text=["hello"], videos=[[IMAGES[0]]])


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    model, processor = tiny
    directory = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_load_model_uses_the_builtin_processor_without_torchvision(tiny, checkpoint):
    model, processor = tiny
    loaded, loaded_processor = load_model(checkpoint, dtype="float32")
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert isinstance(loaded_processor, QwenImageProcessor) and loaded_processor.tokenizer.padding_side == "left"
    prompts = _prompts(processor)
    a = processor(text=prompts, images=IMAGES)
    b = loaded_processor(text=prompts, images=IMAGES)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded_processor.chat_template == processor.chat_template
    with torch.no_grad():
        assert torch.equal(model(**a).logits, loaded(**b).logits)
    with finepruner.apply(loaded, "fastv", tokens=4, K=2) as handle, torch.no_grad():
        loaded.generate(**b, max_new_tokens=2, do_sample=False)
    assert (handle.kept[0] >= 0).sum(dim=1).tolist() == [4, 8]


def test_processor_kwargs_reach_the_image_processor(checkpoint):
    _, small = load_model(checkpoint, processor_kwargs={"max_pixels": 28 * 28 * 8})
    grid = small(text=["<|vision_start|><|image_pad|><|vision_end|> what ?"], images=[IMAGES[0]])["image_grid_thw"]
    assert int(grid.prod()) // 4 <= 8
    with pytest.raises(ValueError, match="processor_kwargs \\['max_tokens'\\] are not image-processor options"):
        load_model(checkpoint, processor_kwargs={"max_tokens": 3})
    with pytest.raises(ValueError, match="processor='fast' is not available on qwen2_5_vl; allowed: auto"):
        load_model(checkpoint, processor="fast")


def test_official_processor_without_torchvision_names_the_extra(checkpoint):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    with pytest.raises(MissingPackageError, match=r"pip install finepruner\[qwen\]"):
        load_model(checkpoint, processor="official")
