"""POPE adversarial / popular / random (spec ``eval_protocol.md`` section 8).

Scoring follows LLaVA's ``eval_pope.py``: per category (from ``coco/coco_pope_<cat>.json``) the label
lines are taken in file order, the k-th label belonging to the k-th question of that category in the
question file; a prediction is "no" iff the first sentence, commas removed, split on spaces, contains
``No``, ``not`` or ``no`` (case-sensitive), else "yes". The headline is the mean F1 of the splits (LLaVA
issues #626/#806).

The official script zips the answers of a category **in answer-file order** with the labels (no id
join), so answers in another order, or with a question missing, are silently scored against the wrong
labels there. finepruner matches each answer to its label by ``question_id`` (through its position in
the question file) and adds a ``warning`` when the answer order differs from the question order (where
the official script would give another number). For answers in question order both agree exactly.

Per question (``process_results``): ``mean_f1`` and ``mean_accuracy``, each ``{key, stratum (split),
pred, label}``, aggregated by :class:`Confusion` (F1, resp. accuracy, per split, mean over the splits);
the per-split figures are :func:`pope_metrics` of the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, Confusion, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import Benchmark, result
from finepruner.eval.errors import DataError
from finepruner.eval.io import check_answers_coverage, read_jsonl


def pope_parse(text: str) -> str:
    """``"yes"`` or ``"no"`` exactly as ``eval_pope.py`` (``"No, there is not."`` -> no, ``"NO"`` -> yes)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, Any]:
    """TP/FP/TN/FN (positive = yes) and accuracy, precision, recall, F1, yes-ratio, in percent."""
    pred = [0 if p == "no" else 1 for p in predictions]
    lab = [0 if x == "no" else 1 for x in labels]
    tp = fp = tn = fn = 0
    # zip, as the official script: extra answers or labels are ignored
    for p, g in zip(pred, lab, strict=False):
        if p == 1 and g == 1:
            tp += 1
        elif p == 1 and g == 0:
            fp += 1
        elif p == 0 and g == 0:
            tn += 1
        else:
            fn += 1
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall
        else None
    )
    acc = _div(tp + tn, tp + tn + fp + fn)
    yes_ratio = _div(pred.count(1), len(pred))

    def pct(x: float | None) -> float | None:
        return None if x is None else 100.0 * x

    return {
        "accuracy": pct(acc),
        "precision": pct(precision),
        "recall": pct(recall),
        "f1": pct(f1),
        "yes_ratio": pct(yes_ratio),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": len(pred),
        "n_labels": len(lab),
    }


def _read_labels(label_file: Path) -> list[str]:
    """The ``label`` of every line of a ``coco_pope_<cat>.json`` file, in file order."""
    labels = []
    for lineno, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            labels.append(json.loads(line)["label"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{label_file}:{lineno}: expected a JSON object with a 'label' field ({err})") from err
    return labels


@register
class Pope(Benchmark):
    name = "pope"
    subdir = "pope"
    splits = ("test",)
    max_new_tokens = 128
    default_files = {
        "test": {"questions": "llava_pope_test.jsonl", "images": "val2014", "annotations": "coco"}
    }
    inference_keys = {"test": ("questions", "images")}
    scoring_keys = {"test": ("questions", "annotations")}
    description = "POPE (3 splits, 8,910 questions); metric: mean F1 over adversarial/popular/random"

    def label_files(self, data_root: str | Path) -> dict[str, Path]:
        """``{category: coco_pope_<category>.json}`` from the annotation folder, sorted by name."""
        ann_dir = self.path(data_root, "annotations")
        if not ann_dir.is_dir():
            raise DataError(f"pope: annotation folder not found: {ann_dir}")
        files = {
            p.name[len("coco_pope_") : -len(".json")]: p for p in sorted(ann_dir.glob("coco_pope_*.json"))
        }
        if not files:
            raise DataError(f"pope: no coco_pope_<split>.json files in {ann_dir}")
        return files

    headline = "mean_f1"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"mean_f1": Confusion("f1"), "mean_accuracy": Confusion("accuracy")}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: ``{question_id, category, label}`` (the label line of its split)."""
        value = {
            "key": unit_key(question["question_id"]),
            "stratum": question["category"],
            "pred": pope_parse(answer["text"]),
            "label": question["label"],
        }
        return {"mean_f1": value, "mean_accuracy": value}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        questions = read_jsonl(self.path(data_root, "questions"))
        category = {q["question_id"]: q.get("category") for q in questions}
        counts = check_answers_coverage(category, answers)
        # question_id -> (position in the question file, index among its category's questions)
        position: dict[Any, tuple[int, int]] = {}
        seen_per_cat: dict[Any, int] = {}
        for pos, q in enumerate(questions):
            cat = q.get("category")
            position[q["question_id"]] = (pos, seen_per_cat.get(cat, 0))
            seen_per_cat[cat] = seen_per_cat.get(cat, 0) + 1
        known = [a for a in answers if a["question_id"] in position]
        unordered: list[str] = []
        values: list[dict[str, Any]] = []
        split_notes: dict[str, dict[str, Any]] = {}
        for cat, label_file in self.label_files(data_root).items():
            in_file_order = [a for a in known if category[a["question_id"]] == cat]
            cur = sorted(in_file_order, key=lambda a: position[a["question_id"]])
            if not cur:
                continue
            if cur != in_file_order:  # eval_pope.py zips a split's answers in answers-file order
                unordered.append(cat)
            labels = _read_labels(label_file)
            matched = [a for a in cur if position[a["question_id"]][1] < len(labels)]
            for a in matched:
                question = {"question_id": a["question_id"], "category": cat,
                            "label": labels[position[a["question_id"]][1]]}
                values.append(self.process_results(question, a))
            notes = []
            if len(matched) < len(cur):
                notes.append(f"{len(cur) - len(matched)} answers have no label line (only {len(labels)})")
            if len(cur) != len(labels):
                notes.append(
                    f"{len(cur)} answers vs {len(labels)} labels in {label_file.name}; matched by question_id "
                    "(the official script zips in order and would misalign them)"
                )
            split_notes[cat] = {"n_labels": len(labels), **({"warning": "; ".join(notes)} if notes else {})}
        warnings = []
        if unordered:
            warnings.append(
                f"answers of {', '.join(unordered)} are not in question-file order: matched to the labels by "
                "question_id; LLaVA's eval_pope.py zips them by position and would score this file differently"
            )
        info: dict[str, Any] = {"counts": counts, "splits": split_notes}
        if warnings:
            info["warning"] = "; ".join(warnings)
        if not split_notes:
            info["reason"] = "no answer belongs to a POPE split"
        return QuestionResults(self.spec, values, info)

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        info = results.info
        per_split: dict[str, list[dict[str, Any]]] = {cat: [] for cat in info["splits"]}
        for v in results.of("mean_f1"):
            per_split[v["stratum"]].append(v)
        splits = {}
        for cat, notes in info["splits"].items():
            vals = per_split[cat]
            splits[cat] = pope_metrics([v["pred"] for v in vals], [v["label"] for v in vals])
            splits[cat].update(notes)
        metrics = self.aggregate(results)
        return result(
            self,
            scored=bool(splits),
            headline="mean_f1",
            value=metrics["mean_f1"],
            mean_f1=metrics["mean_f1"],
            mean_accuracy=metrics["mean_accuracy"],
            splits=splits,
            counts=info["counts"],
            **({"warning": info["warning"]} if "warning" in info else {}),
            **({"reason": info["reason"]} if "reason" in info else {}),
        )
