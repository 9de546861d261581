"""The shipped toy model: it loads with ``load_model("toy")`` and reaches its documented accuracy on the
fixed small suite through the real harness (guards image preprocessing, prompt format and loading)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

import finepruner
from finepruner.toy.model import CHECKPOINT_DIR, ToySpec, build_clip_text, build_toy_llava, save_clip_text

REFERENCE = CHECKPOINT_DIR / "toy_reference.json"
TOLERANCE = 3.0  # points of each headline metric

def test_clip_text_saves_in_the_engine_format(tmp_path):
    from finepruner.models.clip_text import load_clip_text

    spec = ToySpec()
    _, processor = build_toy_llava(spec)
    tower = build_clip_text(spec, processor.tokenizer, spec.vision_hidden)
    save_clip_text(tower, tmp_path)
    loaded = load_clip_text(tmp_path)
    texts = ["red circle and blue square", "What is the color of the circle?"]
    with torch.no_grad():
        expected = tower.text_embeds(texts)
    got = torch.cat(loaded.encode_texts(texts))
    assert torch.allclose(expected, got, atol=1e-5)


def test_missing_checkpoint_error(monkeypatch, tmp_path):
    import finepruner.toy.model as toy_model

    monkeypatch.setattr(toy_model, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="toy-train"):
        toy_model.checkpoint_dir()


def test_shipped_checkpoint_files_and_size():
    names = {p.name for p in CHECKPOINT_DIR.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "processor_config.json", "generation_config.json", "toy_reference.json"):
        assert required in names, required
    total = sum(p.stat().st_size for p in CHECKPOINT_DIR.rglob("*") if p.is_file())
    assert total < 30 * 2**20


def test_shipped_model_answers_prompts():
    model, processor = finepruner.load_model("toy")
    assert model.config.vision_config.image_size // model.config.vision_config.patch_size == 12
    from finepruner.toy import generate_scenes
    from finepruner.toy.text import eval_prompt, user_text

    scene = generate_scenes(1, seed=0)[0]
    inputs = processor(images=[scene.render()], text=[eval_prompt(user_text("How many circles are there?"))],
                       return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 144
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] == processor.tokenizer.eos_token_id and len(new) == 2, "one word, then </s>"


def test_shipped_model_reaches_documented_accuracy():
    from finepruner.toy import build_default_suite, evaluate_suite

    reference = json.loads(REFERENCE.read_text())
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, processor = finepruner.load_model("toy")
    with tempfile.TemporaryDirectory() as tmp:
        root = build_default_suite(Path(tmp), n=reference["n"], seed=reference["seed"])
        results = evaluate_suite(model, processor, root, batch_size=64, max_new_tokens=8)
    for bench, expected in reference["headline"].items():
        assert results[bench]["headline"] == pytest.approx(expected, abs=TOLERANCE), bench
