"""A new benchmark is one module: the class of docs/benchmarks.md ("Adding a benchmark"), registered, is
run by ``evaluate``, scored by ``finepruner score``, stored by a sweep and compared by the paired
statistics, with nothing else changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from eval_fixtures import make_image

from finepruner.cli import main
from finepruner.eval import EvalConfig, benchmarks, evaluate
from finepruner.eval.aggregation import Mean, QuestionResults, unit_key
from finepruner.eval.benchmarks.base import Benchmark
from finepruner.eval.io import read_json
from finepruner.sweep.config import parse_sweep
from finepruner.sweep.runner import SweepOptions, run_sweep
from finepruner.sweep.scores import run_question_scores
from finepruner.sweep.stats import paired_bootstrap
from finepruner.sweep.store import ResultsStore


class MyBench(Benchmark):
    """docs/benchmarks.md's example, verbatim but for the decorator (registered per test below)."""

    name, subdir, splits = "mybench", "mybench", ("val",)
    default_files = {"val": {"questions": "q.jsonl", "images": "images", "annotations": "gt.json"}}
    inference_keys = {"val": ("questions", "images")}
    scoring_keys = {"val": ("annotations",)}
    headline = "accuracy"

    def aggregation(self):
        return {"accuracy": Mean(binary=True)}

    def process_results(self, question, answer, *, judge=None):
        ok = answer["text"].strip().lower() == question["answer"]
        return {"accuracy": {"key": unit_key(question["question_id"]), "score": float(ok)}}

    def question_results(self, answers, data_root, *, out_dir=None, judge=None, model_id="model"):
        gt = read_json(self.path(data_root, "annotations"))
        by_id = {str(a["question_id"]): a for a in answers}
        values = [self.process_results(q, by_id[q["question_id"]]) for q in gt if q["question_id"] in by_id]
        return QuestionResults(self.spec, values, {"counts": {"answers": len(answers)}})

    def metrics_from(self, results):
        return self.scored_result(results, accuracy=self.aggregate(results)["accuracy"],
                                  counts=results.info["counts"])


@pytest.fixture
def registered(monkeypatch):
    """MyBench in a copy of the registry (removed after the test)."""
    monkeypatch.setattr(benchmarks, "_REGISTRY", dict(benchmarks._REGISTRY))
    benchmarks._ensure_builtins()
    benchmarks.register(MyBench)
    with pytest.raises(ValueError, match="benchmark name 'mybench' is taken"):
        benchmarks.register(type("MyBench", (MyBench,), {"__module__": "elsewhere"}))
    return MyBench


@pytest.fixture
def root(tmp_path) -> Path:
    d = tmp_path / "eval" / "mybench"
    rows, gt = [], []
    for i, (question, answer) in enumerate((("Is it red?", "yes"), ("Is it blue?", "no"), ("Red?", "yes"))):
        make_image(d / "images" / f"{i}.png", (200, 10 * i, 10))
        rows.append({"question_id": str(i), "image": f"{i}.png", "text": question})
        gt.append({"question_id": str(i), "answer": answer})
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "gt.json").write_text(json.dumps(gt))
    return tmp_path / "eval"


def test_a_registered_module_runs_everywhere(registered, root, tiny, tmp_path, capsys):
    model, processor = tiny
    assert "mybench" in benchmarks.available()
    result = evaluate(EvalConfig(benches=["mybench"], data_root=str(root), out=str(tmp_path / "run"),
                                 max_new_tokens=2, progress=False), model=model, processor=processor)
    run = result.runs["mybench"]
    assert run.metrics["scored"] and run.metrics["complete"] and len(run.results.values) == 3
    assert run.metrics["headline"]["value"] == registered().aggregate(run.results)["accuracy"]

    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": str(i), "prompt": "p", "text": t}) + "\n"
                               for i, t in enumerate(("Yes", "yes", "YES"))))
    assert main(["score", "--bench", "mybench", "--answers", str(answers), "--data-root", str(root), "--json"]) == 0
    printed: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert printed["headline"] == {"metric": "accuracy", "value": pytest.approx(200 / 3)}

    sweep = parse_sweep({"name": "mine", "benchmarks": ["mybench"], "settings": {"max_new_tokens": 2},
                         "grid": [{"method": "vanilla"}, {"method": "fastv", "tokens": 8, "K": 1}]})
    opts = SweepOptions(data_root=str(root), runs_dir=str(tmp_path / "runs"), model_id="tiny", progress=False)
    assert run_sweep(sweep, opts, model=model, processor=processor).completed == 2
    with ResultsStore(opts.store_path) as store:
        a, b = store.runs(sweep="mine")
        comparison = paired_bootstrap(run_question_scores(a, store, root), run_question_scores(b, store, root),
                                      resamples=200)
        assert comparison.n_units == 3 and comparison.a == a.value and comparison.b == b.value
        assert comparison.mcnemar is not None
