"""``finepruner eval`` on the Qwen families: the family's chat template (``ModelAdapter.build_prompt``), the
image unpadded at its own resolution, the torchvision-free processor, pruned answers end to end."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import make_pope

from finepruner.eval.io import read_answers
from finepruner.eval.runner import EvalConfig, Generator, evaluate
from finepruner.models.tiny_families import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

QUESTION = "Is there a dog in the image?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg") / "eval"
    make_pope(root)
    return root


def test_qwen_prompt_is_the_chat_template():
    torch.set_num_threads(2)
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    generator = Generator(model, processor)
    assert generator.image_aspect_ratio == "original"
    assert generator.build_prompt(QUESTION, True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("build", [build_tiny_qwen2_5_vl, build_tiny_qwen3_vl])
def test_a_pruned_qwen_checkpoint_answers_pope(build, pope_root, tmp_path):
    model, processor = build(seed=0)
    directory = tmp_path / "ckpt"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    config = EvalConfig(benches=["pope"], data_root=str(pope_root), out=str(tmp_path / "run"), model=str(directory),
                        batch_size=2, max_new_tokens=2, method="fastv", method_params={"tokens": 4, "K": 2},
                        progress=False)
    metrics = evaluate(config)
    assert metrics["pope"]["complete"] and metrics["pope"]["errors"] == 0
    answers = read_answers(tmp_path / "run" / "pope" / "answers.jsonl")
    assert len(answers) == 6 and all(isinstance(a["text"], str) for a in answers)
    assert all(a["metadata"]["prune"]["visual_tokens"][-1] == 4 for a in answers)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["family"] == model.config.model_type and record["image_aspect_ratio"] == "original"
