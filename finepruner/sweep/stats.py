"""Paired statistics between two runs on the same questions.

The units and the metric come from the benchmark itself (``Benchmark.units``: its per-question
``process_results`` values and its ``aggregation``, ``finepruner.eval.aggregation``), so the metric over
all units is the benchmark's own score.

* **Paired bootstrap** (``paired_bootstrap``): the units common to both runs (questions; MME image pairs;
  MMBench circular groups) are resampled with replacement, ``resamples`` times (default 10,000), with a
  ``numpy.random.default_rng(seed)`` generator (default seed 0). Stratified benchmarks (POPE category,
  MME subtask) resample within each stratum, keeping its size. Each resample applies the *same* indices
  to both runs and recomputes each benchmark's own metric (POPE mean F1, MME score, accuracy) from the
  resampled units; the statistic is ``metric(B) - metric(A)``. The 95% interval is the 2.5th and 97.5th
  percentiles of the resampled differences (percentile method, ``numpy.percentile``, linear
  interpolation). A difference is significant at 95% when the interval excludes 0. The two-sided
  bootstrap p-value is ``min(1, 2 * min(P*(d <= 0), P*(d >= 0)))`` over the resamples.
* **McNemar's test** (``mcnemar``) on per-question correct/incorrect: ``b`` = questions A gets right and B
  wrong, ``c`` = the reverse. Exact two-sided p-value ``min(1, 2 * P(X <= min(b, c)))``, X ~ Bin(b+c, 1/2)
  (``p = 1`` when ``b + c = 0``); the chi-squared statistic with continuity correction,
  ``max(|b - c| - 1, 0)^2 / (b + c)``, and its p-value (1 degree of freedom) are given beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from finepruner.eval.aggregation import Aggregation, Units

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
_CHUNK_ELEMENTS = 4_000_000  # indices drawn at once (memory bound)


@dataclass
class McNemar:
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    n: int  # paired questions
    p_exact: float
    chi2: float
    p_chi2: float


@dataclass
class Comparison:
    """B minus A on the common units."""

    benchmark: str
    metric: str
    n_units: int
    n_only_a: int
    n_only_b: int
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    p_bootstrap: float
    resamples: int
    seed: int
    confidence: float
    mcnemar: McNemar | None = None

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (NaN intervals are not significant)."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["significant"] = self.significant
        return out


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of ``min(b, c) = k`` among ``n`` discordant pairs under Bin(n, 1/2)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # log-space sum of C(n, i) / 2^n for i <= k
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's test on paired 0/1 outcomes (see the module docstring)."""
    a = np.asarray(correct_a).astype(bool)
    bb = np.asarray(correct_b).astype(bool)
    if a.shape != bb.shape:
        raise ValueError(f"paired outcomes differ in length: {a.shape} vs {bb.shape}")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    n = b + c
    chi2 = max(abs(b - c) - 1, 0) ** 2 / n if n else 0.0
    p_chi2 = math.erfc(math.sqrt(chi2 / 2)) if n else 1.0
    return McNemar(b=b, c=c, n=int(a.size), p_exact=binom_two_sided_p(min(b, c), n), chi2=chi2, p_chi2=p_chi2)


def align(a: Units, b: Units) -> tuple[np.ndarray, np.ndarray, list[str], int, int]:
    """Unit arrays of the units both runs have (A's order), their strata, and the counts left out."""
    if a.aggregation != b.aggregation or a.metric != b.metric:
        raise ValueError(f"cannot compare {a.benchmark}:{a.metric} with {b.benchmark}:{b.metric}")
    index_b = {k: i for i, k in enumerate(b.keys)}
    ia, ib, strata = [], [], []
    for i, k in enumerate(a.keys):
        j = index_b.get(k)
        if j is not None and a.strata[i] == b.strata[j]:
            ia.append(i)
            ib.append(j)
            strata.append(a.strata[i])
    return a.values[ia], b.values[ib], strata, len(a.keys) - len(ia), len(b.keys) - len(ib)


def bootstrap_metrics(aggregation: Aggregation, runs: Sequence[np.ndarray], strata: list[str], resamples: int,
                      seed: int) -> np.ndarray:
    """``[len(runs), resamples]`` bootstrap values of each run's metric; every resample applies the same
    unit indices to every run (paired, stratified), so differences of rows are paired differences."""
    rng = np.random.default_rng(seed)
    groups = {s: np.flatnonzero(np.asarray(strata) == s) for s in dict.fromkeys(strata)}
    n = max(1, len(strata))
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // n))
    out = np.empty((len(runs), resamples))
    done = 0
    while done < resamples:
        m = min(chunk, resamples - done)
        sums: list[dict[str, np.ndarray]] = [{} for _ in runs]
        for s, members in groups.items():
            idx = members[rng.integers(0, len(members), size=(m, len(members)))]
            for run, values in zip(sums, runs, strict=True):
                run[s] = values[idx].sum(axis=1)
        for row, run in enumerate(sums):
            out[row, done : done + m] = aggregation.from_sums(run)
        done += m
    return out


def bootstrap_differences(aggregation: Aggregation, va: np.ndarray, vb: np.ndarray, strata: list[str],
                          resamples: int, seed: int) -> np.ndarray:
    """The ``resamples`` bootstrap values of ``metric(B) - metric(A)`` (paired, stratified)."""
    metric_a, metric_b = bootstrap_metrics(aggregation, [va, vb], strata, resamples, seed)
    return metric_b - metric_a


def paired_bootstrap(a: Units, b: Units, *, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE) -> Comparison:
    """Compare run B with run A on their common units (bootstrap interval, and McNemar where binary)."""
    va, vb, strata, only_a, only_b = align(a, b)
    if not strata:
        raise ValueError(f"{a.benchmark}: the two runs have no question in common")

    def metric(values: np.ndarray) -> float:
        st = np.asarray(strata)
        return float(a.aggregation.from_sums({s: values[st == s].sum(axis=0) for s in dict.fromkeys(strata)}))

    value_a, value_b = metric(va), metric(vb)
    diffs = bootstrap_differences(a.aggregation, va, vb, strata, resamples, seed)
    finite = diffs[np.isfinite(diffs)]
    alpha = (1.0 - confidence) / 2
    if finite.size:
        low, high = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
        p = min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0)))
    else:
        low = high = p = float("nan")
    test = None
    if a.correct is not None and b.correct is not None:
        index_b = {k: i for i, k in enumerate(b.correct_keys or [])}
        pairs = [(i, index_b[k]) for i, k in enumerate(a.correct_keys or []) if k in index_b]
        if pairs:
            ia, ib = zip(*pairs)
            test = mcnemar(a.correct[list(ia)], b.correct[list(ib)])
    return Comparison(
        benchmark=a.benchmark, metric=a.metric, n_units=len(strata), n_only_a=only_a, n_only_b=only_b,
        a=value_a, b=value_b, diff=value_b - value_a, ci_low=float(low), ci_high=float(high),
        p_bootstrap=float(p), resamples=resamples, seed=seed, confidence=confidence, mcnemar=test,
    )
