"""Paired comparisons of stored runs, with per-question scores cached per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finepruner.sweep.scores import NoQuestionScores, QuestionScores, run_question_scores
from finepruner.sweep.stats import DEFAULT_SEED, Comparison, paired_bootstrap
from finepruner.sweep.store import ResultsStore, RunRecord

#: Reports use fewer resamples than ``finepruner.sweep.stats`` (thousands of comparisons); ``--resamples``.
REPORT_RESAMPLES = 2000


class Comparer:
    """``comparer(a, b)`` -> ``Comparison`` of b minus a, or None when a run has no per-question scores."""

    def __init__(self, store: ResultsStore, data_root: str | Path, *, mme_metric: str = "perception",
                 resamples: int = REPORT_RESAMPLES, seed: int = DEFAULT_SEED) -> None:
        self.store, self.data_root = store, data_root
        self.mme_metric, self.resamples, self.seed = mme_metric, resamples, seed
        self._scores: dict[str, QuestionScores | None] = {}
        self._pairs: dict[tuple[str, str], Comparison | None] = {}
        self.problems: dict[str, str] = {}

    def scores(self, record: RunRecord) -> QuestionScores | None:
        if record.run_id not in self._scores:
            metric = self.mme_metric if record.benchmark.split(":")[0] == "mme" else None
            try:
                self._scores[record.run_id] = run_question_scores(record, self.store, self.data_root, metric)
            except (NoQuestionScores, OSError, ValueError, KeyError) as err:
                self._scores[record.run_id] = None
                self.problems[record.run_id] = f"{type(err).__name__}: {err}"
        return self._scores[record.run_id]

    def __call__(self, a: RunRecord, b: RunRecord) -> Any:
        key = (a.run_id, b.run_id)
        if key not in self._pairs:
            sa, sb = self.scores(a), self.scores(b)
            result = None
            if sa is not None and sb is not None:
                try:
                    result = paired_bootstrap(sa, sb, resamples=self.resamples, seed=self.seed)
                except ValueError as err:
                    self.problems[f"{a.run_id}/{b.run_id}"] = str(err)
            self._pairs[key] = result
        return self._pairs[key]
