"""The toy Qwen2.5-VL's builder, weight transfer from the toy LLaVA, training inputs and a two-step run."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from finepruner.models.qwen_processor import QwenImageProcessor
from finepruner.toy.cli import parse_overrides
from finepruner.toy.questions import make_question
from finepruner.toy.qwen_model import IMAGE_PAD, build_toy_qwen, transfer_llava_language_model
from finepruner.toy.qwen_train import (
    QwenTrainConfig,
    conversation_pieces,
    encode_conversation,
    eval_prompt,
    load_teacher,
    train,
    user_turn,
)
from finepruner.toy.scenes import generate_scene
from finepruner.toy.text import user_text


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("toy")


def test_toy_qwen_shape():
    parts = build_toy_qwen()
    image = generate_scene(random.Random(0)).render()
    inputs = parts.processor(text=[f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"], images=[image])
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 24]]  # 168 px upsampled to 336: 24 x 24 patches
    assert int((inputs["input_ids"] == parts.model.config.image_token_id).sum()) == 144  # 12 x 12 merged
    vision = parts.model.config.vision_config
    assert list(vision.fullatt_block_indexes) == [1, 3] and vision.window_size == 112
    assert sum(parts.model.config.text_config.rope_parameters["mrope_section"]) * 2 == 128 // 8


def test_language_model_transfer_equals_llava(teacher):
    llava, llava_processor = teacher
    parts = build_toy_qwen(seed=3)
    transfer_llava_language_model(parts.model, llava, parts.tokenizer, llava_processor.tokenizer)
    ids = llava_processor.tokenizer("What is the color of the circle ? red", return_tensors="pt")["input_ids"]
    # the shared vocabulary keeps its ids, so the same ids mean the same words in both models
    assert parts.tokenizer.convert_ids_to_tokens(ids[0, 1:].tolist()) == \
        llava_processor.tokenizer.convert_ids_to_tokens(ids[0, 1:].tolist())
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = llava(input_ids=ids).logits
        out = parts.model(input_ids=ids, position_ids=positions.expand(3, 1, -1)).logits
    # equal mRoPE rows = the Llama RoPE; zero q/k/v biases; the same weights
    assert torch.allclose(ref, out[..., : ref.shape[-1]], atol=1e-5)
    end = parts.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = llava_processor.tokenizer.convert_tokens_to_ids("</s>")
    assert torch.equal(parts.model.lm_head.weight[end], llava.lm_head.weight[eos])


def test_training_conversation_matches_processor_and_template():
    parts = build_toy_qwen()
    tok = parts.tokenizer
    rng = random.Random(1)
    scene = generate_scene(rng)
    qs = [q for q in (make_question(t, scene, rng) for t in ("color", "exist", "count")) if q is not None]
    turns = [(user_text(q.text, q.options), q.answer) for q in qs]
    pieces = conversation_pieces(tok, turns)
    messages = []
    for i, (text, answer) in enumerate(turns):
        messages += user_turn(text, i == 0) + [{"role": "assistant", "content": answer}]
    assert "".join(p for p, _ in pieces) + "\n" == tok.apply_chat_template(messages, tokenize=False)
    ids, labels = encode_conversation(tok, turns, 144)
    prompt = eval_prompt(tok, qs[0])
    assert pieces[0][0] == prompt
    inputs = parts.processor(text=[prompt], images=[scene.render()])
    first = inputs["input_ids"][0].tolist()
    assert ids[: len(first)] == first  # the first turn is exactly what evaluation sends
    targets = [t for t, lab in zip(tok.convert_ids_to_tokens(ids), labels, strict=True) if lab != -100]
    assert targets == [w for q in qs for w in (q.answer, "<|im_end|>")]


def test_two_training_steps_write_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    final = train(QwenTrainConfig(out=str(out), steps=2, batch_size=2, turns=2, eval_scenes=1, log_every=1,
                                  warmup=1), log=lambda msg: None)
    assert 0.0 <= final["mean"] <= 1.0
    log = (out / "train_log.txt").read_text()
    losses = [float(line.split(" lm ")[1].split()[0]) for line in log.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and all(0 < x < 50 for x in losses)
    tag = json.loads((out / "toy_training.json").read_text())
    assert tag["family"] == "qwen2_5_vl" and tag["step"] == 2 and tag["final"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    processor = QwenImageProcessor.from_pretrained(out)
    image = generate_scene(random.Random(2)).render()
    inputs = processor(text=[processor.apply_chat_template(user_turn("What is the color of the circle?", True),
                                                           add_generation_prompt=True)], images=[image])
    assert int(inputs["mm_token_type_ids"].sum()) == 144
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == len(processor.tokenizer)


def test_distill_stage_trains_only_the_vision_tower(tmp_path, teacher):
    out = tmp_path / "distill"
    train(QwenTrainConfig(out=str(out), steps=1, batch_size=2, eval_scenes=1, stage="distill", warmup=1),
          log=lambda msg: None)
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    llava, _ = teacher
    assert torch.equal(trained.model.language_model.layers[0].mlp.up_proj.weight,
                       llava.model.language_model.layers[0].mlp.up_proj.weight)
    untrained = build_toy_qwen(seed=0).model
    assert not torch.equal(trained.model.visual.merger.mlp[2].weight, untrained.model.visual.merger.mlp[2].weight)


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="stage='all'.*distill, joint"):
        train(QwenTrainConfig(out=str(tmp_path), stage="all"))
    with pytest.raises(ValueError, match="teacher=.*no config.json"):
        load_teacher(str(tmp_path))
    assert parse_overrides(["stage=distill", "lm_lr=1e-4"], "qwen2_5_vl") == {"stage": "distill", "lm_lr": 1e-4}
    with pytest.raises(SystemExit, match="lookup_at=name.*KEY one of"):
        parse_overrides(["lookup_at=name"], "qwen2_5_vl")  # a LLaVA-only option
    with pytest.raises(SystemExit, match="--family 'qwen'"):
        parse_overrides([], "qwen")


def test_finalize_ships_the_qwen_files_and_checks_the_family(tmp_path):
    from finepruner.toy.finalize import QWEN_SHIPPED, main, ship

    run = tmp_path / "run"
    run.mkdir()
    for name in QWEN_SHIPPED:
        (run / name).write_text("{}" if name.endswith(".json") else "x")
    (run / "toy_training.json").write_text(json.dumps({"family": "qwen2_5_vl", "config": {"out": str(run)}}))
    ship(run, tmp_path / "dest", "qwen2_5_vl")
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted(QWEN_SHIPPED)
    assert str(run) not in (tmp_path / "dest" / "toy_training.json").read_text()  # machine paths scrubbed
    with pytest.raises(SystemExit):  # a Qwen run shipped as the LLaVA toy
        main([str(run), "--family", "llava", "--dest", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()
