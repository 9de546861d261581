"""Evaluation on the other families (spec/models.md §1.1): the prompt is the family's (LLaVA-NeXT: its
processor's chat template; LLaVA-1.5: the exact vicuna_v1 string), the image goes to the processor
unpadded on the anyres families, every processor output (``image_sizes``) reaches the model, and a
pruned tiny NeXT answers a POPE fixture end to end."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import make_pope

from finepruner.eval.io import read_answers
from finepruner.eval.prompting import build_prompt
from finepruner.eval.runner import EvalConfig, Generator, evaluate
from finepruner.models.tiny import build_tiny_llava
from finepruner.models.tiny_families import build_tiny_llava_next

QUESTION = "Is there a dog in the image?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def tiny_next():
    torch.set_num_threads(2)
    return build_tiny_llava_next(seed=0)


@pytest.fixture(scope="module")
def next_checkpoint(tiny_next, tmp_path_factory):
    model, processor = tiny_next
    directory = tmp_path_factory.mktemp("next_ckpt")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg") / "eval"
    make_pope(root)
    return root


def test_next_prompt_is_the_chat_template_and_the_image_is_not_padded(tiny_next):
    model, processor = tiny_next
    generator = Generator(model, processor)
    assert generator.image_aspect_ratio == "original"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert generator.build_prompt(QUESTION, True) == expected == f"USER: <image>\n{QUESTION} ASSISTANT:"
    assert generator.build_prompt("hello", False) == "USER: hello ASSISTANT:"
    assert Generator(model, processor, "pad").image_aspect_ratio == "pad"  # an explicit choice wins


def test_llava_prompt_stays_vicuna_v1():
    model, processor = build_tiny_llava(seed=0)
    generator = Generator(model, processor)
    assert generator.image_aspect_ratio == "pad"
    assert generator.build_prompt(QUESTION, True) == build_prompt(QUESTION, True)
    assert generator.build_prompt(QUESTION, False) == build_prompt(QUESTION, False)


def test_every_processor_output_reaches_the_model(tiny_next, monkeypatch):
    model, processor = tiny_next
    generator = Generator(model, processor)
    seen = {}
    real = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    from finepruner.models.tiny_families import tiny_image

    answers = generator.generate(["what color ?", "is it red ?"], [tiny_image(60, 40, 1), tiny_image(30, 90, 2)], 2)
    assert len(answers) == 2
    assert seen["image_sizes"].tolist() == [[40, 60], [90, 30]]
    assert seen["pixel_values"].dim() == 5  # [images, crops, 3, H, W]


def test_pruned_next_answers_pope_in_memory(tiny_next, pope_root, tmp_path):
    model, processor = tiny_next
    config = EvalConfig(benches=["pope"], data_root=str(pope_root), out=str(tmp_path / "run"), batch_size=2,
                        max_new_tokens=3, method="fastv", method_params={"tokens": 8, "K": 2}, progress=False,
                        model_id="tiny-next")
    metrics = evaluate(config, model=model, processor=processor)
    assert metrics["pope"]["complete"] and metrics["pope"]["errors"] == 0
    answers = read_answers(tmp_path / "run" / "pope" / "answers.jsonl")
    assert len(answers) == 6 and all(isinstance(a["text"], str) for a in answers)
    assert all(a["metadata"]["prune"]["average_visual_tokens"] < 40 for a in answers)  # pruned to 8 per image
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["family"] == "llava_next" and record["image_aspect_ratio"] == "original"
    assert record["decoding"]["conversation"] == "chat_template"


def test_next_checkpoint_takes_the_family_default(next_checkpoint, pope_root, tmp_path):
    config = EvalConfig(benches=["pope"], data_root=str(pope_root), out=str(tmp_path / "run"),
                        model=str(next_checkpoint), limit=2, max_new_tokens=2, method="fastv",
                        method_params={"tokens": 8}, progress=False)
    metrics = evaluate(config)
    assert metrics["pope"]["expected"] == 2 and metrics["pope"]["errors"] == 0
    answers = read_answers(tmp_path / "run" / "pope" / "answers.jsonl")
    assert all(a["prompt"].startswith("Is there a") for a in answers)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["image_aspect_ratio"] == "original"
    # resuming with the resolved value is the same run
    again = EvalConfig(**{**config.__dict__, "image_aspect_ratio": "original"})
    assert evaluate(again)["pope"]["complete"]
