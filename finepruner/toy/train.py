"""Train the toy LLaVA from scratch on fresh synthetic scenes (``finepruner toy-train``).

Recipe (see ``docs/toy.md``):

* every step draws ``batch_size`` new scenes; each image carries a multi-turn vicuna_v1 conversation of
  ``turns`` questions of different types (the first turn uses exactly the evaluation prompt), with the
  loss on the answers and ``</s>`` only;
* auxiliary objectives on the vision tower: (a) dense per-patch colour / shape / image-half labels on
  the penultimate layer's patch features (what LLaVA feeds to the projector), (b) a multi-hot BCE of
  the (colour, shape) pairs from the last layer's pooled [CLS], and (c) a CLIP-style contrastive loss
  between the projected [CLS] and a tiny CLIP text tower reading a caption of the scene. (b) and (c)
  train the penultimate layer's [CLS] query, so VisPruner-style [CLS] attention is meaningful, and (c)
  gives CDPruner a matching text tower;
* AdamW, linear warm-up then cosine decay over the step budget (fixed from ``--steps``, or estimated
  from ``--minutes`` after the first steps); a held-out evaluation with the real prompts every
  ``eval_every`` seconds, logged beside per-type chance, and a checkpoint save each time.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from finepruner.toy.model import CLIP_TEXT_SUBDIR, ToySpec, build_clip_text, build_toy_llava, save_clip_text
from finepruner.toy.questions import QUESTION_TYPES, Question, make_question
from finepruner.toy.scenes import COLOR_NAMES, GRID, PLURALS, SHAPES, Scene, generate_scene
from finepruner.toy.text import conversation, eval_prompt, user_text

#: Relative frequency of each question type in the training conversations.
TYPE_WEIGHTS: dict[str, float] = {
    "color": 1.0, "shape": 1.0, "count": 1.2, "position": 0.8, "exist": 1.6,
    "color_yn": 0.6, "count_yn": 0.7, "position_yn": 0.5, "mcq": 1.3,
}


@dataclass
class TrainConfig:
    out: str
    minutes: float = 60.0
    steps: int | None = None
    seed: int = 0
    batch_size: int = 16
    turns: int = 4
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_dense: float = 0.5
    aux_cls: float = 0.2
    aux_contrastive: float = 0.2
    aux_ground: float = 0.5
    aux_lookup: float = 0.3
    lookup_layer: int = 1
    lookup_heads: int = 4
    lookup_at: str = "name"
    rope_theta: float | None = None
    eval_every: float = 300.0
    curriculum: float = 0.15
    init: str | None = None
    projector_init_scale: float = 1.0
    eval_scenes: int = 60
    threads: int = 1
    log_every: int = 25


# --------------------------------------------------------------------------------------------------
# data


def sample_turns(scene: Scene, rng: random.Random, n_turns: int) -> list[Question]:
    """Up to ``n_turns`` questions of distinct types, drawn by :data:`TYPE_WEIGHTS`."""
    types = list(TYPE_WEIGHTS)
    weights = [TYPE_WEIGHTS[t] for t in types]
    chosen: list[Question] = []
    while types and len(chosen) < n_turns:
        t = rng.choices(types, weights=weights)[0]
        i = types.index(t)
        types.pop(i)
        weights.pop(i)
        q = make_question(t, scene, rng)
        if q is not None:
            chosen.append(q)
    return chosen


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption of a random non-empty subset of the objects, e.g. ``"red circle and blue square"``."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    objs = objs[: rng.randint(1, len(objs))]
    return " and ".join(f"{o.color} {o.shape}" for o in objs)


def dense_targets(scene: Scene) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch labels: colour (0 = none, 1..6), shape (0 = none, 1..3), image half (0 left, 1 right)."""
    color = torch.zeros(GRID * GRID, dtype=torch.long)
    shape = torch.zeros(GRID * GRID, dtype=torch.long)
    for o in scene.objects:
        for p in o.patches():
            color[p] = COLOR_NAMES.index(o.color) + 1
            shape[p] = SHAPES.index(o.shape) + 1
    half = (torch.arange(GRID * GRID) % GRID >= GRID // 2).long()
    return color, shape, half


def pair_targets(scene: Scene) -> torch.Tensor:
    y = torch.zeros(len(COLOR_NAMES) * len(SHAPES))
    for o in scene.objects:
        y[COLOR_NAMES.index(o.color) * len(SHAPES) + SHAPES.index(o.shape)] = 1.0
    return y


#: Which named attributes pick out the objects a question is about (the rest of the scene is context).
_LOOKUP_KEYS = {"color": ("shape",), "count": ("shape",), "count_yn": ("shape",), "color_yn": ("shape",),
                "shape": ("color",), "position": ("color", "shape"), "position_yn": ("color", "shape"),
                "exist": ("color", "shape")}


def _lookup_keys(q: Question) -> tuple[str, ...]:
    return _LOOKUP_KEYS[q.meta["base"] if q.qtype == "mcq" else q.qtype]


def relevant_patches(scene: Scene, q: Question) -> list[int]:
    """Patches of the objects the question names (empty for a negative existence question)."""
    keys = _lookup_keys(q)
    objs = [o for o in scene.objects if all(getattr(o, k) == q.meta[k] for k in keys)]
    return sorted(p for o in objs for p in o.patches())


def naming_words(q: Question) -> set[str]:
    """The word of the question that names its objects: the shape (singular or plural) when the question
    names one (it follows the colour in "the red circle"), else the colour."""
    word = q.meta["shape"] if "shape" in _lookup_keys(q) else q.meta["color"]
    return {word, PLURALS.get(word, word)}


def encode_conversation(tokenizer, turns: list[tuple[str, str]], n_image_tokens: int,
                        image_token_id: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside answers) of a vicuna_v1 conversation, ``<image>`` expanded."""
    ids = [tokenizer.bos_token_id]
    labels = [-100]
    for text, is_target in conversation(turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        expanded: list[int] = []
        for t in piece:
            expanded.extend([image_token_id] * n_image_tokens if t == image_token_id else [t])
        ids.extend(expanded)
        labels.extend(expanded if is_target else [-100] * len(expanded))
    return ids, labels


def answer_positions(labels: list[int]) -> list[int]:
    """Index of the token that predicts each turn's answer (the ``:`` before its first labelled token)."""
    return [i - 1 for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100]


def naming_positions(tokens: list[str], labels: list[int], questions: list[Question]) -> list[int]:
    """Per turn, the index of the last token before the answer that is one of :func:`naming_words`."""
    out = []
    for end, q in zip(answer_positions(labels), questions, strict=True):
        words = naming_words(q)
        out.append(next(i for i in range(end, -1, -1) if tokens[i] in words))
    return out


def make_batch(rng: random.Random, processor, cfg: TrainConfig, image_token_id: int,
               max_objects: int = 5, max_clutter: int = 4) -> dict:
    tok = processor.tokenizer
    scenes = [generate_scene(rng, max_objects, max_clutter) for _ in range(cfg.batch_size)]
    pixel_values = processor.image_processor([s.render() for s in scenes], return_tensors="pt")["pixel_values"]
    seqs, lookups = [], []
    for b, s in enumerate(scenes):
        qs = sample_turns(s, rng, cfg.turns)
        ids, labels = encode_conversation(tok, [(user_text(q.text, q.options), q.answer) for q in qs],
                                          GRID * GRID, image_token_id)
        seqs.append((ids, labels))
        positions = (naming_positions(tok.convert_ids_to_tokens(ids), labels, qs) if cfg.lookup_at == "name"
                     else answer_positions(labels))
        for pos, q in zip(positions, qs, strict=True):
            if patches := relevant_patches(s, q):
                lookups.append((b, pos, patches))
    width = max(len(i) for i, _ in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (i, lab) in enumerate(seqs):
        input_ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(i)] = 1
    dense = [dense_targets(s) for s in scenes]
    return {
        "input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values,
        "dense_color": torch.stack([d[0] for d in dense]), "dense_shape": torch.stack([d[1] for d in dense]),
        "dense_half": torch.stack([d[2] for d in dense]),
        "pairs": torch.stack([pair_targets(s) for s in scenes]),
        "captions": [caption(s, rng) for s in scenes],
        "lookups": lookups,
    }


# --------------------------------------------------------------------------------------------------
# held-out evaluation (first-turn prompts exactly as the harness sends them)


def eval_set(seed: int, n_scenes: int) -> list[tuple[Scene, Question]]:
    """One question of every type per scene (when possible), from a fixed held-out seed."""
    rng = random.Random(seed)
    items = []
    for _ in range(n_scenes):
        scene = generate_scene(rng)
        for t in QUESTION_TYPES:
            q = make_question(t, scene, rng)
            if q is not None:
                items.append((scene, q))
    return items


@torch.no_grad()
def predict(model, processor, items: list[tuple[Scene, Question]], batch_size: int = 32) -> list[str]:
    """Greedy one-token answers (every toy answer is one word) for (scene, question) items."""
    preds: list[str] = []
    tok = processor.tokenizer
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs = processor(images=[s.render() for s, _ in chunk],
                           text=[eval_prompt(user_text(q.text, q.options)) for _, q in chunk],
                           return_tensors="pt", padding=True)
        logits = model(**inputs).logits[:, -1]
        preds.extend(tok.convert_ids_to_tokens(logits.argmax(-1).tolist()))
    return preds


def chance_by_type(items: list[tuple[Scene, Question]]) -> dict[str, float]:
    """Majority-answer rate per type (accuracy of always giving the most frequent answer)."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for _, q in items:
        by_type[q.qtype].append(q.answer)
    return {t: max(a.count(x) for x in set(a)) / len(a) for t, a in by_type.items()}


def accuracy_by_type(items, preds) -> dict[str, float]:
    hits: dict[str, list[int]] = defaultdict(list)
    for (_, q), p in zip(items, preds, strict=True):
        hits[q.qtype].append(int(p == q.answer))
    return {t: sum(h) / len(h) for t, h in hits.items()}


# --------------------------------------------------------------------------------------------------
# training loop


class AuxHeads(torch.nn.Module):
    """Throw-away heads for the vision tower's auxiliary objectives (not shipped)."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.color = torch.nn.Linear(vision_hidden, len(COLOR_NAMES) + 1)
        self.shape = torch.nn.Linear(vision_hidden, len(SHAPES) + 1)
        self.side = torch.nn.Linear(vision_hidden, 2)
        self.pairs = torch.nn.Linear(vision_hidden, len(COLOR_NAMES) * len(SHAPES))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.ground_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.no_color = torch.nn.Parameter(torch.randn(text_hidden) * 0.02)
        self.no_shape = torch.nn.Parameter(torch.randn(text_hidden) * 0.02)


def grounding_loss(image_tokens: torch.Tensor, embeddings: torch.Tensor, heads: AuxHeads,
                   color_ids: list[int], shape_ids: list[int], batch: dict) -> torch.Tensor:
    """Align each image token with the word embeddings of its object's colour and shape.

    The miniature of LLaVA's stage-1 alignment: the projected patch of a red circle should point the
    way of the words ``red`` and ``circle`` (cosine logits against those rows of the language model's
    input embeddings, plus a learned "nothing" row), so the question's words can find it by attention.
    """
    x = F.normalize(image_tokens.flatten(0, 1), dim=-1)
    scale = heads.ground_scale.exp().clamp(max=100)
    loss = image_tokens.new_zeros(())
    for none, ids, target in ((heads.no_color, color_ids, batch["dense_color"]),
                              (heads.no_shape, shape_ids, batch["dense_shape"])):
        rows = F.normalize(torch.cat([none[None], embeddings[ids]]), dim=-1)
        loss = loss + F.cross_entropy(scale * x @ rows.T, target.flatten())
    return loss


def lookup_loss(captured: dict, attention, batch: dict, image_token_id: int, n_heads: int) -> torch.Tensor:
    """Teach ``n_heads`` heads of one language-model layer where to look: at the word of each question
    that names its objects, their attention over the image tokens should fall on those objects' patches
    (cross-entropy against the uniform distribution over those patches). The softmax is taken over the
    image tokens only, so how much a head attends to the image at all stays free.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden, (cos, sin) = captured["hidden"], captured["rope"]
    shape = (*hidden.shape[:2], -1, attention.head_dim)
    q = attention.q_proj(hidden).view(shape).transpose(1, 2)[:, :n_heads]
    k = attention.k_proj(hidden).view(shape).transpose(1, 2)[:, :n_heads]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    image = batch["input_ids"][0] == image_token_id  # the image block sits at the same place in every row
    rows = torch.tensor([b for b, _, _ in batch["lookups"]])
    pos = torch.tensor([p for _, p, _ in batch["lookups"]])
    logits = torch.einsum("nhd,nhkd->nhk", q[rows, :, pos], k[rows][:, :, image]) * attention.scaling
    target = torch.zeros(len(rows), int(image.sum()))
    for i, (_, _, patches) in enumerate(batch["lookups"]):
        target[i, patches] = 1.0 / len(patches)
    return -(target[:, None] * logits.log_softmax(-1)).sum(-1).mean()


def schedule_progress(step: int, total: int | None, minutes: float) -> float:
    """Fraction of the schedule done at ``step``: of ``total`` steps, or, while the schedule is not yet
    sized to the measured speed, of ``minutes * 60`` steps."""
    budget = total if total is not None else max(1, int(minutes * 60))
    return min(1.0, step / budget)


def lr_factor(step: int, total: int | None, minutes: float, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then cosine decay to 5%
    over the schedule (:func:`schedule_progress`)."""
    warm = min(1.0, (step + 1) / warmup)
    progress = schedule_progress(step, total, minutes)
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model, processor, clip_text, out: Path, tag: dict) -> None:
    tmp = out.parent / (out.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    save_clip_text(clip_text, tmp / CLIP_TEXT_SUBDIR)
    (tmp / "toy_training.json").write_text(json.dumps(tag, indent=1) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():  # replace file by file so the folder is never without weights for long
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        shutil.move(str(item), str(target))
    shutil.rmtree(tmp)


def init_from(directory: Path, model, clip_text) -> None:
    """Load the LLaVA weights and the CLIP text tower of a ``toy-train`` output folder."""
    from safetensors.torch import load_file

    model.load_state_dict(type(model).from_pretrained(directory).state_dict())
    state = load_file(str(directory / CLIP_TEXT_SUBDIR / "model.safetensors"))
    with torch.no_grad():
        clip_text.visual_projection.weight.copy_(state.pop("visual_projection.weight"))
    clip_text.text_model.load_state_dict(state)


def train(cfg: TrainConfig, log=print) -> dict:
    if cfg.lookup_at not in ("name", "answer"):
        raise ValueError(f"lookup_at={cfg.lookup_at!r}: use 'name' (the question's naming word) or 'answer'")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.txt").open("a")

    def emit(msg: str) -> None:
        log(msg)
        log_file.write(msg + "\n")
        log_file.flush()

    spec = ToySpec() if cfg.rope_theta is None else ToySpec(rope_theta=cfg.rope_theta)
    model, processor = build_toy_llava(spec, seed=cfg.seed)
    clip_text = build_clip_text(spec, processor.tokenizer, spec.vision_hidden)
    heads = AuxHeads(spec.vision_hidden, spec.text_hidden)
    if cfg.init:  # continue from a saved checkpoint (weights only; a fresh optimizer and schedule)
        init_from(Path(cfg.init), model, clip_text)
        emit(f"initialised from {cfg.init}")
    with torch.no_grad():  # start the image tokens near the scale of the text embeddings
        model.model.multi_modal_projector.linear_2.weight.mul_(cfg.projector_init_scale)
    image_token_id = model.config.image_token_index
    params = [*model.parameters(), *clip_text.parameters(), *heads.parameters()]
    n_model = sum(p.numel() for p in model.parameters())
    emit(f"config {json.dumps(asdict(cfg))}")
    emit(f"spec {json.dumps({k: v for k, v in asdict(spec).items() if k != 'words'})}")
    emit(f"model parameters {n_model / 1e6:.2f} M; clip text {sum(p.numel() for p in clip_text.parameters())}")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    captured: dict = {}
    model.model.vision_tower.register_forward_hook(lambda m, a, o: captured.__setitem__("v", o))
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: captured.__setitem__("p", o))
    lookup_attention = model.model.language_model.layers[cfg.lookup_layer].self_attn
    lookup_attention.register_forward_hook(
        lambda m, a, kw, o: captured.update(hidden=kw["hidden_states"] if "hidden_states" in kw else a[0],
                                            rope=kw["position_embeddings"]), with_kwargs=True)
    color_ids = processor.tokenizer.convert_tokens_to_ids(list(COLOR_NAMES))
    shape_ids = processor.tokenizer.convert_tokens_to_ids(list(SHAPES))
    data_rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    held_out = eval_set(10_000 + cfg.seed, cfg.eval_scenes)
    chance = chance_by_type(held_out)
    emit(f"held-out eval: {len(held_out)} questions; chance {json.dumps({k: round(v, 3) for k, v in chance.items()})}")

    total = cfg.steps
    t0 = time.time()
    last_eval = t0
    step = 0
    history = []
    running: dict[str, float] = defaultdict(float)

    def evaluate_and_save(final: bool = False) -> dict:
        model.eval()
        preds = predict(model, processor, held_out)
        model.train()
        acc = accuracy_by_type(held_out, preds)
        mean = sum(acc.values()) / len(acc)
        row = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "mean": round(mean, 4),
               **{t: round(a, 3) for t, a in sorted(acc.items())}}
        history.append(row)
        emit("eval " + " ".join(f"{t}={acc[t]:.2f}(chance {chance[t]:.2f})" for t in sorted(acc))
             + f" | mean {mean:.3f} step {step}")
        save_checkpoint(model, processor, clip_text, out,
                        {"step": step, "total_steps": total, "seed": cfg.seed, "final": final,
                         "config": asdict(cfg), "eval": row, "chance": chance})
        return row

    model.train()
    while True:
        if cfg.steps is None and (step == 20 or (step % 100 == 0 and total and step < 0.9 * total)):
            # Time budget: fit the schedule to the measured speed (evaluations included), re-estimated
            # every 100 steps until 90% of it, since the CPU may be shared.
            per_step = (time.time() - t0) / step
            total = max(step + 1, int(cfg.minutes * 60 / per_step))
            emit(f"{per_step:.2f} s/step so far -> schedule of {total} steps")
        if total is not None and step >= total:
            break
        lr = cfg.lr * lr_factor(step, total, cfg.minutes, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        # Curriculum: one object and no clutter at first, the full scenes from ``curriculum`` of the
        # schedule on (a model that must find 4 of 144 patches otherwise sits at the answer priors).
        progress = schedule_progress(step, total, cfg.minutes)
        ramp = min(1.0, progress / cfg.curriculum) if cfg.curriculum > 0 and not cfg.init else 1.0
        batch = make_batch(data_rng, processor, cfg, image_token_id, 1 + int(4 * ramp), int(4 * ramp))
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], labels=batch["labels"])
        v = captured["v"]
        # What LLaVA feeds to the projector; normalised for the heads, so the aux loss does not inflate it.
        patches = F.layer_norm(v.hidden_states[-2][:, 1:], (spec.vision_hidden,))
        loss_dense = (F.cross_entropy(heads.color(patches).flatten(0, 1), batch["dense_color"].flatten())
                      + F.cross_entropy(heads.shape(patches).flatten(0, 1), batch["dense_shape"].flatten())
                      + F.cross_entropy(heads.side(patches).flatten(0, 1), batch["dense_half"].flatten()))
        # LLaVA overwrites the output's pooler_output with its projected features: pool [CLS] here.
        pooled = model.model.vision_tower.post_layernorm(v.last_hidden_state[:, 0])
        loss_cls = F.binary_cross_entropy_with_logits(heads.pairs(pooled), batch["pairs"])
        img_emb = F.normalize(clip_text.visual_projection(pooled), dim=-1)
        txt_emb = F.normalize(clip_text.text_embeds(batch["captions"]), dim=-1)
        logits = heads.logit_scale.exp().clamp(max=100) * img_emb @ txt_emb.T
        target = torch.arange(len(logits))
        loss_con = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        loss_ground = grounding_loss(captured["p"], model.get_input_embeddings().weight, heads,
                                     color_ids, shape_ids, batch) if cfg.aux_ground else loss_dense * 0
        loss_lookup = (lookup_loss(captured, lookup_attention, batch, image_token_id, cfg.lookup_heads)
                       if cfg.aux_lookup and batch["lookups"] else loss_dense * 0)
        loss = (outputs.loss + cfg.aux_dense * loss_dense + cfg.aux_cls * loss_cls
                + cfg.aux_contrastive * loss_con + cfg.aux_ground * loss_ground + cfg.aux_lookup * loss_lookup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, val in (("lm", outputs.loss), ("dense", loss_dense), ("cls", loss_cls), ("con", loss_con),
                       ("ground", loss_ground), ("lookup", loss_lookup)):
            running[k] += float(val.detach())
        if step % cfg.log_every == 0:
            emit(f"step {step}/{total} lr {lr:.2e} " + " ".join(
                f"{k} {total_loss / cfg.log_every:.3f}" for k, total_loss in running.items())
                + f" | {(time.time() - t0) / step:.2f} s/step, {(time.time() - t0) / 60:.1f} min")
            running.clear()
        if time.time() - last_eval >= cfg.eval_every:
            evaluate_and_save()
            last_eval = time.time()
    final = evaluate_and_save(final=True)
    emit(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; final mean {final['mean']:.3f}")
    (out / "train_history.json").write_text(json.dumps(history, indent=1) + "\n")
    log_file.close()
    return final
