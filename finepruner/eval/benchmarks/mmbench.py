"""MMBench (en) and MMBench-CN dev: circular evaluation (spec ``eval_protocol.md`` sections 10-11).

Inference as ``model_vqa_mmbench --single-pred-prompt`` (every TSV row once, options A-D up to the
first missing one, hint prepended, image from base64). Scoring follows the OpenCompass/VLMEvalKit
evaluator: rows are grouped by ``index % 1e6``; a group is a hit only if every row is right; each row
is first resolved by the rules (``can_infer``); rows the rules cannot resolve go to the optional LLM
judge (the matching prompt, 3 tries, then a seeded random letter), or count as wrong without one.

Per circular group (``process_results``, the unit of the metric): ``circular_accuracy`` ``{key, score
(hit), category, l2_category, needed_judge, judged}``, aggregated by :class:`Mean`.
"""

from __future__ import annotations

import csv
import random
import string
import sys
from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import Aggregation, Mean, QuestionResults, unit_key
from finepruner.eval.benchmarks import register
from finepruner.eval.benchmarks.base import LETTER_ANSWER, Benchmark, Sample, result
from finepruner.eval.errors import DataError

CIRCULAR = 1_000_000
#: Strings pandas' ``read_csv`` turns into NaN (the official loaders use pandas).
NA_VALUES = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
CN_SUFFIX = "请直接回答选项字母。"
_TUPS = (
    ("", "."),
    ("", ","),
    ("", ":"),
    ("", ")"),
    ("", ")."),
    ("(", ")"),
    ("(", ")."),
    (":", ""),
    (":", ","),
    (":", "."),
    (":", ")"),
    (":", ")."),
)


def is_na(value: Any) -> bool:
    """Missing cell: absent, NaN, or a string pandas (or LLaVA's ``is_none``) reads as missing."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and (value in NA_VALUES or value.lower() in ("nan", "none"))


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of an MMBench TSV (quoted multi-line cells allowed)."""
    if not path.is_file():
        raise DataError(f"question file not found: {path}")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if rows and "index" not in rows[0]:
        raise DataError(f"{path}: no 'index' column")
    return rows


def row_options(row: dict[str, str]) -> dict[str, str]:
    """``{letter: option}`` for columns A, B, C, D up to the first missing one."""
    out = {}
    for letter in "ABCD":
        if is_na(row.get(letter)):
            break
        out[letter] = row[letter]
    return out


def can_infer_option(answer: str, num_choice: int = 5) -> str | bool:
    """Letter by the token rules (a lone ``A`` among more than 3 tokens is taken as an article)."""
    choices = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return False

    def count(splits: list[str], prefix: str = "", suffix: str = "") -> int:
        return sum(1 for c in choices if prefix + c + suffix in splits)

    splits = [x.strip() for x in answer.split()]
    if count(splits) == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    for prefix, suffix in _TUPS:
        if count(splits, prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return False


def can_infer_text(answer: str, choices: dict[str, str]) -> str | bool:
    """The unique option whose (lower-cased) text occurs in the answer."""
    answer = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer: str, choices: dict[str, str]) -> str | bool:
    """Rule-based answer extraction: option letter rules, then option text."""
    answer = str(answer)
    return can_infer_option(answer) or can_infer_text(answer, choices)


def judge_prompt(question: str, choices: dict[str, str], prediction: str) -> str:
    """The ChatGPT matching prompt of the MMBench evaluator."""
    options = "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in choices.items())
    return (
        "You are an AI assistant who will help me to match an answer with several options of a single-choice "
        "question. You are provided with a question, several options, and an answer, and you need to find "
        "which option is most similar to the answer. If the meaning of all options are significantly "
        "different from the answer, output E. Your should output a single uppercase character in A, B, C, D "
        "(if they are valid options), and E. \n"
        "Example 1: \n"
        "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
        "Answer: a cute teddy bear\nYour output: A\n"
        "Example 2: \n"
        "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
        "Answer: Spider\nYour output: E\n"
        "Example 3: \n"
        f"Question: {question}?\nOptions: {options}\nAnswer: {prediction}\nYour output: "
    )


def judge_extract(
    judge: Any,
    question: str,
    choices: dict[str, str],
    prediction: str,
    rng: random.Random,
    log: list[dict[str, Any]],
    retries: int = 3,
) -> str:
    """Ask the judge up to ``retries`` times; then a random letter among the options and E."""
    prompt = judge_prompt(question, choices, prediction)
    for _ in range(retries):
        reply = judge.complete(prompt, max_tokens=16, temperature=0.0)
        letter = can_infer(reply, choices)
        log.append({"prompt": prompt, "reply": reply, "letter": letter or None})
        if letter:
            return str(letter)
    letter = rng.choice([*choices, "E"])
    log.append({"prompt": prompt, "reply": None, "letter": letter, "random": True})
    return letter


class JudgeSession:
    """The judge of one evaluation with its seeded random fallback and call log (one ``random.Random``
    for the whole evaluation, as the official evaluator's ``random.seed(2680)``)."""

    def __init__(self, judge: Any = None, seed: int = 2680) -> None:
        self.judge = judge
        self.rng = random.Random(seed)
        self.log: list[dict[str, Any]] = []


def circular_group(
    group: list[dict[str, Any]], meta: dict[int, dict[str, str]], session: JudgeSession
) -> dict[str, int]:
    """One circular group (its answered rows, ``index`` ascending): ``hit`` (every row right), rows the
    rules could not resolve (``needed_judge``) and rows sent to the judge (``judged``)."""
    preds = []
    hit = 1
    for r in group:
        letter = can_infer(r["prediction"], row_options(meta[r["index"]]))
        preds.append(letter)
        if letter and letter != meta[r["index"]]["answer"]:
            return {"hit": 0, "needed_judge": 0, "judged": 0}
    unresolved = judged = 0
    for r, letter in zip(group, preds, strict=True):
        if letter:
            continue
        unresolved += 1
        if session.judge is None:
            hit = 0
            break
        judged += 1
        m = meta[r["index"]]
        letter = judge_extract(
            session.judge, m.get("question", ""), row_options(m), r["prediction"], session.rng, session.log
        )
        if letter != m["answer"]:
            hit = 0
            break
    return {"hit": hit, "needed_judge": unresolved, "judged": judged}


def circular_groups(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Answered rows (``index``, ``prediction``) by group ``index % 1e6``, groups with a main row only
    (the official evaluator iterates over main rows), rows and groups in ``index`` order."""
    by_group: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["index"]):
        by_group.setdefault(r["index"] % CIRCULAR, []).append(r)
    return {idx: g for idx, g in by_group.items() if any(r["index"] == idx for r in g)}


def circular_eval(
    rows: list[dict[str, Any]], meta: dict[int, dict[str, str]], judge: Any = None, seed: int = 2680
) -> dict[str, Any]:
    """Circular accuracy of answered ``rows`` (``index``, ``prediction``) against ``meta`` (TSV rows)."""
    session = JudgeSession(judge, seed)
    hits: dict[int, int] = {}
    unresolved = judged = 0
    for idx, group in circular_groups(rows).items():
        res = circular_group(group, meta, session)
        hits[idx] = res["hit"]
        unresolved += res["needed_judge"]
        judged += res["judged"]
    per_cat: dict[str, list[int]] = {}
    per_l2: dict[str, list[int]] = {}
    for idx, h in hits.items():
        per_cat.setdefault(meta[idx].get("category") or "unknown", []).append(h)
        per_l2.setdefault(meta[idx].get("l2-category") or "unknown", []).append(h)
    acc = 100.0 * sum(hits.values()) / len(hits) if hits else None
    return {
        "circular_accuracy": acc,
        "groups": len(hits),
        "hits": sum(hits.values()),
        "rows_needing_judge": unresolved,
        "rows_judged": judged,
        "category": {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_cat.items())},
        "l2_category": {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_l2.items())},
        "judge_log": session.log,
    }


@register
class MMBench(Benchmark):
    name = "mmbench"
    subdir = "mmbench"
    splits = ("dev", "test")
    max_new_tokens = 1024
    default_files = {
        "dev": {"questions": "mmbench_dev_20230712.tsv"},
        "test": {"questions": "mmbench_test_20230712.tsv"},
    }
    inference_keys = {"dev": ("questions",), "test": ("questions",)}
    scoring_keys = {"dev": ("questions",), "test": ("questions",)}
    suffix = LETTER_ANSWER
    description = "MMBench dev (en, 4,377 rows); metric: circular accuracy (rules, optional judge)"

    def load(self, data_root: str | Path) -> list[Sample]:
        path = self.path(data_root, "questions")
        samples = []
        for i, row in enumerate(read_tsv(path), 2):
            if is_na(row.get("question")):
                raise DataError(f"{path}: row at line {i} has no question")
            options = row_options(row)
            question = row["question"]
            if not is_na(row.get("hint")):
                question = row["hint"] + "\n" + question
            for letter, option in options.items():
                question = question + "\n" + letter + ". " + option
            image_b64 = None if is_na(row.get("image")) else row["image"]
            samples.append(
                Sample(
                    question_id=int(row["index"]),
                    prompt=question,
                    text=question + "\n" + self.suffix,
                    image_b64=image_b64,
                    extra={"round_id": 0, "options": list(options.values()), "option_char": list(options)},
                )
            )
        return samples

    def check(self, data_root: str | Path, *, inference: bool = True, scoring: bool = True) -> None:
        super().check(data_root, inference=inference, scoring=scoring)
        if inference:
            path = self.path(data_root, "questions")
            with path.open(encoding="utf-8", newline="") as fh:
                header = next(csv.reader(fh, delimiter="\t"), [])
            if header and "image" not in header:
                raise DataError(f"{path}: no 'image' column (base64 images)")

    headline = "circular_accuracy"

    def aggregation(self) -> dict[str, Aggregation]:
        return {"circular_accuracy": Mean(binary=True)}

    def process_results(self, question: Any, answer: Any, *, judge: Any = None) -> dict[str, Any]:
        """``question``: ``{group, meta}`` (the group id and the TSV rows by index); ``answer``: the
        group's answered rows (``index``, ``prediction``); ``judge``: the evaluation's
        :class:`JudgeSession` (rules only without one)."""
        res = circular_group(answer, question["meta"], judge if judge is not None else JudgeSession())
        main = question["meta"][question["group"]]
        return {"circular_accuracy": {
            "key": unit_key(question["group"]),
            "score": float(res["hit"]),
            "category": main.get("category") or "unknown",
            "l2_category": main.get("l2-category") or "unknown",
            "needed_judge": res["needed_judge"],
            "judged": res["judged"],
        }}

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        tsv = self.path(data_root, "questions")
        meta_rows = read_tsv(tsv)
        meta = {int(r["index"]): r for r in meta_rows}
        known = [a for a in answers if int(a["question_id"]) in meta]
        counts = {
            "questions": len(meta),
            "answers": len(answers),
            "unknown": len(answers) - len(known),
            "missing": len(set(meta) - {int(a["question_id"]) for a in known}),
        }
        has_gt = (
            bool(meta_rows)
            and "answer" in meta_rows[0]
            and all(not is_na(r.get("answer")) for r in meta_rows)
        )
        submission = None
        if out_dir is not None:
            submission = self.write_submission(
                known, meta_rows, out_dir / f"{self.name}_{self.split}_{model_id}.tsv"
            )
        info: dict[str, Any] = {"counts": counts, "submission": str(submission) if submission else None,
                                "judge_model": getattr(judge, "model", None) if judge is not None else None}
        if not has_gt:
            info["reason"] = ("no ground-truth answers in the TSV (test split): upload the submission to the "
                              "OpenCompass MMBench server")
            return QuestionResults(self.spec, [], info)
        rows = [{"index": int(a["question_id"]), "prediction": str(a["text"])} for a in known]
        session = JudgeSession(judge)
        values = [
            self.process_results({"group": gid, "meta": meta}, group, judge=session)
            for gid, group in circular_groups(rows).items()
        ]
        if out_dir is not None and session.log:
            from finepruner.eval.io import write_json

            write_json(
                out_dir / f"{self.name}_judge_log.json",
                {"judge_model": getattr(judge, "model", None), "calls": session.log},
            )
        return QuestionResults(self.spec, values, info)

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        info = results.info
        if "reason" in info:
            return result(self, scored=False, counts=info["counts"], submission=info["submission"],
                          reason=info["reason"])
        values = results.of("circular_accuracy")
        mean = self.aggregation()["circular_accuracy"]
        per: dict[str, dict[str, list[Any]]] = {"category": {}, "l2_category": {}}
        for v in values:
            for kind, groups in per.items():
                groups.setdefault(v[kind], []).append(v)
        value = mean(values)
        return self.scored_result(
            results,
            judge_model=info["judge_model"],
            submission=info["submission"],
            counts=info["counts"],
            circular_accuracy=value,
            groups=len(values),
            hits=int(sum(v["score"] for v in values)),
            rows_needing_judge=sum(v["needed_judge"] for v in values),
            rows_judged=sum(v["judged"] for v in values),
            category={k: mean(v) for k, v in sorted(per["category"].items())},
            l2_category={k: mean(v) for k, v in sorted(per["l2_category"].items())},
        )

    def write_submission(
        self, answers: list[dict[str, Any]], meta_rows: list[dict[str, str]], path: Path
    ) -> Path:
        """LLaVA's upload table as TSV: the TSV's columns minus hint, category, source, image, comment,
        l2-category, with ``prediction`` inserted at position 6 (the official converter writes .xlsx)."""
        drop = {"hint", "category", "source", "image", "comment", "l2-category"}
        cols = [c for c in (meta_rows[0].keys() if meta_rows else []) if c not in drop]
        cols.insert(min(6, len(cols)), "prediction")
        by_index = {int(r["index"]): r for r in meta_rows}
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(cols)
            for a in answers:
                row = dict(by_index[int(a["question_id"])], prediction=a["text"])
                writer.writerow([row.get(c, "") for c in cols])
        return path


@register
class MMBenchCN(MMBench):
    name = "mmbench_cn"
    subdir = "mmbench_cn"
    default_files = {
        "dev": {"questions": "mmbench_dev_cn_20231003.tsv"},
        "test": {"questions": "mmbench_test_cn_20231003.tsv"},
    }
    suffix = CN_SUFFIX
    description = "MMBench-CN dev (4,329 rows); metric: circular accuracy (rules, optional judge)"
