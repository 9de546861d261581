"""Per-question units of a run for the paired statistics: a thin adapter over the benchmarks' own
``question_results`` + ``units`` (``finepruner.eval.aggregation``; the unit and metric of each benchmark
are documented in its module and in docs/sweeps.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finepruner.eval.aggregation import QuestionResults, Units
from finepruner.eval.errors import NoQuestionScores

#: MME metrics a report can compare (``--mme-metric``).
MME_METRICS = ("perception", "cognition", "total")

#: The units of one metric of one run (the name the statistics have always used).
QuestionScores = Units


def question_scores(
    spec: str,
    answers: list[dict[str, Any]],
    data_root: str | Path,
    *,
    files: dict[str, str] | None = None,
    metric: str | None = None,
    judge: Any = None,
) -> Units:
    """Units of ``metric`` (default: the benchmark's headline) of ``answers``, scored by benchmark
    ``spec`` itself (``Benchmark.question_results``, then ``Benchmark.units``)."""
    from finepruner.eval import benchmarks

    bench = benchmarks.get(spec, files=files)
    return bench.units(bench.question_results(answers, data_root, judge=judge), metric)


def stored_units(spec: str, results: dict[str, Any], metric: str | None = None,
                 files: dict[str, str] | None = None) -> Units:
    """Units of ``metric`` from per-question results stored with a run (``QuestionResults.to_json``)."""
    from finepruner.eval import benchmarks

    return benchmarks.get(spec, files=files).units(QuestionResults.from_json(results), metric)


def run_question_scores(record: Any, store: Any, data_root: str | Path, metric: str | None = None) -> Units:
    """Units of a stored run: from the per-question results the sweep stored with it, else (runs stored
    before they were kept) by scoring its answers file again."""
    from finepruner.eval.io import read_answers

    files = (record.settings.get("files") or {}).get(record.benchmark.split(":")[0])
    stored = store.results_of(record.run_id)
    if stored is not None:
        return stored_units(record.benchmark, stored, metric, files)
    path = store.absolute(record.answers_path)
    if path is None or not path.is_file():
        raise NoQuestionScores(f"run {record.run_id}: no stored per-question results and no answers file "
                               f"({record.answers_path})")
    return question_scores(record.benchmark, read_answers(path), data_root, files=files, metric=metric)


__all__ = ["MME_METRICS", "NoQuestionScores", "QuestionScores", "question_scores", "run_question_scores",
           "stored_units"]
