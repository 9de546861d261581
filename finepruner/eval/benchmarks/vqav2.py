"""VQAv2: test-dev (EvalAI submission) and val (official local scorer) (spec ``eval_protocol.md`` 3, 2.2).

Test-dev: ``convert_vqav2_for_submission.py`` -- one ``{"question_id", "answer"}`` for **every** question
of ``llava_vqav2_mscoco_test2015.jsonl`` (missing -> ``""``), answers through the EvalAI processor.

Val: questions from the official ``v2_OpenEnded_mscoco_val2014_questions.json`` with LLaVA's prompt, scored
like the official pipeline run on val -- LLaVA's converter, then GT-Vision-Lab's evaluator:

1. ``haotian-liu/LLaVA`` ``scripts/convert_vqav2_for_submission.py``: ``{question_id: text}`` over the
   answers (the last answer of a question wins); for every question of the split the upload answer is
   ``EvalAIAnswerProcessor()(text)`` (``llava/eval/m4c_evaluator.py``, :func:`evalai_normalize`), or ``""``
   when the question has no answer -- it is scored like any other. Answers to other questions are dropped.
2. ``GT-Vision-Lab/VQA`` ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (``VQAEval.evaluate`` after
   the 2021 fix "Fixed processing answers bug"), over every question of the annotation file in file order
   (``vqa.getQuesIds()``; ``PythonHelperTools/vqaTools/vqa.py``): the upload answer and the ten answers get
   ``\\n``/``\\t`` -> space and ``strip()``; **only if** the stripped answers are not all equal
   (``len(set(gtAnswers)) > 1``) do the answers *and* the prediction go through ``processPunctuation`` and
   ``processDigitArticle`` (a unanimous question compares the stripped strings as they are, so an
   upper-case or ``"man's"``-style unanimous answer is never matched by a processed prediction).
   Question accuracy = mean over the answers of ``min(1, matches among the other nine / 3)``; overall,
   per answer type and per question type = ``round(100 * sum / count, 2)`` of the question accuracies.

``vqaEval.py`` is Python 2 code and is reproduced with Python 2.7 semantics where Python 3 differs: its
regexes' ``\\d`` is ASCII-only (see :mod:`finepruner.eval.normalize`) and ``round`` takes exact ties away
from zero (:func:`py2_round`). Entries are compared by index (the original compares the answer dicts,
which differ through ``answer_id`` in every official file).

Per question of val (``process_results``, every annotated question): ``accuracy`` ``{key, score,
answered, answer_type, question_type}``, aggregated by :class:`Mean` with ``vqaEval.py``'s rounding;
``answered_accuracy`` over the answered ones. Test-dev has no local per-question results.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
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
from finepruner.eval.io import check_answers_coverage, read_json, read_jsonl
from finepruner.eval.normalize import evalai_normalize, leave_one_out_accuracy, vqa_eval_process, vqa_eval_strip


def py2_round(x: float, ndigits: int = 2) -> float:
    """Python 2.7's ``round(x, ndigits)``: correctly rounded, exact ties away from zero (Python 3 rounds
    them to even: ``round(78.125, 2)`` is 78.12 there, 78.13 in ``vqaEval.py`` under Python 2.7)."""
    q = Decimal(1).scaleb(-ndigits)
    return float(Decimal(x).quantize(q, rounding=ROUND_HALF_UP))


def vqav2_upload_answer(text: str | None) -> str:
    """The answer ``convert_vqav2_for_submission.py`` writes: EvalAI-processed text, ``""`` if unanswered."""
    return "" if text is None else evalai_normalize(text)


def vqa_eval_accuracy(res_ans: str, gt_answers: Sequence[str]) -> float:
    """``VQAEval.evaluate``'s accuracy (0-1) of one question for the (uploaded) answer ``res_ans``."""
    gts = [vqa_eval_strip(g) for g in gt_answers]
    res_ans = vqa_eval_strip(res_ans)
    if len(set(gts)) > 1:
        gts = [vqa_eval_process(g) for g in gts]
        res_ans = vqa_eval_process(res_ans)
    return leave_one_out_accuracy(res_ans, gts)


def vqav2_question_accuracy(prediction: str | None, gt_answers: Sequence[str]) -> float:
    """Official-pipeline accuracy (0-1) of one question: the model's raw ``prediction`` (``None``: no
    answer) through the converter (:func:`vqav2_upload_answer`), then ``vqaEval`` (:func:`vqa_eval_accuracy`)."""
    return vqa_eval_accuracy(vqav2_upload_answer(prediction), gt_answers)


def vqav2_submission(all_questions: list[dict[str, Any]], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Upload list over every test-std question; unanswered ones get ``""``."""
    by_id = {a["question_id"]: a["text"] for a in answers}
    return [
        {"question_id": q["question_id"], "answer": vqav2_upload_answer(by_id.get(q["question_id"]))}
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

    headline = "accuracy"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"accuracy": Mean(rounding=py2_round), "answered_accuracy": Mean(rounding=py2_round)}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: an annotation of ``v2_mscoco_val2014_annotations.json``; ``answer`` None: the
        converter uploads ``""`` for it, scored like any other."""
        value = {
            "key": unit_key(question["question_id"]),
            "score": vqav2_question_accuracy(None if answer is None else answer["text"],
                                             [x["answer"] for x in question["answers"]]),
            "answer_type": question.get("answer_type", "unknown"),
            "question_type": question.get("question_type", "unknown"),
        }
        return {"accuracy": value, **({"answered_accuracy": value} if answer is not None else {})}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        if self.split == "val":
            annotations = read_json(self.path(data_root, "annotations"))["annotations"]
            counts = check_answers_coverage([a["question_id"] for a in annotations], answers)
            by_id = index_answers_by_id(answers)
            values = [self.process_results(ann, by_id.get(ann["question_id"])) for ann in annotations]
            info: dict[str, Any] = {"counts": counts}
            if counts["questions"] == counts["missing"]:
                info["reason"] = "no annotated question has an answer"
            return QuestionResults(self.spec, values, info)
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
        info = {
            "counts": counts,
            "submission": str(sub) if sub else None,
            "reason": "VQAv2 test-dev is scored by the EvalAI server (challenge 830, phase test-dev); "
            "use split val for a local (different) number",
            **({"note": note} if note else {}),
        }
        return QuestionResults(self.spec, [], info)

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        info = results.info
        counts = info["counts"]
        if self.split != "val":
            return result(self, scored=False, **info)
        if "reason" in info:
            return result(self, scored=False, counts=counts, reason=info["reason"])
        mean = self.aggregation()["accuracy"]
        per_answer_type: dict[str, list[Any]] = {}
        per_question_type: dict[str, list[Any]] = {}
        for v in results.of("accuracy"):
            per_answer_type.setdefault(v["answer_type"], []).append(v)
            per_question_type.setdefault(v["question_type"], []).append(v)
        metrics = self.aggregate(results)
        extra = {}
        if counts["missing"]:
            extra["answered_accuracy"] = metrics["answered_accuracy"]
            extra["warning"] = (
                f"{counts['missing']} of {counts['questions']} questions have no answer; as in the official "
                "pipeline they are scored as the empty answer (answered_accuracy: over the answered ones "
                "only, e.g. for a --limit run)"
            )
        return self.scored_result(
            results,
            accuracy=metrics["accuracy"],
            per_answer_type={k: mean(v) for k, v in sorted(per_answer_type.items())},
            per_question_type={k: mean(v) for k, v in sorted(per_question_type.items())},
            counts=counts,
            note="VQAv2 val scored like LLaVA's converter + the official vqaEval.py; not comparable to test-dev",
            **extra,
        )
