"""MM-Vet (spec ``eval_protocol.md`` section 12): 218 open questions graded by an LLM.

Inference as ``model_vqa`` (no suffix, 1024 tokens). Scoring writes LLaVA's ``results/<model>.json``
(``{"v1_<qid>": text}``) and, when a judge is configured, grades every answer with the official
few-shot grader prompt, parse/retry rules (5 tries, temperature +0.5, then 0.0) and capability
aggregation; without a judge the benchmark is reported as "not scored here". The judge model and all
its replies are saved with the run.

Per question (``process_results``, with a judge): ``total`` ``{key, score (the mean grade over the runs),
grades, capability}``, aggregated by :class:`Mean`; the mean over questions of the per-question mean
grade equals the official mean over runs of each run's total (every run grades the same questions).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, Mean, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import Benchmark, Sample, result
from finepruner.eval.errors import DataError
from finepruner.eval.io import check_answers_coverage, read_json, read_jsonl, write_json

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "

# The official grader's few-shot prompt (mm-vet_evaluator.py), verbatim.
MMVET_GRADER_PROMPT = (
    "Compare the ground truth and prediction from AI models, to give a correctness score for th"
    "e prediction. <AND> in the ground truth means it is totally right only when all elements i"
    "n the ground truth are present in the prediction, and <OR> means it is totally right when "
    "any one element in the ground truth is present in the prediction. The correctness score is"
    " 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right)."
    " Just complete the last space of the correctness score.\n"
    "\n"
    "Question | Ground truth | Prediction | Correctness\n"
    "--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the cou"
    "ntries Iceland and Greenland are misleading. Despite its name, Iceland is known for its be"
    "autiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is s"
    "aying that the person has trust issues because the names of these countries do not accurat"
    "ely represent their landscapes. | The meme talks about Iceland and Greenland. It's pointin"
    "g out that despite their names, Iceland is not very icy and Greenland isn't very green. | "
    "0.4\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the cou"
    "ntries Iceland and Greenland are misleading. Despite its name, Iceland is known for its be"
    "autiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is s"
    "aying that the person has trust issues because the names of these countries do not accurat"
    "ely represent their landscapes. | The meme is using humor to point out the misleading natu"
    "re of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscape"
    "s while Greenland is mostly covered in ice and snow. The text 'This is why I have trust is"
    "sues' is a playful way to suggest that these contradictions can lead to distrust or confus"
    "ion. The humor in this meme is derived from the unexpected contrast between the names of t"
    "he countries and their actual physical characteristics. | 1.0\n"
)


def mmvet_query(question: str, answer: str, prediction: str) -> str:
    """Grader prompt + ``"\\n"`` + ``"question | answer | prediction | "``."""
    gt = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_GRADER_PROMPT + "\n" + " | ".join([question, gt, prediction, ""])


def _parse_score(content: str) -> float | None:
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def mmvet_grade(
    judge: Any, question: str, answer: str, prediction: str, tag: str = ""
) -> tuple[float, list[str]]:
    """One grade in [0, 1] and the judge's replies, with the official retry schedule."""
    query = mmvet_query(question, answer, prediction)
    temperature = 0.0
    content = judge.complete(query, max_tokens=3, temperature=temperature, tag=tag)
    replies = [content]
    tries = 1
    while True:
        score = _parse_score(content)
        if score is not None:
            return score, replies
        content = judge.complete(query + RETRY_SUFFIX, max_tokens=3, temperature=temperature, tag=tag)
        replies.append(content)
        tries += 1
        temperature += 0.5
        if tries > 5:
            return 0.0, replies


def mmvet_aggregate(grades: dict[str, float], gt: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Total and per-capability scores (percent) of one run."""
    total = 100.0 * sum(grades.values()) / len(grades)
    caps = {}
    for cap in CAPABILITIES:
        vals = [s for k, s in grades.items() if cap in gt[k]["capability"]]
        if vals:
            caps[cap] = 100.0 * sum(vals) / len(vals)
    return {"total": total, "capabilities": caps}


@register
class MMVet(Benchmark):
    name = "mmvet"
    subdir = "mm-vet"
    splits = ("test",)
    max_new_tokens = 1024
    default_files = {
        "test": {"questions": "llava-mm-vet.jsonl", "images": "images", "ground_truth": "mm-vet.json"}
    }
    inference_keys = {"test": ("questions", "images")}
    scoring_keys = {"test": ("questions",)}
    description = "MM-Vet (218); metric: LLM-judge score (needs a configured judge)"
    num_runs = 1

    def load(self, data_root: str | Path) -> list[Sample]:
        image_dir = self.path(data_root, "images")
        samples = []
        for i, row in enumerate(read_jsonl(self.path(data_root, "questions")), 1):
            if not {"question_id", "image", "text"} <= set(row):
                raise DataError(f"{self.path(data_root, 'questions')}: line {i} lacks question_id/image/text")
            samples.append(
                Sample(
                    question_id=row["question_id"],
                    prompt=row["text"],
                    text=row["text"],
                    image=image_dir / row["image"],
                )
            )
        return samples

    headline = "total"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"total": Mean()}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: an entry of ``mm-vet.json`` with its ``id`` (``v1_<qid>``); every run's grade."""
        grades, replies = [], []
        for run in range(self.num_runs):
            score, reply = mmvet_grade(judge, question["question"], question["answer"], answer["text"],
                                       tag=f"run{run}")
            grades.append(score)
            replies.append(reply)
        return {"total": {"key": unit_key(question["id"]), "score": statistics.fmean(grades), "grades": grades,
                          "replies": replies, "capability": list(question["capability"])}}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        questions = read_jsonl(self.path(data_root, "questions"))
        counts = check_answers_coverage([q["question_id"] for q in questions], answers)
        results = {f"v1_{a['question_id']}": a for a in answers}
        sub = None
        if out_dir is not None:
            sub = out_dir / f"mmvet_results_{model_id}.json"
            sub.parent.mkdir(parents=True, exist_ok=True)
            sub.write_text(json.dumps({k: a["text"] for k, a in results.items()}, indent=2))
        info: dict[str, Any] = {"counts": counts, "submission": str(sub) if sub else None}
        gt_path = self.path(data_root, "ground_truth")
        if judge is None or not gt_path.is_file():
            why = (
                "no judge configured (--judge-model or FINEPRUNER_JUDGE_MODEL)"
                if judge is None
                else f"ground truth {gt_path} not found"
            )
            info["reason"] = (f"MM-Vet needs an LLM judge: {why}; grade the results file with the official "
                              "MM-Vet evaluator or configure a judge")
            return QuestionResults(self.spec, [], info)
        gt = read_json(gt_path)
        values = [self.process_results({**gt[k], "id": k}, results[k], judge=judge) for k in gt if k in results]
        if out_dir is not None:
            log = [{"run": run, "id": json.loads(v["total"]["key"])[0], "score": v["total"]["grades"][run],
                    "replies": v["total"]["replies"][run]} for run in range(self.num_runs) for v in values]
            write_json(out_dir / "mmvet_grades.json", {"judge_model": judge.model, "grades": log})
        info["judge_model"] = judge.model
        return QuestionResults(self.spec, values, info)

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        info = results.info
        if "reason" in info:
            return result(self, scored=False, submission=info["submission"], counts=info["counts"],
                          reason=info["reason"])
        values = results.of("total")
        gt = {json.loads(v["key"])[0]: {"capability": v["capability"]} for v in values}
        runs = [mmvet_aggregate({json.loads(v["key"])[0]: v["grades"][run] for v in values}, gt) if values else None
                for run in range(self.num_runs)]
        totals = [r["total"] for r in runs if r]
        caps = {
            c: statistics.fmean(r["capabilities"][c] for r in runs if r and c in r["capabilities"])
            for c in CAPABILITIES
            if any(r and c in r["capabilities"] for r in runs)
        }
        mean = self.aggregation()["total"](values)
        return self.scored_result(
            results,
            total=mean,
            total_rounded=round(mean, 1) if mean is not None else None,
            std=statistics.pstdev(totals) if len(totals) > 1 else 0.0,
            runs=totals,
            capabilities=caps,
            judge_model=info["judge_model"],
            graded=len(values),
            submission=info["submission"],
            counts=info["counts"],
            note=f"MM-Vet graded by {info['judge_model']}; the paper used gpt-4-0613",
        )
