"""ScienceQA-IMG (spec ``eval_protocol.md`` section 6).

Inference as ``model_vqa_science --single-pred-prompt``; scoring as ``eval_science_qa.py``: letter
parsing (bare letter, ``"B. ..."``, or exactly one ``"The answer is X."``), case-sensitive, over every
pid of ``pid_splits["test"]`` (missing -> FAILED); the reported number is IMG-Accuracy, over answers
whose saved ``prompt`` contains ``<image>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import LETTER_ANSWER, Benchmark, Sample, index_answers_by_id, result
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

    def score(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> dict[str, Any]:
        problems = read_json(self.path(data_root, "problems"))
        test_ids = read_json(self.path(data_root, "pid_splits"))["test"]
        preds = index_answers_by_id(answers)
        correct = total = img_correct = img_total = failed = 0
        for pid in test_ids:
            prob = problems[pid]
            pred = preds.get(pid)
            text = pred["text"] if pred else "FAILED"
            prompt = pred.get("prompt", "") if pred else "Unknown"
            letter = sqa_parse(text)
            failed += letter == "FAILED"
            ok = sqa_pred_index(letter, len(prob["choices"])) == prob["answer"]
            total += 1
            correct += ok
            if "<image>" in prompt:
                img_total += 1
                img_correct += ok
        counts = check_answers_coverage(test_ids, answers)
        img_acc = 100.0 * img_correct / img_total if img_total else None
        return result(
            self,
            scored=img_total > 0,
            headline="img_accuracy",
            value=img_acc,
            img_accuracy=img_acc,
            accuracy=100.0 * correct / total if total else None,
            total=total,
            correct=correct,
            img_total=img_total,
            img_correct=img_correct,
            failed_parses=failed,
            counts=counts,
            **({} if img_total else {"reason": "no answered IMG question"}),
        )
