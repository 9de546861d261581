"""Where the toy model looks: share of each head's image attention on the object a question names.

For ``--n`` questions of one type, runs the toy model with eager attention and prints, per layer and
head, the share of the head's attention over the 144 image tokens that falls on (a) the patches of the
named object and (b) the patches of all objects, from the answer position and from the question's
naming word. Salience without selection shows as (b) near 1 with (a) near 1/(objects in the scene).
docs/toy.md quotes its output.

    python benchmarks/toy_lookup_attention.py [--model DIR] [--qtype color] [--n 24]
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from finepruner.toy.model import checkpoint_dir
from finepruner.toy.questions import make_question
from finepruner.toy.scenes import generate_scene
from finepruner.toy.text import eval_prompt, user_text
from finepruner.toy.train import naming_words, relevant_patches


def shares(model, processor, items) -> dict[str, torch.Tensor]:
    cfg = model.config.text_config
    out = {k: torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
           for k in ("answer:named", "answer:objects", "word:named", "word:objects")}
    correct = 0
    for scene, q in items:
        inputs = processor(images=[scene.render()], text=[eval_prompt(user_text(q.text, q.options))],
                           return_tensors="pt")
        with torch.no_grad():
            result = model(**inputs, output_attentions=True)
        ids = inputs["input_ids"][0]
        image = (ids == model.config.image_token_index).nonzero().flatten()
        tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        word = max(i for i, t in enumerate(tokens) if t in naming_words(q))
        named = torch.tensor(relevant_patches(scene, q))
        objects = torch.tensor(scene.object_patches())
        for layer, attn in enumerate(result.attentions):
            for query, key in ((-1, "answer"), (word, "word")):
                a = attn[0, :, query, image]
                a = a / a.sum(-1, keepdim=True).clamp_min(1e-9)
                out[f"{key}:named"][layer] += a[:, named].sum(-1)
                out[f"{key}:objects"][layer] += a[:, objects].sum(-1)
        answer = processor.tokenizer.convert_ids_to_tokens([int(result.logits[0, -1].argmax())])[0]
        correct += answer == q.answer
    print(f"{len(items)} {items[0][1].qtype} questions, accuracy {correct / len(items):.2f}")
    return {k: v / len(items) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped toy model)")
    parser.add_argument("--qtype", default="color", help="question type whose named objects are scored")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.model or str(checkpoint_dir())
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    rng = random.Random(args.seed)
    items = []
    while len(items) < args.n:
        scene = generate_scene(rng)
        q = make_question(args.qtype, scene, rng)
        if q is not None and relevant_patches(scene, q):
            items.append((scene, q))
    for name, table in shares(model, processor, items).items():
        print(f"\nshare of image attention, {name} (rows: layers, columns: heads)")
        print(table.numpy().round(2))


if __name__ == "__main__":
    main()
