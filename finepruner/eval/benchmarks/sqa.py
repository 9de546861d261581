"""ScienceQA-IMG (spec ``eval_protocol.md`` section 6).

Inference as ``model_vqa_science --single-pred-prompt``; scoring as ``eval_science_qa.py``: letter
parsing (bare letter, ``"B. ..."``, or exactly one ``"The answer is X."``), case-sensitive, over every
pid of ``pid_splits["test"]`` (missing -> FAILED); the reported number is IMG-Accuracy, over answers
whose saved ``prompt`` contains ``<image>``.

Per question (``process_results``, every test pid): ``accuracy`` ``{key, score, failed}`` (an unanswered
pid scores 0, as FAILED), and ``img_accuracy`` with the same value when the answer's prompt has ``<image>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, Mean, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import LETTER_ANSWER, Benchmark, Sample, index_answers_by_id
from finepruner.eval.errors import DataError
from finepruner.eval.io import check_answers_coverage, read_json

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_parse(pred_text: str, options: tuple[str, ...] = OPTIONS) -> str:
    """The option letter of a prediction, or ``"FAILED"`` (``"a"`` -> FAILED: case-sensitive)."""
    if pred_text in options:
        return pred_text
    if len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
        return pred_text[0]
    found = _ANSWER_IS.findall(pred_text)
    return found[0] if len(found) == 1 else "FAILED"


def sqa_pred_index(letter: str, n_choices: int, options: tuple[str, ...] = OPTIONS) -> int:
    """``options.index(letter)`` if the letter is among the problem's choices, else -1."""
    return options.index(letter) if letter in options[:n_choices] else -1


@register
class ScienceQA(Benchmark):
    name = "sqa"
    subdir = "scienceqa"
    splits = ("test",)
    max_new_tokens = 1024
    default_files = {
        "test": {
            "questions": "llava_test_CQM-A.json",
            "images": "images/test",
            "problems": "problems.json",
            "pid_splits": "pid_splits.json",
        }
    }
    inference_keys = {"test": ("questions", "images")}
    scoring_keys = {"test": ("problems", "pid_splits")}
    description = "ScienceQA test (4,241; IMG subset 2,017); metric: IMG-Accuracy"

    def load(self, data_root: str | Path) -> list[Sample]:
        path = self.path(data_root, "questions")
        image_dir = self.path(data_root, "images")
        rows = read_json(path, kind="question file")
        samples = []
        for i, row in enumerate(rows):
            try:
                value = row["conversations"][0]["value"]
            except (KeyError, IndexError, TypeError) as err:
                raise DataError(f"{path}: entry {i} has no conversations[0].value") from err
            qs = value.replace("<image>", "").strip()
            cur_prompt = qs
            image = None
            if "image" in row:
                image = image_dir / row["image"]
                cur_prompt = "<image>\n" + cur_prompt
            samples.append(
                Sample(
                    question_id=row["id"],
                    prompt=cur_prompt + "\n" + LETTER_ANSWER,
                    text=qs + "\n" + LETTER_ANSWER,
                    image=image,
                )
            )
        return samples

    headline = "img_accuracy"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"img_accuracy": Mean(binary=True), "accuracy": Mean(binary=True)}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: the problem of ``problems.json`` with its ``pid``; ``answer`` None: FAILED."""
        text = answer["text"] if answer else "FAILED"
        prompt = answer.get("prompt", "") if answer else "Unknown"
        letter = sqa_parse(text)
        ok = sqa_pred_index(letter, len(question["choices"])) == question["answer"]
        value = {"key": unit_key(question["pid"]), "score": float(ok), "failed": letter == "FAILED"}
        return {"accuracy": value, **({"img_accuracy": value} if "<image>" in prompt else {})}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        problems = read_json(self.path(data_root, "problems"))
        test_ids = read_json(self.path(data_root, "pid_splits"))["test"]
        preds = index_answers_by_id(answers)
        values = [self.process_results({**problems[pid], "pid": pid}, preds.get(pid)) for pid in test_ids]
        info: dict[str, Any] = {"counts": check_answers_coverage(test_ids, answers)}
        if not any("img_accuracy" in v for v in values):
            info["reason"] = "no answered IMG question"
        return QuestionResults(self.spec, values, info)

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        metrics = self.aggregate(results)
        every, img = results.of("accuracy"), results.of("img_accuracy")
        return self.scored_result(
            results,
            img_accuracy=metrics["img_accuracy"],
            accuracy=metrics["accuracy"],
            total=len(every),
            correct=int(sum(v["score"] for v in every)),
            img_total=len(img),
            img_correct=int(sum(v["score"] for v in img)),
            failed_parses=sum(1 for v in every if v["failed"]),
            counts=results.info["counts"],
            **({"reason": results.info["reason"]} if "reason" in results.info else {}),
        )
