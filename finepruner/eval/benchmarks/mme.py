"""MME: 10 perception and 4 cognition subtasks (spec ``eval_protocol.md`` section 9).

Replicates ``convert_answer_to_mme.py`` (ground-truth lookup by ``(category, txt file, question)`` with
" Please answer yes or no." re-appended, two-space fallback) and MME's ``calculation.py`` (consecutive
answer pairs per image, the 4-character prefix rule, subtask score = 100 acc + 100 acc+).

The official scripts pair *consecutive* answers; finepruner first puts the answers in question-file order
(matching by ``question_id`` and prompt), so a shuffled answers file still pairs the two questions of an
image, and warns that the official scripts would score that file differently.

Per question (``process_results``): ``{key (the image), question, stratum (subtask), correct, parsed}``
under ``total`` and ``perception`` or ``cognition``; :class:`MMEScore` groups an image's two questions
into one unit (acc over questions, acc+ over complete pairs) and sums the subtask scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, MMEScore, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import SHORT_ANSWER, Benchmark, result
from finepruner.eval.errors import DataError
from finepruner.eval.io import check_answers_coverage, read_jsonl

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO = " Please answer yes or no."


def mme_parse(pred: str) -> str:
    """``calculation.parse_pred_ans`` on a lower-cased prediction that still carries its line's ``\\n``."""
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def load_mme_ground_truth(gt_root: Path) -> dict[tuple[str, str, str], str]:
    """``{(category, txt file name, question): "Yes"|"No"}`` from ``MME_Benchmark_release_version``."""
    if not gt_root.is_dir():
        raise DataError(f"mme: ground-truth folder not found: {gt_root}")
    gt: dict[tuple[str, str, str], str] = {}
    for cat_dir in sorted(p for p in gt_root.iterdir() if p.is_dir()):
        qa_dir = cat_dir / "questions_answers_YN"
        if not qa_dir.is_dir():
            qa_dir = cat_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise DataError(f"{txt}:{lineno}: expected 'question<TAB>answer'")
                gt[(cat_dir.name, txt.name, parts[0])] = parts[1]
    return gt


def mme_question_for_gt(prompt: str) -> str:
    """The question as written in MME's ``.txt`` files, recovered from LLaVA's saved prompt."""
    if SHORT_ANSWER in prompt:
        prompt = prompt.replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + YES_NO
    return prompt


def mme_prediction(text: str) -> str:
    """The parsed prediction of a raw answer as ``calculation.py`` sees it in the converted file: tabs
    and newlines removed (they would break the TSV), lower-cased, the line's ``\n`` kept."""
    return mme_parse(text.replace("\t", " ").replace("\n", " ").lower() + "\n")


def mme_subtask_score(rows: list[tuple[str, str]]) -> dict[str, Any]:
    """``rows`` = [(gt, prediction)] in file order; acc, acc+ (consecutive pairs) and score (0-200)."""
    gts = [g.lower() for g, _ in rows]
    preds = [mme_prediction(p) for _, p in rows]
    correct = [g == p for g, p in zip(gts, preds, strict=True)]
    n_pairs = len(rows) // 2
    acc_plus_hits = sum(1 for i in range(n_pairs) if correct[2 * i] and correct[2 * i + 1])
    acc = sum(correct) / len(rows) if rows else 0.0
    acc_plus = acc_plus_hits / n_pairs if n_pairs else 0.0
    out = {
        "acc": 100 * acc,
        "acc_plus": 100 * acc_plus,
        "score": 100 * acc + 100 * acc_plus,
        "n": len(rows),
        "other": preds.count("other"),
    }
    if len(rows) % 2:
        out["warning"] = "odd number of answers: the last one has no pair (acc+ uses complete pairs)"
    return out


def mme_ground_truth_key(answer: dict[str, Any], gt: dict[tuple[str, str, str], str]) -> tuple[str, str, str] | None:
    """The ``(category, file, question)`` key of an answer in the ground truth (as the official
    ``convert_answer_to_mme.py``, also trying the double-space variant of the yes/no suffix), or None."""
    qid = str(answer["question_id"])
    category = qid.split("/")[0]
    txt = qid.split("/")[-1].split(".")[0] + ".txt"
    question = mme_question_for_gt(answer.get("prompt", ""))
    for key in ((category, txt, question), (category, txt, question.replace(YES_NO, "  Please answer yes or no."))):
        if key in gt:
            return key
    return None


@register
class MME(Benchmark):
    name = "mme"
    subdir = "MME"
    splits = ("test",)
    max_new_tokens = 128
    default_files = {
        "test": {
            "questions": "llava_mme.jsonl",
            "images": "MME_Benchmark_release_version",
            "ground_truth": "MME_Benchmark_release_version",
        }
    }
    inference_keys = {"test": ("questions", "images")}
    scoring_keys = {"test": ("ground_truth",)}
    description = "MME (2,374 yes/no questions); metric: perception score (0-2000), cognition (0-800)"

    def answer_identity(self, answer: Mapping[str, Any]) -> Any:
        """``(question_id, prompt)``: one image (``question_id``) has several questions."""
        return [answer["question_id"], answer.get("prompt")]

    headline = "perception"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"perception": MMEScore(), "cognition": MMEScore(), "total": MMEScore()}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: ``{category, answer (Yes/No)}`` from the ground-truth ``.txt`` line."""
        parsed = mme_prediction(answer["text"])
        value = {
            "key": unit_key(answer["question_id"]),
            "question": unit_key(answer["question_id"], answer.get("prompt")),
            "stratum": question["category"],
            "correct": question["answer"].lower() == parsed,
            "parsed": parsed,
        }
        part = "perception" if question["category"] in PERCEPTION else "cognition"
        return {part: value, "total": value}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        gt = load_mme_ground_truth(self.path(data_root, "ground_truth"))
        questions_file = self.path(data_root, "questions")
        qs = read_jsonl(questions_file) if questions_file.is_file() else None
        warning = None
        if qs is not None:
            # acc+ pairs the two questions of an image, so put the answers in question-file order
            position = {(q["question_id"], q["text"]): i for i, q in enumerate(qs)}
            ranks = [position.get((a["question_id"], a.get("prompt")), len(qs)) for a in answers]
            known = [r for r in ranks if r < len(qs)]
            if known != sorted(known):
                warning = (
                    "answers are not in question-file order: sorted into it (acc+ pairs the two questions "
                    "of an image); LLaVA's scripts pair consecutive answers and would score this file differently"
                )
                answers = [a for _, a in sorted(zip(ranks, answers, strict=True), key=lambda t: t[0])]
        values = []
        unknown = 0
        for a in answers:
            key = mme_ground_truth_key(a, gt)
            if key is None:
                unknown += 1
                continue
            if key[0] in PERCEPTION or key[0] in COGNITION:
                values.append(self.process_results({"category": key[0], "answer": gt[key]}, a))
        counts = {"answers": len(answers), "unknown": unknown}
        if qs is not None:
            counts = check_answers_coverage(
                {(q["question_id"], q["text"]) for q in qs},
                answers,
                key=lambda a: (a["question_id"], a.get("prompt")),
            )
            counts["unknown"] = max(counts["unknown"], unknown)
        info: dict[str, Any] = {"counts": counts}
        if warning:
            info["warning"] = warning
        return QuestionResults(self.spec, values, info)

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        values = results.of("total")
        subtasks = {}
        for cat in (*PERCEPTION, *COGNITION):
            mine = [v for v in values if v["stratum"] == cat]
            if mine:
                subtasks[cat] = _subtask_details(mine)
        metrics = self.aggregate(results)
        perception, cognition = metrics["perception"], metrics["cognition"]
        info = results.info
        return result(
            self,
            scored=bool(subtasks),
            headline="perception",
            value=perception if subtasks else None,
            perception=perception,
            cognition=cognition,
            total=metrics["total"],
            perception_complete=all(c in subtasks for c in PERCEPTION),
            cognition_complete=all(c in subtasks for c in COGNITION),
            subtasks=subtasks,
            counts=info["counts"],
            **({"warning": info["warning"]} if "warning" in info else {}),
        )


def _subtask_details(values: list[dict[str, Any]]) -> dict[str, Any]:
    """acc, acc+ and score (0-200) of one subtask's per-question values (the :class:`MMEScore` units)."""
    units = MMEScore().units(values)
    correct, n, both, full = units.values.sum(axis=0)
    acc = 100.0 * correct / n if n else 0.0
    acc_plus = 100.0 * both / full if full else 0.0
    out = {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": float(units.value()),
        "n": int(n),
        "other": sum(1 for v in values if v["parsed"] == "other"),
    }
    single = int(len(units.keys) - full)
    if single:
        out["warning"] = (
            f"{single} image(s) without both questions answered: acc+ uses complete pairs only"
        )
    return out
