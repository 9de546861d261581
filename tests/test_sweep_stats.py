"""Paired bootstrap and McNemar against hand-computed values and the eval scorers."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from eval_fixtures import make_playground

from finepruner.eval import benchmarks
from finepruner.eval.aggregation import Confusion, Mean, MMEScore, Units
from finepruner.eval.benchmarks.mme import mme_subtask_score
from finepruner.eval.benchmarks.pope import pope_metrics
from finepruner.sweep.scores import question_scores
from finepruner.sweep.stats import binom_two_sided_p, bootstrap_differences, mcnemar, paired_bootstrap


def test_mcnemar_hand_computed():
    # b = 1 (A right, B wrong), c = 5: P(X <= 1 | n=6) = 7/64, two-sided 14/64
    a = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0])
    b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0])
    res = mcnemar(a, b)
    assert (res.b, res.c, res.n) == (1, 5, 9)
    assert res.p_exact == pytest.approx(14 / 64)
    assert res.chi2 == pytest.approx(9 / 6)  # (|1-5|-1)^2 / 6
    assert res.p_chi2 == pytest.approx(math.erfc(math.sqrt(0.75)))  # chi2(1) survival at 1.5 = 0.2207
    assert res.p_chi2 == pytest.approx(0.22067136, abs=1e-7)
    # no discordant pairs, and a symmetric split
    assert mcnemar(np.ones(4), np.ones(4)).p_exact == 1.0
    assert mcnemar(np.array([1, 0]), np.array([0, 1])).p_exact == 1.0
    # b = 0, c = 10: 2 / 2^10
    assert binom_two_sided_p(0, 10) == pytest.approx(2 / 1024)
    # b = 3, c = 9: 2 * (1 + 12 + 66 + 220) / 4096
    assert binom_two_sided_p(3, 12) == pytest.approx(2 * 299 / 4096)


def _mean_scores(values, keys=None):
    values = np.asarray(values, dtype=float)
    keys = keys or [str(i) for i in range(len(values))]
    v = np.stack([values, np.ones_like(values)], axis=1)
    return Units("gqa", "accuracy", Mean(binary=True), keys, ["all"] * len(keys), v, keys, values.astype(np.int8))


def test_bootstrap_identical_runs_and_determinism():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, 200)
    comp = paired_bootstrap(_mean_scores(x), _mean_scores(x), resamples=500)
    assert comp.diff == 0 and comp.ci_low == 0 and comp.ci_high == 0 and not comp.significant
    y = rng.integers(0, 2, 200)
    c1 = paired_bootstrap(_mean_scores(x), _mean_scores(y), resamples=500, seed=3)
    c2 = paired_bootstrap(_mean_scores(x), _mean_scores(y), resamples=500, seed=3)
    assert (c1.ci_low, c1.ci_high) == (c2.ci_low, c2.ci_high)
    assert c1.diff == pytest.approx(100 * (y.mean() - x.mean()))


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    """n = 4 paired differences: the exact bootstrap distribution (all 4^4 index tuples) by enumeration."""
    a = np.array([1, 1, 0, 1])
    b = np.array([0, 1, 1, 1])  # d = b - a = [-1, 0, 1, 0] (x100)
    d = 100.0 * (b - a)
    exact = np.array([d[list(idx)].mean() for idx in np.ndindex(4, 4, 4, 4)])
    draws = bootstrap_differences(Mean(), np.stack([a, np.ones(4)], 1).astype(float),
                                  np.stack([b, np.ones(4)], 1).astype(float), ["all"] * 4, 40000, seed=0)
    # the exact distribution: mean 0, variance = population variance / n = (2 * 100^2 / 4) / 4
    assert exact.mean() == pytest.approx(0.0)
    assert exact.var() == pytest.approx(100.0**2 / 2 / 4)
    assert draws.mean() == pytest.approx(0.0, abs=0.6)
    assert draws.std() == pytest.approx(exact.std(), rel=0.02)
    for value in (-50.0, -25.0, 0.0, 25.0):  # probabilities of the atoms
        assert np.mean(draws == value) == pytest.approx(np.mean(exact == value), abs=0.01)


def test_significant_difference_detected():
    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.5).astype(int)
    b = a.copy()
    flip = rng.choice(2000, 200, replace=False)
    b[flip] = 1  # B fixes up to 200 of A's errors
    comp = paired_bootstrap(_mean_scores(a), _mean_scores(b), resamples=2000)
    assert comp.significant and comp.ci_low > 0 and comp.p_bootstrap < 0.001
    assert comp.mcnemar.b == 0 and comp.mcnemar.c == int((a[flip] == 0).sum())


def _pope_units(preds, labels, cats):
    keys, strata, rows = [], [], []
    for i, (p, g, c) in enumerate(zip(preds, labels, cats)):
        keys.append(str(i))
        strata.append(c)
        rows.append([p == "yes" and g == "yes", p == "yes" and g == "no", p == "no" and g == "no",
                     p == "no" and g == "yes"])
    return Units("pope", "mean_f1", Confusion("f1"), keys, strata, np.array(rows, dtype=float))


def test_pope_metric_inside_bootstrap_equals_official_f1_on_resamples():
    rnd = random.Random(0)
    cats = [c for c in ("adversarial", "popular", "random") for _ in range(40)]
    labels = [rnd.choice(["yes", "no"]) for _ in cats]
    preds = [rnd.choice(["yes", "no"]) for _ in cats]
    scores = _pope_units(preds, labels, cats)
    strata = np.asarray(cats)
    rng = np.random.default_rng(5)
    for _ in range(5):
        sums, official = {}, []
        for c in ("adversarial", "popular", "random"):
            members = np.flatnonzero(strata == c)
            idx = members[rng.integers(0, len(members), len(members))]
            sums[c] = scores.values[idx].sum(axis=0)
            official.append(pope_metrics([preds[i] for i in idx], [labels[i] for i in idx])["f1"])
        assert float(Confusion("f1").from_sums(sums)) == pytest.approx(sum(official) / 3)


def test_mme_metric_inside_bootstrap_equals_official_score_on_resamples():
    rnd = random.Random(1)
    pairs = [(c, [(rnd.choice(["Yes", "No"]), rnd.choice(["yes", "no", "maybe"])) for _ in range(2)])
             for c in ("existence", "count", "OCR") for _ in range(12)]
    rows, strata = [], []
    for c, pair in pairs:
        hits = [g.lower() == p for g, p in pair]
        rows.append([sum(hits), 2, float(all(hits)), 1])
        strata.append(c)
    values = np.array(rows, dtype=float)
    rng = np.random.default_rng(2)
    for _ in range(5):
        sums, official = {}, 0.0
        for c in ("existence", "count", "OCR"):
            members = np.flatnonzero(np.asarray(strata) == c)
            idx = members[rng.integers(0, len(members), len(members))]
            sums[c] = values[idx].sum(axis=0)
            official += mme_subtask_score([row for i in idx for row in pairs[i][1]])["score"]
        assert float(MMEScore().from_sums(sums)) == pytest.approx(official)


@pytest.mark.parametrize("spec", ["pope", "mme", "gqa", "sqa", "textvqa", "vizwiz:val", "vqav2:val", "mmbench"])
def test_question_scores_reproduce_the_scorer(tmp_path, spec):
    root = make_playground(tmp_path)
    bench = benchmarks.get(spec)
    samples = bench.load(root)
    rnd = random.Random(len(spec))
    words = ["yes", "no", "Yes", "No, there is not.", "red", "left", "A", "B", "C", "unanswerable", "nike"]
    answers = [{"question_id": s.question_id, "prompt": s.prompt, "text": rnd.choice(words)} for s in samples]
    if spec == "pope":  # F1 defined in every category
        for i, a in enumerate(answers):
            a["text"] = "Yes" if "dog" in a["prompt"] or i % 4 == 1 else "No, there is not."
    expected = bench.score(answers, root)["headline"]["value"]
    got = question_scores(spec, answers, root)
    assert got.value() == pytest.approx(expected, abs=0.01 if spec.startswith("vqav2") else 1e-9)
    if spec in ("pope", "mme", "gqa", "sqa", "mmbench"):
        assert got.correct is not None
    else:
        assert got.correct is None
