"""TextVQA val with OCR tokens (spec ``eval_protocol.md`` section 7).

Scoring as LLaVA's ``eval_textvqa.py``: the question is recovered from the saved ``prompt``
(``prompt_processor``), the annotation found by ``(image_id, question.lower())`` (``question_id`` is the
image id), then the EvalAI processor on prediction and all 10 answers and leave-one-out accuracy.
Per answer (``process_results``, answer-driven as ``eval_textvqa.py``): ``accuracy`` ``{key, score}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, Mean, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import Benchmark
from finepruner.eval.errors import AnswersError
from finepruner.eval.io import read_json
from finepruner.eval.normalize import evalai_normalize, leave_one_out_accuracy

_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question(prompt: str) -> str:
    """LLaVA's ``prompt_processor``: the lower-cased question inside a saved TextVQA prompt."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        if match is None:
            raise AnswersError(f"TextVQA prompt without 'Question: ... Short answer:': {prompt[:80]!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise AnswersError(f"cannot recover the TextVQA question from prompt {prompt[:80]!r}")
    return question.lower()


def textvqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """``TextVQAAccuracyEvaluator`` for one question (exactly 10 answers, as the original asserts)."""
    if len(gt_answers) != 10:
        raise AnswersError(f"TextVQA expects 10 ground-truth answers, got {len(gt_answers)}")
    return leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(g) for g in gt_answers])


@register
class TextVQA(Benchmark):
    name = "textvqa"
    subdir = "textvqa"
    splits = ("val",)
    max_new_tokens = 128
    default_files = {
        "val": {
            "questions": "llava_textvqa_val_v051_ocr.jsonl",
            "images": "train_images",
            "annotations": "TextVQA_0.5.1_val.json",
        }
    }
    inference_keys = {"val": ("questions", "images")}
    scoring_keys = {"val": ("annotations",)}
    description = "TextVQA val (5,000, with OCR tokens); metric: VQA accuracy"

    def answer_identity(self, answer: Mapping[str, Any]) -> Any:
        """``(question_id, prompt)``: one image (``question_id``) has several questions."""
        return [answer["question_id"], answer.get("prompt")]

    headline = "accuracy"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"accuracy": Mean()}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: the annotation entry (``answers``: the 10 human answers)."""
        key = unit_key(answer["question_id"], answer.get("prompt"))
        return {"accuracy": {"key": key, "score": textvqa_accuracy(answer["text"], question["answers"])}}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        data = read_json(self.path(data_root, "annotations"))["data"]
        ann = {(a["image_id"], a["question"].lower()): a for a in data}
        values, unknown = [], 0
        for a in answers:
            entry = ann.get((a["question_id"], textvqa_question(a.get("prompt", ""))))
            if entry is None:
                unknown += 1
                continue
            values.append(self.process_results(entry, a))
        counts = {
            "questions": len(ann),
            "answers": len(answers),
            "unknown": unknown,
            "missing": len(ann) - len(values),
        }
        return QuestionResults(self.spec, values, {"counts": counts})

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        metrics = self.aggregate(results)
        return self.scored_result(
            results, accuracy=metrics["accuracy"], samples=len(results.values), counts=results.info["counts"]
        )
