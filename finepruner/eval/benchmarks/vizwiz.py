"""VizWiz: test (EvalAI submission) and val (local VQA accuracy) (spec ``eval_protocol.md`` section 5).

Test: ``convert_vizwiz_for_submission.py`` -- ``[{"image", "answer": EvalAIAnswerProcessor(text)}]`` in
question-file order, written with ``json.dump`` defaults. Val: questions built from ``val.json`` with the
same prompt; prediction and every crowd answer go through the EvalAI processor, then leave-one-out.
Per question of val (``process_results``): ``accuracy`` ``{key, score}``; the test split has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, Mean, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import (
    SHORT_ANSWER,
    Benchmark,
    Sample,
    index_answers_by_id,
    load_llava_questions,
    result,
)
from finepruner.eval.errors import DataError
from finepruner.eval.io import check_answers_coverage, read_json, read_jsonl
from finepruner.eval.normalize import evalai_normalize, leave_one_out_accuracy

UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."


def vizwiz_prompt(question: str) -> str:
    """``{question}\\nWhen ... 'Unanswerable'.\\nAnswer the question using a single word or phrase.``"""
    return f"{question}\n{UNANSWERABLE}\n{SHORT_ANSWER}"


def vizwiz_submission(
    questions: list[dict[str, Any]], answers: list[dict[str, Any]]
) -> tuple[list[dict], int]:
    """The upload list in question order and the number of questions without an answer (skipped)."""
    by_id = index_answers_by_id(answers)
    out, missing = [], 0
    for q in questions:
        a = by_id.get(q["question_id"])
        if a is None:
            missing += 1
            continue
        out.append({"image": q["image"], "answer": evalai_normalize(a["text"])})
    return out, missing


@register
class VizWiz(Benchmark):
    name = "vizwiz"
    subdir = "vizwiz"
    splits = ("test", "val")
    max_new_tokens = 128
    default_files = {
        "test": {"questions": "llava_test.jsonl", "images": "test"},
        "val": {"annotations": "val.json", "images": "val"},
    }
    inference_keys = {"test": ("questions", "images"), "val": ("annotations", "images")}
    scoring_keys = {"test": ("questions",), "val": ("annotations",)}
    description = "VizWiz test-dev (8,000; EvalAI) or val (4,319; local VQA accuracy)"

    def load(self, data_root: str | Path) -> list[Sample]:
        if self.split == "test":
            return load_llava_questions(self.path(data_root, "questions"), self.path(data_root, "images"))
        image_dir = self.path(data_root, "images")
        samples = []
        for i, item in enumerate(self._val_annotations(data_root)):
            text = vizwiz_prompt(item["question"])
            samples.append(Sample(question_id=i, prompt=text, text=text, image=image_dir / item["image"]))
        return samples

    def _val_annotations(self, data_root: str | Path) -> list[dict[str, Any]]:
        path = self.path(data_root, "annotations")
        data = read_json(path)
        if not isinstance(data, list) or (data and not {"image", "question"} <= set(data[0])):
            raise DataError(f"{path}: expected VizWiz's list of {{image, question, answers}}")
        return data

    headline = "accuracy"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"accuracy": Mean()}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: an entry of ``val.json`` with its index ``question_id``."""
        gts = [evalai_normalize(x["answer"]) for x in question.get("answers", [])]
        score = leave_one_out_accuracy(evalai_normalize(answer["text"]), gts)
        return {"accuracy": {"key": unit_key(question["question_id"]), "score": score}}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        if self.split == "test":
            questions = read_jsonl(self.path(data_root, "questions"))
            counts = check_answers_coverage([q["question_id"] for q in questions], answers)
            upload, missing = vizwiz_submission(questions, answers)
            sub = None
            if out_dir is not None:
                sub = out_dir / f"vizwiz_test_{model_id}.json"
                sub.parent.mkdir(parents=True, exist_ok=True)
                sub.write_text(json.dumps(upload))
            reason = "VizWiz test labels are private: upload the submission to EvalAI (challenge 2185)"
            if missing:
                reason += f"; {missing} questions have no answer, the official converter would refuse"
            info = {"counts": counts, "reason": reason, "submission": str(sub) if sub else None}
            return QuestionResults(self.spec, [], info)
        ann = self._val_annotations(data_root)
        counts = check_answers_coverage(range(len(ann)), answers)
        values = []
        for a in answers:
            qid = a["question_id"]
            if isinstance(qid, int) and 0 <= qid < len(ann):
                values.append(self.process_results({**ann[qid], "question_id": qid}, a))
        return QuestionResults(self.spec, values, {"counts": counts})

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        info = results.info
        if self.split == "test":
            return result(self, scored=False, submission=info["submission"], reason=info["reason"],
                          counts=info["counts"])
        return self.scored_result(
            results,
            accuracy=self.aggregate(results)["accuracy"],
            counts=info["counts"],
            note="VizWiz val, not the test-dev number of the paper",
        )
