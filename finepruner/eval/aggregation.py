"""Per-question results and their aggregation (the lm-evaluation-harness / lmms-eval shape).

A benchmark's ``process_results(question, answer)`` returns ``{metric: value}`` for one question (or one
unit: an MME image pair is grouped from its two questions, an MMBench circular group is one value), and
its ``aggregation()`` maps each metric to an :class:`Aggregation`: a function over the list of
per-question values of that metric (``aggregation()["mean_f1"](values)``), as lmms-eval's
``aggregation`` functions are. The benchmark's ``score`` computes its headline and metrics with these
functions, and the paired statistics of ``finepruner.sweep.stats`` resample the same values, so both
agree by construction (spec ``eval_protocol.md`` sections 2-12; docs/benchmarks.md).

An aggregation reduces the values in two steps that the bootstrap can vectorise: ``units(values)`` turns
them into resampling units, each a vector of sufficient statistics in a stratum, and ``from_sums`` gives
the metric from the per-stratum sums of those vectors (leading axes: resamples).

==================  ==========================  ==========================  ===============================
aggregation         one value                   unit, statistics             metric from the sums
==================  ==========================  ==========================  ===============================
:class:`Mean`       ``{key, score}``            the question, [score, 1]     100 * sum / count
:class:`Confusion`  ``{key, stratum, pred,      the question, one-hot        per stratum F1 (or accuracy),
                    label}`` (yes / no)         [tp, fp, tn, fn]             mean over strata (POPE)
:class:`MMEScore`   ``{key (image), question,   the image, [correct,         per stratum 100 acc + 100 acc+,
                    stratum, correct}``         questions, both, full pair]  summed over strata (MME)
==================  ==========================  ==========================  ===============================
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def unit_key(*parts: Any) -> str:
    """A unit's identity across runs (JSON of its parts, e.g. ``["COCO_val2014_1.jpg"]``)."""
    return json.dumps(list(parts), ensure_ascii=False, default=str)


@dataclass
class Units:
    """Resampling units of one metric of one run: ``values[i]`` are unit ``keys[i]``'s statistics in
    stratum ``strata[i]``; ``correct`` (0/1 per question, for McNemar's test) where outcomes are binary."""

    benchmark: str
    metric: str
    aggregation: Aggregation
    keys: list[str]
    strata: list[str]
    values: np.ndarray  # [units, statistics]
    correct_keys: list[str] | None = None
    correct: np.ndarray | None = None

    def stratum_sums(self, values: np.ndarray | None = None) -> dict[str, np.ndarray]:
        values = self.values if values is None else values
        strata = np.asarray(self.strata)
        return {s: values[strata == s].sum(axis=0) for s in dict.fromkeys(self.strata)}

    def value(self) -> float:
        """The metric over every unit (NaN where it is undefined, e.g. an F1 without a positive)."""
        if not self.keys:
            return float("nan")
        return float(self.aggregation.from_sums(self.stratum_sums())[()])


@dataclass
class Aggregation:
    """A metric's aggregation over the per-question values (see the module docstring)."""

    #: number of statistics per unit
    width: int = field(default=2, init=False)

    def unit_rows(self, values: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], list[list[float]]]:
        """Keys, strata and statistic vectors of the units of ``values``."""
        raise NotImplementedError

    def question_outcomes(self, values: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[int]] | None:
        """Per-question keys and 0/1 outcomes (McNemar), or None where outcomes are not binary."""
        return None

    def from_sums(self, sums: Mapping[str, np.ndarray]) -> np.ndarray:
        """The metric from per-stratum summed statistics (last axis: statistics)."""
        raise NotImplementedError

    def units(self, values: Sequence[Mapping[str, Any]], benchmark: str = "", metric: str = "") -> Units:
        keys, strata, rows = self.unit_rows(values)
        outcomes = self.question_outcomes(values)
        return Units(
            benchmark, metric, self, keys, strata, np.array(rows, dtype=float).reshape(-1, self.width),
            correct_keys=outcomes[0] if outcomes else None,
            correct=np.array(outcomes[1], dtype=np.int8) if outcomes else None,
        )

    def __call__(self, values: Sequence[Mapping[str, Any]]) -> float | None:
        """The metric of ``values`` (None when it is undefined: no value, or a division by zero)."""
        value = self.units(values).value()
        return None if math.isnan(value) else value


@dataclass
class Mean(Aggregation):
    """100 x the mean of per-question scores in [0, 1] (accuracy, VQA accuracy, circular accuracy,
    judge grades). ``binary``: scores are 0/1 outcomes (McNemar applies). ``rounding``: the official
    scorer's rounding of the percentage (VQAv2's ``round(x, 2)`` with Python 2 ties)."""

    binary: bool = False
    rounding: Callable[[float], float] | None = None

    def unit_rows(self, values):
        return ([v["key"] for v in values], ["all"] * len(values), [[float(v["score"]), 1.0] for v in values])

    def question_outcomes(self, values):
        if not self.binary:
            return None
        return [v["key"] for v in values], [int(round(float(v["score"]))) for v in values]

    def from_sums(self, sums):
        total = sum(sums.values())
        with np.errstate(divide="ignore", invalid="ignore"):
            out = 100.0 * np.asarray(total[..., 0]) / np.asarray(total[..., 1])
        if self.rounding is not None:
            out = np.vectorize(lambda x: x if math.isnan(x) else self.rounding(float(x)), otypes=[float])(out)
        return out


@dataclass
class Confusion(Aggregation):
    """Yes/no answers per stratum (POPE's splits): one-hot [tp, fp, tn, fn] with "yes" positive (a label
    other than "no" counts as yes, as ``eval_pope.py``); ``statistic`` ``"f1"`` or ``"accuracy"`` per
    stratum, in percent, averaged over the strata."""

    statistic: str = "f1"

    def __post_init__(self) -> None:
        self.width = 4
        if self.statistic not in ("f1", "accuracy"):
            raise ValueError(f"Confusion statistic must be 'f1' or 'accuracy', got {self.statistic!r}")

    @staticmethod
    def _row(v: Mapping[str, Any]) -> list[float]:
        pred_yes, label_yes = v["pred"] != "no", v["label"] != "no"
        return [float(pred_yes and label_yes), float(pred_yes and not label_yes),
                float(not pred_yes and not label_yes), float(not pred_yes and label_yes)]

    def unit_rows(self, values):
        return [v["key"] for v in values], [str(v["stratum"]) for v in values], [self._row(v) for v in values]

    def question_outcomes(self, values):
        return [v["key"] for v in values], [int((v["pred"] != "no") == (v["label"] != "no")) for v in values]

    def from_sums(self, sums):
        out = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for s in sums.values():
                tp, fp, tn, fn = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
                if self.statistic == "accuracy":
                    out.append(100.0 * (tp + tn) / (tp + fp + tn + fn))
                    continue
                precision, recall = tp / (tp + fp), tp / (tp + fn)
                out.append(100.0 * 2 * precision * recall / (precision + recall))
        return np.mean(out, axis=0)


@dataclass
class MMEScore(Aggregation):
    """MME's subtask score summed over the subtasks (strata): per subtask 100 acc + 100 acc+, acc over its
    questions, acc+ over its images with both questions answered (``calculation.py``; an image with one
    answered question counts in acc only)."""

    def __post_init__(self) -> None:
        self.width = 4

    def unit_rows(self, values):
        images: dict[tuple[str, str], list[bool]] = {}
        for v in values:
            images.setdefault((str(v["stratum"]), v["key"]), []).append(bool(v["correct"]))
        keys, strata, rows = [], [], []
        for (stratum, key), hits in images.items():
            full = len(hits) == 2
            keys.append(key)
            strata.append(stratum)
            rows.append([float(sum(hits)), float(len(hits)), float(full and all(hits)), float(full)])
        return keys, strata, rows

    def question_outcomes(self, values):
        return [v["question"] for v in values], [int(bool(v["correct"])) for v in values]

    def __call__(self, values):
        """The sum over the subtasks present (0 without any, as ``calculation.py``'s sum)."""
        return super().__call__(values) if values else 0.0

    def from_sums(self, sums):
        out: Any = 0.0
        for s in sums.values():
            acc = np.where(s[..., 1] > 0, s[..., 0] / np.maximum(s[..., 1], 1), 0.0)
            acc_plus = np.where(s[..., 3] > 0, s[..., 2] / np.maximum(s[..., 3], 1), 0.0)
            out = out + 100.0 * acc + 100.0 * acc_plus
        return np.asarray(out, dtype=float)


@dataclass
class QuestionResults:
    """``process_results`` output of every scored question of one answers file, in question order, and
    what the benchmark noted while matching answers to questions (``info``: counts, warnings,
    submission files). ``values[i]`` is ``{metric: value}``; a metric a question does not count in is
    absent (MME's cognition questions have no ``perception`` value)."""

    benchmark: str
    values: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def of(self, metric: str) -> list[Any]:
        """The values of ``metric``, in question order (lmms-eval's list handed to the aggregation)."""
        return [v[metric] for v in self.values if metric in v]

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "values": self.values}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuestionResults:
        return cls(str(data["benchmark"]), list(data["values"]))


__all__ = ["Aggregation", "Confusion", "MMEScore", "Mean", "QuestionResults", "Units", "unit_key"]
