"""Toy world: deterministic scenes, questions that agree with a rule check, prompts in the vocabulary."""

from __future__ import annotations

import hashlib
import random

import pytest

from finepruner.toy.questions import NEGATIVE_KINDS, QUESTION_TYPES, make_question, negative_pair, rule_answer
from finepruner.toy.scenes import CELLS, GRID, IMAGE_SIZE, generate_scene, generate_scenes
from finepruner.toy.text import build_toy_tokenizer, eval_prompt, user_text


def _digest(scenes) -> str:
    h = hashlib.sha256()
    for s in scenes:
        h.update(s.render().tobytes())
        h.update(repr(s.description()).encode())
    return h.hexdigest()


def test_scenes_are_deterministic_per_seed():
    assert _digest(generate_scenes(6, seed=3)) == _digest(generate_scenes(6, seed=3))
    assert _digest(generate_scenes(6, seed=3)) != _digest(generate_scenes(6, seed=4))


def test_scene_layout():
    for scene in generate_scenes(50, seed=0):
        img = scene.render()
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "RGB"
        cells = [(o.row, o.col) for o in scene.objects] + [(c.row, c.col) for c in scene.clutter]
        assert len(cells) == len(set(cells)), "objects and clutter occupy distinct cells"
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            assert len(o.patches()) == 4 and all(0 <= p < GRID * GRID for p in o.patches())
            assert o.side == ("left" if o.col < CELLS // 2 else "right")


def test_object_pixels_lie_in_their_patches():
    scene = generate_scenes(1, seed=11)[0]
    img = scene.render()
    for o in scene.objects:
        cx = o.col * 28 + 14 + o.dx
        cy = o.row * 28 + 14 + o.dy
        r, g, b = img.getpixel((cx, cy + 2))
        assert max(r, g, b) - min(r, g, b) > 100, "the object's centre is saturated colour"
        patch = (cy + 2) // 14 * GRID + cx // 14
        assert patch in o.patches()


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_answers_agree_with_rule_check(qtype):
    rng = random.Random(qtype)
    seen = 0
    for _ in range(300):
        scene = generate_scene(rng)
        q = make_question(qtype, scene, rng)
        if q is None:
            continue
        seen += 1
        assert rule_answer(scene.description(), q.text, q.options or None) == q.answer, q
    assert seen > 100


@pytest.mark.parametrize("kind", NEGATIVE_KINDS)
def test_hard_negatives(kind):
    rng = random.Random(kind)
    found = 0
    for _ in range(200):
        scene = generate_scene(rng)
        pair = negative_pair(scene, rng, kind)
        if pair is None:
            continue
        found += 1
        colors = {o.color for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        assert pair not in {(o.color, o.shape) for o in scene.objects}
        if kind == "adversarial":
            assert pair[0] in colors and pair[1] in shapes
        elif kind == "popular":
            assert (pair[0] in colors) != (pair[1] in shapes)
    assert found > 50


def test_rule_check_rejects_ambiguous_questions():
    desc = {"objects": [{"shape": "circle", "color": "red", "side": "left"},
                        {"shape": "circle", "color": "blue", "side": "right"}]}
    with pytest.raises(ValueError):
        rule_answer(desc, "What is the color of the circle?")
    assert rule_answer(desc, "How many circles are there?") == "two"
    assert rule_answer(desc, "Is there a red square in the image?") == "no"


def test_every_prompt_tokenizes_to_known_words():
    tok = build_toy_tokenizer()
    rng = random.Random(0)
    for _ in range(100):
        scene = generate_scene(rng)
        for qtype in QUESTION_TYPES:
            q = make_question(qtype, scene, rng)
            if q is None:
                continue
            ids = tok(eval_prompt(user_text(q.text, q.options)))["input_ids"]
            assert tok.unk_token_id not in ids, q.text
            assert ids[0] == tok.bos_token_id
            assert tok.unk_token_id not in tok(f" {q.answer}</s>", add_special_tokens=False)["input_ids"]


def test_training_encoding_matches_the_processor():
    from finepruner.toy.model import build_toy_llava
    from finepruner.toy.train import encode_conversation, sample_turns

    model, processor = build_toy_llava()
    rng = random.Random(5)
    scene = generate_scene(rng)
    turns = [(user_text(q.text, q.options), q.answer) for q in sample_turns(scene, rng, 4)]
    image_id = model.config.image_token_index
    ids, labels = encode_conversation(processor.tokenizer, turns, GRID * GRID, image_id)
    first = processor(images=[scene.render()], text=[eval_prompt(turns[0][0])], return_tensors="pt")
    n = first["input_ids"].shape[1]
    assert first["input_ids"][0].tolist() == ids[:n]
    assert ids.count(image_id) == GRID * GRID
    targets = processor.tokenizer.convert_ids_to_tokens([t for t in labels if t != -100])
    assert targets == [w for _, a in turns for w in (a, "</s>")]
