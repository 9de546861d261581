"""The toy benchmark suite, written in LLaVA's ``playground/data/eval`` layout with the real file formats.

``write_suite(out, n, seed)`` writes four benchmarks under ``out`` (the data root), each loadable by
``finepruner.eval.benchmarks.get(name).load(out)`` and scored by the real scorer:

* ``pope/``: ``llava_pope_test.jsonl`` (adversarial ids 1.., random 10000001.., popular 20000001..),
  ``coco/coco_pope_{adversarial,popular,random}.json`` (label lines in question order) and the images
  in ``val2014/``. Per image and split: up to 2 positive and as many negative existence questions;
  the positives are shared by the splits, the negatives follow the split's kind (see
  :mod:`finepruner.toy.questions`). Headline: mean F1 of the three splits.
* ``gqa/``: ``llava_gqa_testdev_balanced.jsonl``, ``data/testdev_balanced_questions.json`` (GQA's
  question format, ``types.detailed`` = the toy question type) and ``data/images/``. One colour,
  shape, count and position question per image when the scene allows it. Headline: accuracy.
* ``MME/``: ``llava_mme.jsonl`` and ``MME_Benchmark_release_version/{existence,count,position,color}/``
  with each image beside its ``.txt`` (``question<TAB>Yes|No``, a Yes then a No question).
  Headline: perception score (sum of 100 acc + 100 acc+ over the 4 subtasks, max 800).
* ``mmbench/``: ``mmbench_dev_20230712.tsv`` with base64 PNG images and circular copies
  (``index + k * 1,000,000`` with the options rotated by k). Headline: circular accuracy.

TextVQA is left out: the toy scenes have no text to read (see ``docs/toy.md``).

``toy_suite.json`` at the data root records the seed, the per-question type and answer and every
image's scene description (used by the tests' rule check and by oracle selections).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from finepruner.toy.questions import (
    OPEN_TYPES,
    QUESTION_TYPES,
    Question,
    exist_question,
    make_question,
    negative_pair,
    q_color_yn,
    q_count_yn,
    q_exist,
    q_mcq,
    q_position_yn,
)
from finepruner.toy.scenes import Scene, generate_scene
from finepruner.toy.text import OPTION_LETTERS, SHORT_SUFFIX

SUITE_VERSION = 1
BENCHMARKS = ("pope", "gqa", "mme", "mmbench")
#: The fixed small suite of the demo and the tests.
DEFAULT_N = 20
DEFAULT_SEED = 1234
POPE_ID_BASE = {"adversarial": 1, "random": 10_000_001, "popular": 20_000_001}
POPE_ORDER = ("adversarial", "random", "popular")
MME_SUBTASKS = ("existence", "count", "position", "color")
CIRCULAR = 1_000_000
MMBENCH_CATEGORY = {"color": "color_recognition", "shape": "shape_recognition", "count": "object_counting"}
TSV_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source",
               "l2-category", "comment", "split", "image")
_SHORT = SHORT_SUFFIX  # "\nAnswer the question using a single word or phrase."


def _save_png(scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.render().save(path, format="PNG")


def _png_b64(scene: Scene) -> str:
    buf = io.BytesIO()
    scene.render().save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _scene(rng: random.Random, min_objects: int = 1) -> Scene:
    while True:
        scene = generate_scene(rng)
        if len(scene.objects) >= min_objects:
            return scene


def _record(q: Question, scene_ref: str, **extra) -> dict[str, Any]:
    return {"type": q.qtype, "question": q.text, "answer": q.answer, "options": q.options,
            "scene": scene_ref, "meta": q.meta, **extra}


# --------------------------------------------------------------------------------------------------


def _write_pope(root: Path, n: int, rng: random.Random, meta: dict) -> dict:
    folder = root / "pope"
    questions: dict[str, list[dict]] = {k: [] for k in POPE_ORDER}
    labels: dict[str, list[dict]] = {k: [] for k in POPE_ORDER}
    records = {}
    for i in range(n):
        scene = _scene(rng, min_objects=2)
        image = f"toy_val2014_{i:06d}.png"
        _save_png(scene, folder / "val2014" / image)
        meta["scenes"][f"pope/{image}"] = scene.description()
        objs = rng.sample(list(scene.objects), 2)
        positives = [exist_question(o.color, o.shape, "yes", negative="none") for o in objs]
        for kind in POPE_ORDER:
            negatives, used = [], set()
            for _ in range(len(positives)):
                pair = None
                for k in (kind, "popular", "random"):  # fall back when the scene has no such pair
                    for _try in range(8):
                        cand = negative_pair(scene, rng, k)
                        if cand is not None and cand not in used:
                            pair = cand
                            break
                    if pair is not None:
                        break
                used.add(pair)
                negatives.append(exist_question(*pair, "no", negative=k))
            qs = positives + negatives
            rng.shuffle(qs)
            for q in qs:
                qid = POPE_ID_BASE[kind] + len(questions[kind])
                questions[kind].append({"question_id": qid, "image": image, "text": q.text + _SHORT,
                                        "category": kind})
                labels[kind].append({"question_id": qid, "image": image, "text": q.text, "label": q.answer})
                records[str(qid)] = _record(q, f"pope/{image}", split=kind)
    _jsonl(folder / "llava_pope_test.jsonl", [r for k in POPE_ORDER for r in questions[k]])
    for kind in POPE_ORDER:
        _jsonl(folder / "coco" / f"coco_pope_{kind}.json", labels[kind])
    meta["questions"]["pope"] = records
    return {"path": "pope", "images": n, "questions": sum(len(v) for v in questions.values())}


def _write_gqa(root: Path, n: int, rng: random.Random, meta: dict) -> dict:
    folder = root / "gqa"
    rows, gt, records = [], {}, {}
    semantic = {"color": "attr", "shape": "attr", "count": "obj", "position": "rel"}
    for i in range(n):
        scene = _scene(rng)
        image_id = f"toy{i:06d}"
        _save_png(scene, folder / "data" / "images" / f"{image_id}.png")
        meta["scenes"][f"gqa/{image_id}.png"] = scene.description()
        for qtype in OPEN_TYPES:
            q = make_question(qtype, scene, rng)
            if q is None:
                continue
            qid = f"{i:06d}{OPEN_TYPES.index(qtype)}"
            rows.append({"question_id": qid, "image": f"{image_id}.png", "text": q.text + _SHORT,
                         "category": "default"})
            gt[qid] = {
                "semantic": [], "entailed": [], "equivalent": [qid], "question": q.text, "imageId": image_id,
                "isBalanced": True, "groups": {"global": None, "local": qtype}, "answer": q.answer,
                "semanticStr": "", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                "types": {"detailed": qtype, "semantic": semantic[qtype], "structural": "query"},
                "fullAnswer": q.answer,
            }
            records[qid] = _record(q, f"gqa/{image_id}.png")
    _jsonl(folder / "llava_gqa_testdev_balanced.jsonl", rows)
    (folder / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gt), encoding="utf-8")
    meta["questions"]["gqa"] = records
    return {"path": "gqa", "images": n, "questions": len(rows)}


def _mme_pair(subtask: str, scene: Scene, rng: random.Random) -> tuple[Question, Question] | None:
    if subtask == "existence":
        yes = q_exist(scene, rng, positive=True)
        no = q_exist(scene, rng, positive=False, kind=rng.choice(("popular", "adversarial")))
    elif subtask == "count":
        state = rng.getstate()
        yes = q_count_yn(scene, rng, positive=True)
        rng.setstate(state)  # same shape for both questions
        no = q_count_yn(scene, rng, positive=False)
    elif subtask == "position":
        state = rng.getstate()
        yes = q_position_yn(scene, rng, positive=True)
        rng.setstate(state)
        no = q_position_yn(scene, rng, positive=False)
    else:
        state = rng.getstate()
        yes = q_color_yn(scene, rng, positive=True)
        rng.setstate(state)
        no = q_color_yn(scene, rng, positive=False)
    return (yes, no) if yes is not None and no is not None else None


def _write_mme(root: Path, n: int, rng: random.Random, meta: dict) -> dict:
    folder = root / "MME"
    base = folder / "MME_Benchmark_release_version"
    rows, records = [], {}
    for subtask in MME_SUBTASKS:
        for i in range(n):
            while True:
                scene = _scene(rng)
                pair = _mme_pair(subtask, scene, rng)
                if pair is not None:
                    break
            name = f"{i:04d}.png"
            qid = f"{subtask}/{name}"
            _save_png(scene, base / subtask / name)
            meta["scenes"][f"MME/{qid}"] = scene.description()
            lines = []
            for q in pair:
                gt = "Yes" if q.answer == "yes" else "No"
                lines.append(f"{q.text} Please answer yes or no.\t{gt}")
                rows.append({"question_id": qid, "image": qid, "text": q.text + _SHORT, "category": subtask})
                records[f"{qid}|{q.text}"] = _record(q, f"MME/{qid}", subtask=subtask)
            (base / subtask / f"{i:04d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _jsonl(folder / "llava_mme.jsonl", rows)
    meta["questions"]["mme"] = records
    return {"path": "MME", "images": n * len(MME_SUBTASKS), "questions": len(rows)}


def _write_mmbench(root: Path, n: int, rng: random.Random, meta: dict) -> dict:
    folder = root / "mmbench"
    folder.mkdir(parents=True, exist_ok=True)
    rows, records = [], {}
    for i in range(n):
        base_type = ("color", "shape", "count")[i % 3]
        while True:
            scene = _scene(rng)
            q = q_mcq(scene, rng, base=base_type)
            if q is not None:
                break
        image = _png_b64(scene)
        meta["scenes"][f"mmbench/{i}"] = scene.description()
        value = q.meta["value"]
        for k in range(len(q.options)):
            options = q.options[k:] + q.options[:k]
            index = i + k * CIRCULAR
            letters = dict(zip(OPTION_LETTERS, options, strict=False))
            answer = OPTION_LETTERS[options.index(value)]
            rows.append({
                "index": index, "question": q.text, "hint": "", **{L: letters.get(L, "") for L in "ABCD"},
                "answer": answer, "category": MMBENCH_CATEGORY[base_type], "source": "finepruner-toy",
                "l2-category": "toy_perception", "comment": "", "split": "dev", "image": image,
            })
            records[str(index)] = {**_record(q, f"mmbench/{i}"), "options": options, "answer": answer}
    with (folder / "mmbench_dev_20230712.tsv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TSV_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    meta["questions"]["mmbench"] = records
    return {"path": "mmbench", "images": n, "questions": len(rows)}


_WRITERS = {"pope": _write_pope, "gqa": _write_gqa, "mme": _write_mme, "mmbench": _write_mmbench}


def write_suite(out: str | Path, n: int = 100, seed: int = 0,
                benchmarks: tuple[str, ...] = BENCHMARKS) -> dict[str, Any]:
    """Write the toy suite under ``out`` (a data root for ``finepruner.eval``); returns its summary.

    ``n`` = images per benchmark (per MME subtask). Deterministic: same ``n`` and ``seed``, same files.
    Each benchmark draws from its own seeded generator, so adding or removing one leaves the others alone.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    unknown = [b for b in benchmarks if b not in _WRITERS]
    if unknown:
        raise ValueError(f"unknown toy benchmark(s) {unknown}; available: {list(BENCHMARKS)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"version": SUITE_VERSION, "n": n, "seed": seed, "benchmarks": {},
                            "questions": {}, "scenes": {}}
    for bench in benchmarks:
        rng = random.Random(f"{seed}:{bench}")
        meta["benchmarks"][bench] = _WRITERS[bench](root, n, rng, meta)
    meta["chance"] = benchmark_chance()
    (root / "toy_suite.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def build_default_suite(root: str | Path | None = None, n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> Path:
    """Write the fixed small suite (demo and tests) into ``root`` or a new temporary folder; returns it."""
    path = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="finepruner-toy-"))
    write_suite(path, n=n, seed=seed)
    return path


def load_suite_meta(root: str | Path) -> dict[str, Any]:
    """The ``toy_suite.json`` written with a suite."""
    return json.loads((Path(root) / "toy_suite.json").read_text(encoding="utf-8"))


def question_type(meta: dict[str, Any], bench: str, answer: dict[str, Any]) -> str:
    """The toy question type of one LLaVA answer record (for per-type breakdowns)."""
    records = meta["questions"][bench]
    if bench == "mme":
        text = str(answer.get("prompt", "")).replace(_SHORT.strip(), "").strip()
        rec = records[f"{answer['question_id']}|{text}"]
        return f"{rec['type']}"
    rec = records[str(answer["question_id"])]
    return f"mcq_{rec['meta']['base']}" if rec["type"] == "mcq" else rec["type"]


# --------------------------------------------------------------------------------------------------
# chance levels


@lru_cache(maxsize=4)
def chance_levels(n_scenes: int = 3000, seed: int = 987) -> dict[str, dict[str, float]]:
    """Per question type: ``majority`` (always the most frequent answer) and ``uniform`` (random
    guess among the type's answers) accuracy, from ``n_scenes`` scenes of the training distribution."""
    rng = random.Random(seed)
    answers: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
    for _ in range(n_scenes):
        scene = generate_scene(rng)
        for t in QUESTION_TYPES:
            q = make_question(t, scene, rng)
            if q is not None:
                answers[t][q.answer] += 1
    out = {}
    for t, counts in answers.items():
        total = sum(counts.values())
        out[t] = {"majority": counts.most_common(1)[0][1] / total, "uniform": 1 / len(counts),
                  "answers": len(counts)}
    return out


def benchmark_chance() -> dict[str, dict[str, float]]:
    """Headline metrics of trivial answerers on the toy suite (for "beside chance" reporting).

    POPE: always "yes" (half the questions are positive). MME: a fair coin per question (acc 50,
    acc+ 25, so 75 per subtask, 300 of 800). MMBench: a random letter per row, all circular copies
    right (4 options: 0.25^4; 3 options: (1/3)^3; averaged over the 2:1 mix). GQA: per-type majority.
    """
    c = chance_levels()
    gqa = sum(c[t]["majority"] for t in OPEN_TYPES) / len(OPEN_TYPES)
    return {
        "pope": {"mean_f1": 100 * 2 * 0.5 / 1.5, "accuracy": 50.0, "answerer": "always yes"},
        "gqa": {"accuracy": 100 * gqa, "answerer": "per-type majority answer"},
        "mme": {"perception": 300.0, "acc": 50.0, "acc_plus": 25.0, "answerer": "coin flip"},
        "mmbench": {"circular_accuracy": 100 * (2 / 3 * 0.25**4 + 1 / 3 * (1 / 3) ** 3),
                    "answerer": "random letter"},
    }
