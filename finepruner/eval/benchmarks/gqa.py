"""GQA testdev-balanced (spec ``eval_protocol.md`` section 4).

``convert_gqa_for_eval.py`` keeps ``text.rstrip('.').lower()`` and nothing else; GQA's ``eval.py`` scores
exact match over the balanced questions; Binary = structural type other than "query", Open = "query".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import Benchmark, result
from finepruner.eval.io import read_json


def gqa_prediction(text: str) -> str:
    """LLaVA's conversion: only trailing periods stripped, lower-cased."""
    return text.rstrip(".").lower()


def _pct(v: list[float]) -> float | None:
    return 100.0 * sum(v) / len(v) if v else None


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

    def score(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> dict[str, Any]:
        gt = read_json(self.path(data_root, "annotations"))
        preds = {str(a["question_id"]): gqa_prediction(a["text"]) for a in answers}
        scores: list[float] = []
        binary: list[float] = []
        open_: list[float] = []
        structural: dict[str, list[float]] = {}
        semantic: dict[str, list[float]] = {}
        missing = 0
        for qid, q in gt.items():
            if not q.get("isBalanced", True):
                continue
            if qid not in preds:
                missing += 1
                continue
            s = float(preds[qid] == q["answer"])
            scores.append(s)
            types = q.get("types", {})
            (open_ if types.get("structural") == "query" else binary).append(s)
            if "structural" in types:
                structural.setdefault(types["structural"], []).append(s)
            if "semantic" in types:
                semantic.setdefault(types["semantic"], []).append(s)
        counts = {
            "questions": sum(1 for q in gt.values() if q.get("isBalanced", True)),
            "answers": len(answers),
            "missing": missing,
            "unknown": sum(1 for k in preds if k not in gt),
        }
        acc = _pct(scores)
        extra = (
            {
                "warning": f"{missing} balanced questions have no prediction (the official eval.py would "
                "stop); accuracy is over the answered ones"
            }
            if missing and scores
            else {}
        )
        return result(
            self,
            scored=bool(scores),
            headline="accuracy",
            value=acc,
            accuracy=acc,
            binary=_pct(binary),
            open=_pct(open_),
            per_structural={k: _pct(v) for k, v in sorted(structural.items())},
            per_semantic={k: _pct(v) for k, v in sorted(semantic.items())},
            counts=counts,
            **extra,
        )
