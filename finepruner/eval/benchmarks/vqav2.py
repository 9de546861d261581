"""VQAv2: test-dev (EvalAI submission) and val (official local scorer) (spec ``eval_protocol.md`` 3, 2.2).

Test-dev: ``convert_vqav2_for_submission.py`` -- one ``{"question_id", "answer"}`` for **every** question
of ``llava_vqav2_mscoco_test2015.jsonl`` (missing -> ``""``), answers through the EvalAI processor.
Val: questions from the official ``v2_OpenEnded_mscoco_val2014_questions.json`` with LLaVA's prompt,
scored with GT-Vision-Lab ``vqaEval.py`` (prediction: punctuation + digits/articles; ground truth:
punctuation only when the 10 answers are not unanimous), overall and per answer type, 2 decimals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import (
    SHORT_ANSWER,
    Benchmark,
    Sample,
    load_llava_questions,
    result,
)
from finepruner.eval.io import check_answers_coverage, read_json, read_jsonl
from finepruner.eval.normalize import evalai_normalize, vqa_eval_normalize_prediction, vqa_process_punctuation


def vqav2_question_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """``vqaEval`` accuracy of one question (0-1), by index over the annotators."""
    gts = [g.replace("\n", " ").replace("\t", " ").strip() for g in gt_answers]
    pred = vqa_eval_normalize_prediction(prediction)
    if len(set(gts)) > 1:
        gts = [vqa_process_punctuation(g) for g in gts]
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matching / 3))
    return sum(accs) / len(accs) if accs else 0.0


def vqav2_submission(
    all_questions: list[dict[str, Any]], answers: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Upload list over every test-std question; unanswered ones get ``""``."""
    by_id = {a["question_id"]: a["text"] for a in answers}
    return [
        {
            "question_id": q["question_id"],
            "answer": evalai_normalize(by_id[q["question_id"]]) if q["question_id"] in by_id else "",
        }
        for q in all_questions
    ]


@register
class VQAv2(Benchmark):
    name = "vqav2"
    subdir = "vqav2"
    splits = ("test-dev", "val")
    max_new_tokens = 128
    default_files = {
        "test-dev": {
            "questions": "llava_vqav2_mscoco_test-dev2015.jsonl",
            "images": "test2015",
            "test_all": "llava_vqav2_mscoco_test2015.jsonl",
        },
        "val": {
            "questions": "v2_OpenEnded_mscoco_val2014_questions.json",
            "images": "val2014",
            "annotations": "v2_mscoco_val2014_annotations.json",
        },
    }
    inference_keys = {"test-dev": ("questions", "images"), "val": ("questions", "images")}
    scoring_keys = {"test-dev": ("questions",), "val": ("annotations",)}
    description = "VQAv2 test-dev (107,394; EvalAI) or val (214,354; official local scorer, not test-dev)"

    def load(self, data_root: str | Path) -> list[Sample]:
        image_dir = self.path(data_root, "images")
        if self.split == "test-dev":
            return load_llava_questions(self.path(data_root, "questions"), image_dir)
        samples = []
        for q in read_json(self.path(data_root, "questions"), kind="question file")["questions"]:
            text = f"{q['question']}\n{SHORT_ANSWER}"
            samples.append(
                Sample(
                    question_id=q["question_id"],
                    prompt=text,
                    text=text,
                    image=image_dir / f"COCO_val2014_{q['image_id']:012d}.jpg",
                )
            )
        return samples

    def score(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> dict[str, Any]:
        if self.split == "val":
            return self._score_val(answers, data_root)
        questions = read_jsonl(self.path(data_root, "questions"))
        counts = check_answers_coverage([q["question_id"] for q in questions], answers)
        test_all = self.path(data_root, "test_all")
        note = None
        if test_all.is_file():
            all_questions = read_jsonl(test_all)
        else:
            all_questions = questions
            note = (
                f"{test_all} not found: the submission covers only the test-dev questions; EvalAI expects "
                "all 447,793 test-std question ids"
            )
        sub = None
        if out_dir is not None:
            sub = out_dir / f"vqav2_test-dev_{model_id}.json"
            sub.parent.mkdir(parents=True, exist_ok=True)
            sub.write_text(json.dumps(vqav2_submission(all_questions, answers)))
        return result(
            self,
            scored=False,
            submission=str(sub) if sub else None,
            counts=counts,
            reason="VQAv2 test-dev is scored by the EvalAI server (challenge 830, phase test-dev); "
            "use split val for a local (different) number",
            **({"note": note} if note else {}),
        )

    def _score_val(self, answers: list[dict[str, Any]], data_root: str | Path) -> dict[str, Any]:
        anns = {a["question_id"]: a for a in read_json(self.path(data_root, "annotations"))["annotations"]}
        counts = check_answers_coverage(anns, answers)
        accs: list[float] = []
        per_type: dict[str, list[float]] = {}
        for a in answers:
            ann = anns.get(a["question_id"])
            if ann is None:
                continue
            acc = vqav2_question_accuracy(a["text"], [x["answer"] for x in ann["answers"]])
            accs.append(acc)
            per_type.setdefault(ann.get("answer_type", "unknown"), []).append(acc)
        overall = round(100.0 * sum(accs) / len(accs), 2) if accs else None
        return result(
            self,
            scored=bool(accs),
            headline="accuracy",
            value=overall,
            accuracy=overall,
            per_answer_type={k: round(100.0 * sum(v) / len(v), 2) for k, v in sorted(per_type.items())},
            counts=counts,
            note="VQAv2 val with the official vqaEval rules; not comparable to test-dev",
        )
