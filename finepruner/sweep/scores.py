"""Per-question scores of a run, for paired statistics (``finepruner.sweep.stats``).

Each benchmark's answers become *units* with sufficient statistics, so that the benchmark's own metric
can be recomputed on any resample of the units:

==========  ==================  ==========================  ==================================
benchmark   unit                statistics per unit          metric from the summed statistics
==========  ==================  ==========================  ==================================
POPE        question            one-hot [tp, fp, tn, fn]     F1 per category, mean over categories
MME         image pair          [correct, questions,         per subtask 100·acc + 100·acc+,
                                 both correct, full pair]     summed (perception / cognition / total)
MMBench     circular group      [hit, 1]                     100·mean (circular accuracy)
others      question            [score, 1]                   100·mean (accuracy, VQA accuracy)
==========  ==================  ==========================  ==================================

POPE and MME units are stratified (category, subtask): resampling keeps each stratum's size. Correct /
incorrect per question (for McNemar's test) exists where the metric is built from binary outcomes (POPE,
MME, GQA, SQA, MMBench groups); soft VQA accuracies (TextVQA, VQAv2, VizWiz, MM-Vet) have none.
The per-question values reuse the eval package's scorer functions, so they agree with its metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MME_METRICS = ("perception", "cognition", "total")


class NoQuestionScores(ValueError):
    """The benchmark (or split) has no local per-question scores (e.g. a server-scored test split)."""


@dataclass
class QuestionScores:
    benchmark: str
    metric: str
    kind: str  # "mean" | "pope_f1" | "mme"
    keys: list[str]
    strata: list[str]
    values: np.ndarray  # [units, k]
    correct_keys: list[str] | None = None
    correct: np.ndarray | None = None  # [questions] 0/1

    def value(self) -> float:
        """The metric on every unit (equals the scorer's headline for complete runs)."""
        return float(metric_from_sums(self.kind, self.stratum_sums(self.values))[()])

    def stratum_sums(self, values: np.ndarray) -> dict[str, np.ndarray]:
        strata = np.asarray(self.strata)
        return {s: values[strata == s].sum(axis=0) for s in dict.fromkeys(self.strata)}


def metric_from_sums(kind: str, sums: dict[str, np.ndarray]) -> np.ndarray:
    """The metric from per-stratum summed statistics (last axis = statistics; leading axes = resamples)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "mean":
            total = sum(sums.values())
            return 100.0 * total[..., 0] / total[..., 1]
        if kind == "pope_f1":
            f1s = []
            for s in sums.values():
                tp, fp, fn = s[..., 0], s[..., 1], s[..., 3]
                precision = tp / (tp + fp)
                recall = tp / (tp + fn)
                f1s.append(100.0 * 2 * precision * recall / (precision + recall))
            return np.mean(f1s, axis=0)
        if kind == "mme":
            out = 0.0
            for s in sums.values():
                acc = np.where(s[..., 1] > 0, s[..., 0] / np.maximum(s[..., 1], 1), 0.0)
                acc_plus = np.where(s[..., 3] > 0, s[..., 2] / np.maximum(s[..., 3], 1), 0.0)
                out = out + 100.0 * acc + 100.0 * acc_plus
            return np.asarray(out, dtype=float)
    raise ValueError(f"unknown metric kind {kind!r}")


def _key(*parts: Any) -> str:
    return json.dumps(list(parts), ensure_ascii=False, default=str)


def _mean_scores(bench: str, metric: str, items: list[tuple[str, float]], binary: bool) -> QuestionScores:
    keys = [k for k, _ in items]
    values = np.array([[v, 1.0] for _, v in items], dtype=float).reshape(-1, 2)
    return QuestionScores(
        bench, metric, "mean", keys, ["all"] * len(keys), values,
        correct_keys=keys if binary else None,
        correct=values[:, 0].round().astype(np.int8) if binary else None,
    )


def question_scores(
    spec: str,
    answers: list[dict[str, Any]],
    data_root: str | Path,
    *,
    files: dict[str, str] | None = None,
    run_dir: str | Path | None = None,
    metric: str | None = None,
) -> QuestionScores:
    """Per-question units of ``answers`` for benchmark ``spec`` (see the module docstring).

    ``metric`` selects MME's ``perception`` (default, the headline), ``cognition`` or ``total``.
    ``run_dir`` is where MM-Vet's judge grades were written (``<bench>/submission/mmvet_grades.json``).
    """
    from finepruner.eval import benchmarks

    bench = benchmarks.get(spec, files=files)
    name = bench.name
    if name == "pope":
        return _pope(bench, answers, data_root)
    if name == "mme":
        return _mme(bench, answers, data_root, metric or "perception")
    if name == "gqa":
        from finepruner.eval.benchmarks.gqa import gqa_prediction
        from finepruner.eval.io import read_json

        gt = read_json(bench.path(data_root, "annotations"))
        preds = {str(a["question_id"]): gqa_prediction(a["text"]) for a in answers}
        items = [
            (_key(qid), float(preds[qid] == q["answer"]))
            for qid, q in gt.items()
            if q.get("isBalanced", True) and qid in preds
        ]
        return _mean_scores(spec, "accuracy", items, binary=True)
    if name == "textvqa":
        from finepruner.eval.benchmarks.textvqa import textvqa_accuracy, textvqa_question
        from finepruner.eval.io import read_json

        data = read_json(bench.path(data_root, "annotations"))["data"]
        ann = {(a["image_id"], a["question"].lower()): a for a in data}
        items = []
        for a in answers:
            entry = ann.get((a["question_id"], textvqa_question(a.get("prompt", ""))))
            if entry is not None:
                items.append((_key(a["question_id"], a.get("prompt")), textvqa_accuracy(a["text"], entry["answers"])))
        return _mean_scores(spec, "accuracy", items, binary=False)
    if name == "vqav2":
        if bench.split != "val":
            raise NoQuestionScores(f"{spec}: test-dev is scored on the EvalAI server; no per-question scores")
        from finepruner.eval.benchmarks.vqav2 import vqav2_question_accuracy
        from finepruner.eval.io import read_json

        anns = {a["question_id"]: a for a in read_json(bench.path(data_root, "annotations"))["annotations"]}
        items = [
            (_key(a["question_id"]),
             vqav2_question_accuracy(a["text"], [x["answer"] for x in anns[a["question_id"]]["answers"]]))
            for a in answers
            if a["question_id"] in anns
        ]
        return _mean_scores(spec, "accuracy", items, binary=False)
    if name == "vizwiz":
        if bench.split != "val":
            raise NoQuestionScores(f"{spec}: the test split is scored on the EvalAI server; no per-question scores")
        from finepruner.eval.normalize import evalai_normalize, leave_one_out_accuracy

        ann = bench._val_annotations(data_root)
        items = []
        for a in answers:
            qid = a["question_id"]
            if isinstance(qid, int) and 0 <= qid < len(ann):
                gts = [evalai_normalize(x["answer"]) for x in ann[qid].get("answers", [])]
                items.append((_key(qid), leave_one_out_accuracy(evalai_normalize(a["text"]), gts)))
        return _mean_scores(spec, "accuracy", items, binary=False)
    if name == "sqa":
        from finepruner.eval.benchmarks.base import index_answers_by_id
        from finepruner.eval.benchmarks.sqa import sqa_parse, sqa_pred_index
        from finepruner.eval.io import read_json

        problems = read_json(bench.path(data_root, "problems"))
        test_ids = read_json(bench.path(data_root, "pid_splits"))["test"]
        preds = index_answers_by_id(answers)
        items = []
        for pid in test_ids:
            pred = preds.get(pid)
            if pred is None or "<image>" not in pred.get("prompt", ""):
                continue
            ok = sqa_pred_index(sqa_parse(pred["text"]), len(problems[pid]["choices"])) == problems[pid]["answer"]
            items.append((_key(pid), float(ok)))
        return _mean_scores(spec, "img_accuracy", items, binary=True)
    if name in ("mmbench", "mmbench_cn"):
        return _mmbench(bench, answers, data_root)
    if name == "mmvet":
        return _mmvet(spec, bench, run_dir)
    raise NoQuestionScores(f"{spec}: no per-question scores for this benchmark")


def _pope(bench: Any, answers: list[dict[str, Any]], data_root: str | Path) -> QuestionScores:
    from finepruner.eval.benchmarks.pope import pope_parse
    from finepruner.eval.io import read_jsonl

    questions = read_jsonl(bench.path(data_root, "questions"))
    category = {q["question_id"]: q.get("category") for q in questions}
    keys, strata, rows, correct = [], [], [], []
    for cat, label_file in bench.label_files(data_root).items():
        cur = [a for a in answers if category.get(a["question_id"]) == cat]
        labels = [json.loads(line)["label"] for line in label_file.read_text().splitlines() if line.strip()]
        # zipped in answer order, as the official script (and finepruner's scorer) do
        for a, label in zip(cur, labels, strict=False):
            pred = pope_parse(a["text"])
            onehot = [
                pred == "yes" and label == "yes",
                pred == "yes" and label == "no",
                pred == "no" and label == "no",
                pred == "no" and label != "no",
            ]
            keys.append(_key(a["question_id"]))
            strata.append(cat)
            rows.append([float(x) for x in onehot])
            correct.append(int(pred == ("no" if label == "no" else "yes")))
    values = np.array(rows, dtype=float).reshape(-1, 4)
    return QuestionScores(bench.spec, "mean_f1", "pope_f1", keys, strata, values, keys,
                          np.array(correct, dtype=np.int8))


def _mme(bench: Any, answers: list[dict[str, Any]], data_root: str | Path, metric: str) -> QuestionScores:
    from finepruner.eval.benchmarks.mme import (
        COGNITION,
        PERCEPTION,
        load_mme_ground_truth,
        mme_ground_truth_key,
        mme_parse,
    )

    if metric not in MME_METRICS:
        raise ValueError(f"MME metric must be one of {MME_METRICS}, got {metric!r}")
    wanted = {"perception": PERCEPTION, "cognition": COGNITION, "total": (*PERCEPTION, *COGNITION)}[metric]
    gt = load_mme_ground_truth(bench.path(data_root, "ground_truth"))
    per_cat: dict[str, list[tuple[str, str, str]]] = {}
    for a in answers:
        key = mme_ground_truth_key(a, gt)
        if key is not None:
            per_cat.setdefault(key[0], []).append((gt[key], a["text"], _key(a["question_id"], a.get("prompt"))))
    keys, strata, rows, qkeys, correct = [], [], [], [], []
    for cat in wanted:
        items = per_cat.get(cat, [])
        hits = [g.lower() == mme_parse(p.replace("\t", " ").replace("\n", " ").lower() + "\n") for g, p, _ in items]
        qkeys += [k for _, _, k in items]
        correct += [int(h) for h in hits]
        for i in range(0, len(items), 2):
            pair = hits[i : i + 2]
            full = len(pair) == 2
            keys.append(items[i][2])
            strata.append(cat)
            rows.append([float(sum(pair)), float(len(pair)), float(full and all(pair)), float(full)])
    values = np.array(rows, dtype=float).reshape(-1, 4)
    return QuestionScores(bench.spec, metric, "mme", keys, strata, values, qkeys, np.array(correct, dtype=np.int8))


def _mmbench(bench: Any, answers: list[dict[str, Any]], data_root: str | Path) -> QuestionScores:
    from finepruner.eval.benchmarks.mmbench import CIRCULAR, circular_eval, is_na, read_tsv

    meta_rows = read_tsv(bench.path(data_root, "questions"))
    if not meta_rows or "answer" not in meta_rows[0] or any(is_na(r.get("answer")) for r in meta_rows):
        raise NoQuestionScores(f"{bench.spec}: no ground truth in the TSV (server-scored split)")
    meta = {int(r["index"]): r for r in meta_rows}
    groups: dict[int, list[dict[str, Any]]] = {}
    for a in answers:
        idx = int(a["question_id"])
        if idx in meta:
            groups.setdefault(idx % CIRCULAR, []).append({"index": idx, "prediction": str(a["text"])})
    items = []
    for gid in sorted(groups):
        res = circular_eval(groups[gid], meta)  # rules only (no judge): one circular group at a time
        if res["groups"]:
            items.append((_key(gid), float(res["hits"])))
    return _mean_scores(bench.spec, "circular_accuracy", items, binary=True)


def _mmvet(spec: str, bench: Any, run_dir: str | Path | None) -> QuestionScores:
    path = None
    if run_dir is not None:
        found = sorted(Path(run_dir).glob("**/mmvet_grades.json"))
        path = found[0] if found else None
    if path is None:
        raise NoQuestionScores(f"{spec}: no judge grades (mmvet_grades.json) in the run folder")
    grades: dict[str, list[float]] = {}
    for g in json.loads(path.read_text())["grades"]:
        grades.setdefault(g["id"], []).append(float(g["score"]))
    items = [(_key(k), sum(v) / len(v)) for k, v in sorted(grades.items())]
    return _mean_scores(spec, "total", items, binary=False)


def run_question_scores(record: Any, store: Any, data_root: str | Path, metric: str | None = None) -> QuestionScores:
    """Per-question scores of a stored run (reads its answers file)."""
    from finepruner.eval.io import read_answers

    path = store.absolute(record.answers_path)
    if path is None or not path.is_file():
        raise NoQuestionScores(f"run {record.run_id}: answers file not found ({record.answers_path})")
    files = (record.settings.get("files") or {}).get(record.benchmark.split(":")[0])
    return question_scores(record.benchmark, read_answers(path), data_root, files=files,
                           run_dir=store.absolute(record.run_dir), metric=metric)
