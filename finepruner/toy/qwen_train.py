"""Train the toy Qwen2.5-VL on fresh synthetic scenes (``finepruner toy-train --family qwen2_5_vl``).

Recipe (``docs/toy.md``, "The toy Qwen2.5-VL"):

* the language model starts as a copy of the shipped toy LLaVA's (``transfer_llava_language_model``);
  the vision tower (windowed attention, 2 x 2 merger) starts from scratch;
* **distillation**: each merged visual token of the Qwen tower is regressed (relative squared error)
  onto the toy LLaVA's projected feature of the same image cell (both grids are 12 x 12 over the same
  168-px scene; the Qwen processor sees it upsampled to 336 px), so the tower learns to speak the
  language model's input space;
* ``stage="distill"``: only the tower and merger train, with the distillation loss alone (no language
  model forward: fast); ``stage="joint"``: everything trains on 4-turn Qwen chat conversations (the
  first turn is exactly the evaluation prompt of Qwen's chat template; loss on the answers and their
  ``<|im_end|>``) plus the distillation loss, so the language model adapts to the 3-D positions and
  the new template;
* AdamW, warm-up then cosine decay over the step budget (``--steps`` or fitted to ``--minutes``); a
  held-out first-token evaluation with the real prompts and a checkpoint save every ``eval_every``
  seconds; ``init`` continues from a saved toy Qwen folder with a new schedule.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from finepruner.toy.questions import Question
from finepruner.toy.qwen_model import (
    IMAGE_PAD,
    ToyQwenParts,
    build_toy_qwen,
    transfer_llava_language_model,
)
from finepruner.toy.scenes import COLOR_NAMES, SHAPES, Scene, generate_scene
from finepruner.toy.text import user_text
from finepruner.toy.train import (
    accuracy_by_type,
    chance_by_type,
    dense_targets,
    eval_set,
    lookup_loss,
    lr_factor,
    naming_positions,
    relevant_patches,
    sample_turns,
)

STAGES = ("distill", "joint")
#: How the distillation error is normalised: "dim" divides each feature dimension by the teacher's
#: standard deviation over the batch's tokens (the low-variance directions that carry colour and shape
#: weigh as much as the large per-position offsets of the CLIP features); "total" by the teacher's mean
#: square (the first stage of the shipped run).
DISTILL_NORMS = ("dim", "total")


@dataclass
class QwenTrainConfig:
    out: str
    minutes: float = 30.0
    steps: int | None = None
    seed: int = 0
    stage: str = "joint"
    teacher: str = "toy"
    init: str | None = None
    batch_size: int = 16
    turns: int = 4
    lr: float = 1.5e-3
    lm_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    distill: float = 1.0
    distill_norm: str = "dim"
    aux_dense: float = 0.5
    aux_lookup: float = 0.3
    lookup_layer: int = 1
    lookup_heads: int = 4
    eval_every: float = 300.0
    eval_scenes: int = 60
    threads: int = 1
    log_every: int = 25


def user_turn(text: str, first: bool) -> list[dict]:
    content = [{"type": "image"}] if first else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def conversation_pieces(tokenizer, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """A multi-turn Qwen chat as ``(segment, is_target)`` pieces (targets: answer + ``<|im_end|>``); the
    first segment is exactly the evaluation prompt (the chat template with one user turn and the
    generation prompt), and the concatenation equals the chat template of the whole conversation."""
    pieces: list[tuple[str, bool]] = []
    for i, (text, answer) in enumerate(turns):
        if i == 0:
            head = tokenizer.apply_chat_template(user_turn(text, True), add_generation_prompt=True, tokenize=False)
        else:
            head = f"\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        pieces.append((head, False))
        pieces.append((f"{answer}<|im_end|>", True))
    return pieces


def encode_conversation(tokenizer, turns: list[tuple[str, str]], n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside answers) of a Qwen chat, ``<|image_pad|>`` expanded."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_target in conversation_pieces(tokenizer, turns):
        piece = tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * n_image_tokens), add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if is_target else [-100] * len(piece))
    return ids, labels


def eval_prompt(tokenizer, question: Question) -> str:
    return tokenizer.apply_chat_template(user_turn(user_text(question.text, question.options), True),
                                         add_generation_prompt=True, tokenize=False)


def make_batch(rng: random.Random, parts: ToyQwenParts, teacher_processor, cfg: QwenTrainConfig) -> dict:
    """Fresh scenes: the Qwen inputs (processor-equivalent), labels, and the teacher's pixel values."""
    tok = parts.tokenizer
    scenes = [generate_scene(rng) for _ in range(cfg.batch_size)]
    images = [s.render() for s in scenes]
    vision = parts.processor.image_processor(images=images, return_tensors="pt")
    n_tokens = int(vision["image_grid_thw"][0].prod()) // parts.spec.merge ** 2
    batch = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"],
             "teacher_pixel_values": teacher_processor.image_processor(images, return_tensors="pt")["pixel_values"]}
    dense = [dense_targets(s) for s in scenes]  # per cell of the 12 x 12 grid, raster order = merged order
    batch["dense_color"] = torch.cat([d[0] for d in dense])
    batch["dense_shape"] = torch.cat([d[1] for d in dense])
    if cfg.stage == "distill":
        return batch
    seqs, lookups = [], []
    for b, s in enumerate(scenes):
        qs = sample_turns(s, rng, cfg.turns)
        ids, labels = encode_conversation(tok, [(user_text(q.text, q.options), q.answer) for q in qs], n_tokens)
        seqs.append((ids, labels))
        for pos, q in zip(naming_positions(tok.convert_ids_to_tokens(ids), labels, qs), qs, strict=True):
            if patches := relevant_patches(s, q):  # merged tokens are the 12 x 12 cells in raster order
                lookups.append((b, pos, patches))
    width = max(len(i) for i, _ in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (i, lab) in enumerate(seqs):  # right padding (get_rope_index skips masked positions)
        input_ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(i)] = 1
    image_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    batch.update(input_ids=input_ids, attention_mask=mask, labels=labels,
                 mm_token_type_ids=(input_ids == image_id).long(), lookups=lookups)
    return batch


@torch.no_grad()
def predict(parts: ToyQwenParts, items: list[tuple[Scene, Question]], batch_size: int = 32) -> list[str]:
    """Greedy one-token answers with the evaluation prompts (inputs as the Qwen processor builds them)."""
    preds: list[str] = []
    tok = parts.tokenizer
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs = parts.processor(text=[eval_prompt(tok, q) for _, q in chunk], images=[s.render() for s, _ in chunk])
        logits = parts.model(**inputs).logits[:, -1]
        preds.extend(tok.convert_ids_to_tokens(logits.argmax(-1).tolist()))
    return preds


def save_checkpoint(parts: ToyQwenParts, out: Path, tag: dict) -> None:
    """Model and processor files (tokenizer, ``preprocessor_config.json``, ``chat_template.jinja``), replaced
    file by file so that the folder is never without weights for long."""
    tmp = out.parent / (out.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    parts.model.save_pretrained(tmp)
    parts.processor.save_pretrained(tmp)
    (tmp / "toy_training.json").write_text(json.dumps(tag, indent=1) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        shutil.move(str(item), str(target))
    shutil.rmtree(tmp)


def load_teacher(teacher: str):
    """The toy LLaVA (``"toy"``: the shipped one, or a ``toy-train`` folder) and its processor."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaProcessor

    from finepruner.toy.model import checkpoint_dir

    directory = checkpoint_dir() if teacher == "toy" else Path(teacher)
    if not (directory / "config.json").is_file():
        raise ValueError(f"teacher={teacher!r}: not a toy LLaVA folder (no config.json); pass 'toy' or a "
                         "`finepruner toy-train` output folder")
    model_type = AutoConfig.from_pretrained(directory).model_type
    if model_type != "llava":
        raise ValueError(f"teacher={teacher!r} is a {model_type!r} checkpoint; the teacher must be a toy LLaVA")
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval().requires_grad_(False)
    return model, LlavaProcessor.from_pretrained(directory)


def train(cfg: QwenTrainConfig, log=print) -> dict:
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r}: use one of {', '.join(STAGES)}")
    if cfg.distill_norm not in DISTILL_NORMS:
        raise ValueError(f"distill_norm={cfg.distill_norm!r}: use one of {', '.join(DISTILL_NORMS)}")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.txt").open("a")

    def emit(msg: str) -> None:
        log(msg)
        log_file.write(msg + "\n")
        log_file.flush()

    teacher, teacher_processor = load_teacher(cfg.teacher)
    parts = build_toy_qwen(seed=cfg.seed)
    model = parts.model
    if cfg.init:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model.load_state_dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.init).state_dict())
        emit("initialised from INIT_DIR (a toy Qwen checkpoint)")
    else:
        transfer_llava_language_model(model, teacher, parts.tokenizer, teacher_processor.tokenizer)
        emit(f"language model copied from the toy LLaVA ({cfg.teacher})")
    emit(f"config {json.dumps(asdict(cfg))}")
    emit(f"spec {json.dumps(asdict(parts.spec))}")
    emit(f"model parameters {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    # throw-away linear probes of the merged tokens (not shipped): colour and shape of each cell
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(parts.spec.text_hidden, len(COLOR_NAMES) + 1),
                                 "shape": torch.nn.Linear(parts.spec.text_hidden, len(SHAPES) + 1)})
    visual = [*model.model.visual.parameters(), *heads.parameters()]
    visual_ids = {id(p) for p in visual}
    lm = [p for p in model.parameters() if id(p) not in visual_ids]
    if cfg.stage == "distill":
        for p in lm:
            p.requires_grad_(False)
        lm = []
    groups = []
    for params, lr in ((visual, cfg.lr), (lm, cfg.lm_lr)):
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "base": lr},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "base": lr}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    trainable = [p for g in groups for p in g["params"]]

    captured: dict = {}
    model.model.visual.register_forward_hook(lambda m, a, o: captured.__setitem__("v", o.pooler_output))
    lookup_attention = model.model.language_model.layers[cfg.lookup_layer].self_attn
    lookup_attention.register_forward_hook(
        lambda m, a, kw, o: captured.update(hidden=kw["hidden_states"] if "hidden_states" in kw else a[0],
                                            rope=kw["position_embeddings"]), with_kwargs=True)
    image_token_id = model.config.image_token_id
    data_rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    held_out = eval_set(10_000 + cfg.seed, cfg.eval_scenes)
    chance = chance_by_type(held_out)
    emit(f"held-out eval: {len(held_out)} questions; chance {json.dumps({k: round(v, 3) for k, v in chance.items()})}")

    total = cfg.steps
    t0 = time.time()
    last_eval = t0
    step = 0
    history: list[dict] = []
    running: dict[str, float] = defaultdict(float)

    def evaluate_and_save(final: bool = False) -> dict:
        model.eval()
        preds = predict(parts, held_out)
        model.train()
        acc = accuracy_by_type(held_out, preds)
        mean = sum(acc.values()) / len(acc)
        row = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "mean": round(mean, 4),
               **{t: round(a, 3) for t, a in sorted(acc.items())}}
        history.append(row)
        emit("eval " + " ".join(f"{t}={acc[t]:.2f}(chance {chance[t]:.2f})" for t in sorted(acc))
             + f" | mean {mean:.3f} step {step}")
        save_checkpoint(parts, out, {"family": "qwen2_5_vl", "step": step, "total_steps": total,
                                     "seed": cfg.seed, "final": final, "config": asdict(cfg), "eval": row,
                                     "chance": chance})
        (out / "train_history.json").write_text(json.dumps(history, indent=1) + "\n")
        return row

    model.train()
    while True:
        if cfg.steps is None and (step == 10 or (step % 50 == 0 and total and step < 0.9 * total)):
            per_step = (time.time() - t0) / step
            total = max(step + 1, int(cfg.minutes * 60 / per_step))
            emit(f"{per_step:.2f} s/step so far -> schedule of {total} steps")
        if total is not None and step >= total:
            break
        factor = lr_factor(step, total, cfg.minutes, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = g["base"] * factor
        batch = make_batch(data_rng, parts, teacher_processor, cfg)
        with torch.no_grad():
            target = torch.cat(teacher.model.get_image_features(pixel_values=batch["teacher_pixel_values"])
                               .pooler_output)
        if cfg.stage == "distill":
            student = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
                                .pooler_output)
            loss_lm = student.new_zeros(())
        else:
            outputs = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                                     "image_grid_thw", "mm_token_type_ids")})
            student, loss_lm = captured["v"], outputs.loss
        if cfg.distill_norm == "dim":
            loss_distill = ((student - target) / (target.std(0) + 1e-3)).pow(2).mean()
        else:
            loss_distill = F.mse_loss(student, target) / target.pow(2).mean()
        normed = F.layer_norm(student, (student.shape[-1],))
        loss_dense = (F.cross_entropy(heads["color"](normed), batch["dense_color"])
                      + F.cross_entropy(heads["shape"](normed), batch["dense_shape"]))
        loss = loss_lm + cfg.distill * loss_distill + cfg.aux_dense * loss_dense
        running["dense"] += float(loss_dense.detach())
        if cfg.stage == "joint" and cfg.aux_lookup and batch["lookups"]:
            # the toy LLaVA's lookup supervision (train.lookup_loss), here under 3-D positions: the rotary
            # cos/sin the layer received are the mRoPE rows already recomposed into one (B, L, head_dim) pair
            loss_lookup = lookup_loss(captured, lookup_attention, batch, image_token_id, cfg.lookup_heads)
            loss = loss + cfg.aux_lookup * loss_lookup
            running["lookup"] += float(loss_lookup.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        running["lm"] += float(loss_lm.detach())
        running["distill"] += float(loss_distill.detach())
        if step % cfg.log_every == 0:
            emit(f"step {step}/{total} lr x{factor:.3f} " + " ".join(
                f"{k} {v / cfg.log_every:.4f}" for k, v in running.items())
                + f" | {(time.time() - t0) / step:.2f} s/step, {(time.time() - t0) / 60:.1f} min")
            running.clear()
        if time.time() - last_eval >= cfg.eval_every:
            evaluate_and_save()
            last_eval = time.time()
    final = evaluate_and_save(final=True)
    emit(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; final mean {final['mean']:.3f}")
    log_file.close()
    return final
