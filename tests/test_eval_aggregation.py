"""Every benchmark's score is its aggregation over its per-question results (process_results), and the
paired statistics' units give back the same numbers: on the synthetic fixtures and on LLaVA-1.5-13B's
released answers (``../shared/realdata``, skipped where absent)."""

from __future__ import annotations

import math
import random
import zlib

import pytest
from eval_fixtures import make_playground
from test_eval_golden import ROOT as REAL_ROOT

from finepruner.eval import benchmarks
from finepruner.eval.aggregation import QuestionResults
from finepruner.eval.errors import NoQuestionScores
from finepruner.eval.io import read_answers

#: Every locally scored benchmark split of the fixtures.
LOCAL = ["pope", "mme", "gqa", "sqa", "textvqa", "vizwiz:val", "vqav2:val", "mmbench", "mmbench_cn", "mmvet"]
SERVER = ["vqav2", "vizwiz"]
WORDS = ["yes", "no", "Yes", "No, there is not.", "red", "left", "A", "B", "C", "unanswerable", "nike", "2"]


class GradingJudge:
    """A deterministic fake judge: a grade in [0, 1] from the prompt, sometimes unparsable first."""

    model = "fake-grader"

    def complete(self, prompt: str, *, max_tokens: int = 3, temperature: float = 0.0, tag: str = "") -> str:
        h = zlib.crc32((prompt + tag).encode())
        return "x" if h % 5 == 0 and temperature == 0.0 else f"{(h % 11) / 10:.1f}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_playground(tmp_path_factory.mktemp("agg") / "eval")


def _answers(bench, root, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    return [{"question_id": s.question_id, "prompt": s.prompt, "text": rnd.choice(WORDS)} for s in bench.load(root)]


def _check_agreement(bench, results: QuestionResults, metrics: dict) -> None:
    """The headline and every aggregated metric the score reports are the aggregation functions over
    the per-question values; the bootstrap units give the same value."""
    aggregated = bench.aggregate(results)
    assert metrics["headline"] == {"metric": bench.headline, "value": aggregated[bench.headline]}
    for metric, value in aggregated.items():
        if metric in metrics:
            assert metrics[metric] == value, metric
        if results.of(metric):
            units = bench.units(results, metric).value()
            if value is None:  # undefined (e.g. an F1 without a true positive): NaN in the bootstrap
                assert math.isnan(units), metric
            else:
                assert units == pytest.approx(value, rel=1e-12, abs=1e-12), metric


@pytest.mark.parametrize("spec", LOCAL)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_is_the_aggregation_of_process_results(root, spec, seed):
    bench = benchmarks.get(spec)
    answers = _answers(bench, root, seed)
    if spec == "pope" and seed == 0:  # a run whose F1 is defined in every split
        for i, a in enumerate(answers):
            a["text"] = "Yes" if "dog" in a["prompt"] or i % 4 == 1 else "No, there is not."
    if seed == 2:
        answers = answers[::-1][1:]  # shuffled order and a question missing
    judge = GradingJudge() if spec == "mmvet" else None
    results = bench.question_results(answers, root, judge=judge)
    metrics = bench.score(answers, root, judge=judge)
    assert metrics["scored"] and results.values
    _check_agreement(bench, results, metrics)
    # the values survive the store's JSON round trip
    again = QuestionResults.from_json(results.to_json())
    assert bench.aggregate(again) == bench.aggregate(results)


def test_mme_units_are_image_pairs_and_mcnemar_questions(root):
    bench = benchmarks.get("mme")
    answers = _answers(bench, root, 3)
    units = bench.units(bench.question_results(answers, root), "total")
    assert len(units.keys) == len(answers) // 2  # two questions per image
    assert units.correct_keys is not None and len(units.correct_keys) == len(answers)
    with pytest.raises(ValueError, match="allowed: perception, cognition, total"):
        bench.units(bench.question_results(answers, root), "nosuch")


@pytest.mark.parametrize("spec", SERVER)
def test_server_scored_splits_have_no_units(root, spec):
    bench = benchmarks.get(spec)
    results = bench.question_results(_answers(bench, root, 0), root)
    assert not bench.score(_answers(bench, root, 0), root)["scored"]
    with pytest.raises(NoQuestionScores, match="EvalAI"):
        bench.units(results)


def test_mmvet_without_judge_has_no_units(root):
    bench = benchmarks.get("mmvet")
    with pytest.raises(NoQuestionScores, match="judge"):
        bench.units(bench.question_results(_answers(bench, root, 0), root))


def test_mmvet_mean_of_question_means_is_the_mean_over_runs(root, monkeypatch):
    bench = benchmarks.get("mmvet")
    monkeypatch.setattr(bench, "num_runs", 3)
    metrics = bench.score(_answers(bench, root, 4), root, judge=GradingJudge())
    assert len(metrics["runs"]) == 3
    assert metrics["total"] == pytest.approx(sum(metrics["runs"]) / 3, abs=1e-9)


# -- LLaVA-1.5-13B's released answers ---------------------------------------------------------------
REAL = {
    "pope": ("pope/answers/llava-v1.5-13b.jsonl", {"mean_f1": 85.95}),
    "mme": ("MME/answers/llava-v1.5-13b.jsonl", {"perception": 1531.32, "cognition": 295.36}),
    "sqa": ("scienceqa/answers/llava-v1.5-13b.jsonl", {"img_accuracy": 71.64, "accuracy": 74.39}),
    "mmbench": ("mmbench/answers/mmbench_dev_20230712/llava-v1.5-13b.jsonl", {"circular_accuracy": 67.69}),
}


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason=f"real LLaVA-1.5 answers not found at {REAL_ROOT}")
@pytest.mark.parametrize("spec", sorted(REAL))
def test_released_13b_answers_aggregate_to_the_paper(spec):
    path, official = REAL[spec]
    bench = benchmarks.get(spec)
    answers = read_answers(REAL_ROOT / path)
    results = bench.question_results(answers, REAL_ROOT)
    metrics = bench.metrics_from(results)
    _check_agreement(bench, results, metrics)
    for metric, value in official.items():
        assert round(bench.aggregate(results)[metric], 2) == value
        assert round(bench.units(results, metric).value(), 2) == value
    if spec == "pope":  # shuffled: matched by question id, the same units and number
        shuffled = answers[:]
        random.Random(0).shuffle(shuffled)
        units = bench.units(bench.question_results(shuffled, REAL_ROOT))
        assert round(units.value(), 2) == 85.95 and len(units.keys) == 8910


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason=f"real LLaVA-1.5 answers not found at {REAL_ROOT}")
def test_released_vizwiz_and_mmvet_have_no_local_units():
    for spec, path in (("vizwiz", "vizwiz/answers/llava-v1.5-13b.jsonl"),
                       ("mmvet", "mm-vet/answers/llava-v1.5-13b.jsonl")):
        bench = benchmarks.get(spec)
        with pytest.raises(NoQuestionScores):
            bench.units(bench.question_results(read_answers(REAL_ROOT / path), REAL_ROOT))
