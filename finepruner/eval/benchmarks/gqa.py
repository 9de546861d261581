"""GQA testdev-balanced (spec ``eval_protocol.md`` section 4).

``convert_gqa_for_eval.py`` keeps ``text.rstrip('.').lower()`` and nothing else; GQA's ``eval.py`` scores
exact match over the balanced questions; Binary = structural type other than "query", Open = "query".
Per question (``process_results``): ``accuracy`` and ``binary`` or ``open``, each ``{key, score}`` with
the question's structural and semantic types; every metric is a :class:`Mean`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, Mean, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import Benchmark
from finepruner.eval.io import read_json


def gqa_prediction(text: str) -> str:
    """LLaVA's conversion: only trailing periods stripped, lower-cased."""
    return text.rstrip(".").lower()


@register
class GQA(Benchmark):
    name = "gqa"
    subdir = "gqa"
    splits = ("testdev_balanced",)
    max_new_tokens = 128
    default_files = {
        "testdev_balanced": {
            "questions": "llava_gqa_testdev_balanced.jsonl",
            "images": "data/images",
            "annotations": "data/testdev_balanced_questions.json",
        }
    }
    inference_keys = {"testdev_balanced": ("questions", "images")}
    scoring_keys = {"testdev_balanced": ("annotations",)}
    description = "GQA testdev-balanced (12,578); metric: accuracy (exact match)"

    headline = "accuracy"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"accuracy": Mean(binary=True), "binary": Mean(binary=True), "open": Mean(binary=True)}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: an entry of ``testdev_balanced_questions.json`` with its ``question_id``."""
        types = question.get("types", {})
        value = {
            "key": unit_key(question["question_id"]),
            "score": float(gqa_prediction(answer["text"]) == question["answer"]),
            "structural": types.get("structural"),
            "semantic": types.get("semantic"),
        }
        return {"accuracy": value, "open" if types.get("structural") == "query" else "binary": value}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        gt = read_json(self.path(data_root, "annotations"))
        preds = {str(a["question_id"]): a for a in answers}
        values, missing = [], 0
        for qid, q in gt.items():
            if not q.get("isBalanced", True):
                continue
            if qid not in preds:
                missing += 1
                continue
            values.append(self.process_results({**q, "question_id": qid}, preds[qid]))
        counts = {
            "questions": sum(1 for q in gt.values() if q.get("isBalanced", True)),
            "answers": len(answers),
            "missing": missing,
            "unknown": sum(1 for k in preds if k not in gt),
        }
        return QuestionResults(self.spec, values, {"counts": counts})

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        metrics = self.aggregate(results)
        counts = results.info["counts"]
        acc_values = results.of("accuracy")
        by_type: dict[str, dict[str, list[Any]]] = {"structural": {}, "semantic": {}}
        for v in acc_values:
            for kind, groups in by_type.items():
                if v.get(kind) is not None:
                    groups.setdefault(v[kind], []).append(v)
        mean = self.aggregation()["accuracy"]
        extra = (
            {
                "warning": f"{counts['missing']} balanced questions have no prediction (the official eval.py "
                "would stop); accuracy is over the answered ones"
            }
            if counts["missing"] and acc_values
            else {}
        )
        return self.scored_result(
            results,
            accuracy=metrics["accuracy"],
            binary=metrics["binary"],
            open=metrics["open"],
            per_structural={k: mean(v) for k, v in sorted(by_type["structural"].items())},
            per_semantic={k: mean(v) for k, v in sorted(by_type["semantic"].items())},
            counts=counts,
            **extra,
        )
