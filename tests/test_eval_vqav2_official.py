"""VQAv2 val scoring against numbers produced by the official pipeline on our own fixture (issue #12).

Fixture: ``tests/data/vqav2_official/`` -- 58 synthetic questions in the official VQAv2 formats
(``v2_OpenEnded_mscoco_val2014_questions.json``, ``v2_mscoco_val2014_annotations.json``) and a LLaVA
answers file. Every question's ``fixture_note`` names the quirk it exercises: unanswered questions, a
question answered twice, an answer to an unknown question, unanimous vs non-unanimous answers with
punctuation, articles, number words, case, ``'s``, commas between digits, more than 32 periods, ``\\n``/``\\t``,
non-ASCII digits, and a per-answer-type mean that is an exact rounding tie (78.125).

The OFFICIAL_* numbers below were obtained by running the official code, unchanged, on this fixture:

1. ``haotian-liu/LLaVA`` (commit c121f04) ``scripts/convert_vqav2_for_submission.py --split val --ckpt
   fixture`` with ``answers/val/fixture/merge.jsonl`` = ``answers.jsonl`` and, as its
   ``llava_vqav2_mscoco_test2015.jsonl``, the fixture's questions as LLaVA question lines (Python 3.11);
2. ``GT-Vision-Lab/VQA`` (commit a013f00) ``PythonHelperTools/vqaTools/vqa.py`` +
   ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, as in ``vqaEvalDemo.py``: ``VQA(annotations,
   questions)``, ``loadRes(upload, questions)``, ``VQAEval(vqa, res, n=2).evaluate()``, under Python
   2.7.18 (the code is Python 2; nothing was edited). Recorded: ``accuracy`` and ``evalQA``.

A Python 3 port of vqaEval.py (only ``print`` and indentation changed) gives the same per-question
numbers except question 100040 (100.0: Python 3's ``\\d`` matches the Arabic-Indic digits), and
overall 73.62, number 87.78, yes/no 78.12 (Python 3 rounds the 78.125 tie to even). We follow 2.7.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finepruner.eval import benchmarks
from finepruner.eval.benchmarks.vqav2 import (
    py2_round,
    vqa_eval_accuracy,
    vqav2_question_accuracy,
    vqav2_submission,
    vqav2_upload_answer,
)

FIXTURE = Path(__file__).parent / "data" / "vqav2_official"

# From the official run described in the module docstring (vqaEval.accuracy, Python 2.7.18).
OFFICIAL_OVERALL = 71.9
OFFICIAL_PER_ANSWER_TYPE = {"number": 76.67, "other": 57.65, "yes/no": 78.13}
OFFICIAL_PER_QUESTION_TYPE = {
    "how many": 86.25,
    "is the": 71.43,
    "is there a": 80.0,
    "what": 65.0,
    "what color is the": 53.33,
    "what is the": 71.67,
    "what number is": 0.0,
    "whose": 0.0,
}
# vqaEval.evalQA (round(100 * accuracy, 2)) of questions 100000, 100001, ... in annotation order.
OFFICIAL_EVAL_QA = [
    100.0, 100.0, 0.0, 0.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0,
    100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0,
    100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 0.0, 0.0, 0.0,
    0.0, 0.0, 100.0, 100.0, 100.0, 100.0, 100.0, 0.0, 100.0, 90.0,
    0.0, 0.0, 0.0, 0.0, 100.0, 0.0, 100.0, 100.0, 0.0, 100.0,
    100.0, 0.0, 100.0, 90.0, 100.0, 60.0, 30.0, 100.0,
]  # fmt: skip


def _answers() -> list[dict]:
    # parsed line by line like the converter (the fixture answers one question twice on purpose)
    return [json.loads(line) for line in (FIXTURE / "answers.jsonl").read_text(encoding="utf-8").splitlines()]


def _annotations() -> list[dict]:
    return json.loads((FIXTURE / "v2_mscoco_val2014_annotations.json").read_text(encoding="utf-8"))["annotations"]


def _val_bench():
    return benchmarks.get(
        "vqav2:val",
        files={
            "questions": str(FIXTURE / "v2_OpenEnded_mscoco_val2014_questions.json"),
            "annotations": str(FIXTURE / "v2_mscoco_val2014_annotations.json"),
        },
    )


def test_val_score_matches_official_pipeline(tmp_path: Path) -> None:
    m = _val_bench().score(_answers(), tmp_path)
    assert m["scored"] is True
    assert m["headline"] == {"metric": "accuracy", "value": OFFICIAL_OVERALL}
    assert m["accuracy"] == OFFICIAL_OVERALL
    assert m["per_answer_type"] == OFFICIAL_PER_ANSWER_TYPE
    assert m["per_question_type"] == OFFICIAL_PER_QUESTION_TYPE
    # 58 questions, 58 answer lines: one question answered twice, one unknown id, two questions unanswered
    assert m["counts"] == {"questions": 58, "answers": 58, "missing": 2, "unknown": 1}
    assert "2 of 58 questions have no answer" in m["warning"]
    # over the 56 answered questions only (what a --limit run wants): the official per-question values
    answered = official_answered_accuracies()
    assert m["answered_accuracy"] == pytest.approx(sum(answered) / len(answered), abs=0.01)


def official_answered_accuracies() -> list[float]:
    """The official per-question accuracies of the questions that have an answer."""
    answered = {a["question_id"] for a in _answers()}
    return [acc for ann, acc in zip(_annotations(), OFFICIAL_EVAL_QA) if ann["question_id"] in answered]


def test_val_per_question_matches_official_eval_qa() -> None:
    results = _val_bench().question_results(_answers(), FIXTURE)
    accs = [v["score"] for v in results.of("accuracy")]  # process_results of every annotated question
    assert [py2_round(100 * a, 2) for a in accs] == OFFICIAL_EVAL_QA


def test_fixture_questions_match_annotations() -> None:
    questions = json.loads((FIXTURE / "v2_OpenEnded_mscoco_val2014_questions.json").read_text(encoding="utf-8"))
    assert [q["question_id"] for q in questions["questions"]] == [a["question_id"] for a in _annotations()]
    assert len(_val_bench().load(FIXTURE)) == 58


def test_unanswered_question_is_the_empty_answer() -> None:
    assert vqav2_upload_answer(None) == ""
    assert vqav2_question_accuracy(None, ["yes"] * 10) == 0.0
    # the processed answer "?" is "" (question 100053 of the fixture)
    assert vqav2_question_accuracy(None, ["yes"] * 7 + ["?"] * 3) == pytest.approx(0.9)


def test_processing_only_when_answers_are_not_unanimous() -> None:
    # vqa_eval_accuracy takes the converter's output; unanimous answers are compared unprocessed
    assert vqa_eval_accuracy("brown", ["Brown"] * 10) == 0.0
    assert vqa_eval_accuracy("brown", ["Brown"] * 9 + ["tan"]) == 1.0
    assert vqa_eval_accuracy("man's", ["man's"] * 10) == 1.0
    # ... but the converter has already split the 's
    assert vqav2_question_accuracy("man's", ["man's"] * 10) == 0.0
    assert vqav2_question_accuracy("The red car", ["the red car"] * 10) == 0.0
    assert vqav2_question_accuracy("The red car", ["red car"] * 2 + ["the red car"] * 8) == 1.0
    # 40 periods: the converter removes 32, vqaEval's second pass (non-unanimous only) the rest
    assert vqav2_question_accuracy("x" + "." * 40, ["x"] * 5 + ["y"] * 5) == 1.0
    assert vqav2_question_accuracy("x" + "." * 40, ["x"] * 10) == 0.0


def test_py2_round() -> None:
    assert py2_round(78.125, 2) == 78.13  # exact tie: away from zero (Python 3's round gives 78.12)
    assert round(78.125, 2) == 78.12
    assert py2_round(2.675, 2) == 2.67  # 2.675 is 2.67499999... in binary: no tie
    assert py2_round(100 * 2 / 3, 2) == 66.67


def test_submission_uses_the_same_converter() -> None:
    sub = vqav2_submission(
        [{"question_id": 1}, {"question_id": 2}],
        [{"question_id": 1, "text": "Two dogs."}, {"question_id": 9, "text": "x"}],
    )
    assert sub == [{"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": ""}]
