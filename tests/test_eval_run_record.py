"""One run record end to end: ``evaluate`` returns a typed result that the sweep stores as it is (no file
read back, no sample generated again, each benchmark's data loaded once); the method and its parameters are
checked against the model's config.json before any weight loads; ``--processor-arg`` reaches the loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from eval_fixtures import make_pope

import finepruner.models.loading as loading
from finepruner.cli import main
from finepruner.eval import EvalConfig, evaluate
from finepruner.eval.benchmarks.base import Benchmark
from finepruner.eval.errors import EvalError
from finepruner.eval.runner import BenchmarkRun, EvalResult, Generator
from finepruner.report.compare import Comparer
from finepruner.sweep.config import parse_sweep
from finepruner.sweep.runner import SweepOptions, run_sweep
from finepruner.sweep.scores import question_scores
from finepruner.sweep.store import ResultsStore


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pope") / "eval"
    make_pope(root)
    return root


def test_evaluate_returns_the_run_record(tiny, pope_root, tmp_path):
    model, processor = tiny
    cfg = EvalConfig(benches=["pope"], data_root=str(pope_root), out=str(tmp_path / "run"), method="fastv",
                     method_params={"tokens": 16, "K": 1}, batch_size=4, max_new_tokens=2, progress=False)
    result = evaluate(cfg, model=model, processor=processor)
    assert isinstance(result, EvalResult) and list(result) == ["pope"]
    run = result.runs["pope"]
    assert isinstance(run, BenchmarkRun) and result["pope"] is run.metrics
    assert result.record["method"] == "fastv" and result.record["family"] == "llava"
    assert len(run.efficiency) == 6 and all(e["average_visual_tokens"] < 64 for e in run.efficiency)
    assert run.efficiency[0]["visual_tokens"][0] == 64 and run.efficiency[0]["visual_tokens"][-1] == 16
    assert run.timing["generated"] == 6 and result.timing["model_load_seconds"] >= 0
    # the per-question results are the ones the metrics were computed from
    from finepruner.eval import benchmarks

    bench = benchmarks.get("pope")
    assert bench.aggregate(run.results)["mean_f1"] == run.metrics["mean_f1"]
    assert len(run.results.values) == 6


def _sweep():
    return parse_sweep({"name": "record", "benchmarks": ["pope"], "settings": {"max_new_tokens": 2, "batch_size": 3},
                        "grid": [{"method": "vanilla"}, {"method": "fastv", "tokens": 16, "K": 1}]})


def test_sweep_stores_what_evaluate_returned_without_reading_back(tiny, pope_root, tmp_path, monkeypatch):
    model, processor = tiny
    returned: dict[str, EvalResult] = {}
    from finepruner.eval import runner as eval_runner

    real_evaluate = eval_runner.evaluate
    original_generate = Generator.generate
    loads: list[str] = []
    real_load = Benchmark.load

    def counting_load(self, data_root):
        loads.append(self.spec)
        return real_load(self, data_root)

    def evaluate_then_remove_files(config, **kwargs):
        result = real_evaluate(config, **kwargs)
        returned[config.method] = result
        run_dir = Path(config.out)
        for name in ("config.json", "timing.json", "metrics.json"):
            (run_dir / name).unlink()
        (run_dir / "pope" / "metrics.json").unlink()
        # nothing may generate after evaluate returned (the FLOPs probe is gone)
        monkeypatch.setattr(Generator, "generate", lambda *a, **k: pytest.fail("a sample was generated again"))
        return result

    monkeypatch.setattr(Benchmark, "load", counting_load)
    monkeypatch.setattr(eval_runner, "evaluate", evaluate_then_remove_files)
    opts = SweepOptions(data_root=str(pope_root), runs_dir=str(tmp_path / "runs"), model_id="tiny", progress=False)
    for cell in _sweep().cells("tiny"):
        monkeypatch.setattr(Generator, "generate", original_generate)
        assert run_sweep(_sweep(), opts, model=model, processor=processor, cells=[cell]).completed == 1
    assert loads == ["pope", "pope"]  # each cell read its questions once
    with ResultsStore(opts.store_path) as store:
        for cell in _sweep().cells("tiny"):
            rec = store.get(cell.run_id)
            result = returned[cell.method]
            run = result.runs["pope"]
            assert rec.metrics == run.metrics and rec.value == run.metrics["headline"]["value"]
            assert rec.config == result.record
            assert rec.efficiency["paper_tflops"] == run.efficiency_summary["mean_paper_tflops"]
            assert rec.efficiency["tflops"] == pytest.approx(
                sum(e["prefill_tflops"] for e in run.efficiency) / len(run.efficiency))
            assert rec.efficiency["visual_tokens"] == run.efficiency_summary["mean_visual_tokens"]
            assert rec.timing["generated"] == run.timing["generated"]
            assert store.results_of(cell.run_id) == run.results.to_json()
        vanilla, fastv = (store.get(c.run_id) for c in _sweep().cells("tiny"))
        assert vanilla.efficiency["paper_tflops"] > fastv.efficiency["paper_tflops"] > 0
        # the report compares from the stored per-question results, even without the answers file
        expected = question_scores("pope", [dict(a) for a in _answers(store, fastv)], pope_root)
        shutil.rmtree(store.absolute(fastv.run_dir))
        comparer = Comparer(store, pope_root, resamples=50)
        units = comparer.scores(fastv)
        assert units is not None and units.keys == expected.keys
        assert (units.values == expected.values).all()
        assert comparer(vanilla, fastv) is not None


def _answers(store, record):
    from finepruner.eval.io import read_answers

    return read_answers(store.absolute(record.answers_path))


@pytest.mark.parametrize(("method", "message"), [
    ("fastv:tokens=1000", "tokens"),  # more tokens than the toy model's 144 visual tokens
    ("fastv:tokens=16,K=40", "K"),  # a pruning layer beyond the toy model's 6 decoder layers
    ("finepruner:tokens=16,heads=99", "heads"),  # more heads than the toy model's
])
def test_bad_method_parameter_fails_before_any_model_load(no_model_load, pope_root, tmp_path, capsys, method,
                                                          message):
    rc = main(["eval", "--model", "toy", "--bench", "pope", "--data-root", str(pope_root), "--out",
               str(tmp_path / "run"), "--method", method, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert no_model_load == [] and not (tmp_path / "run").exists()


def test_bad_method_parameter_fails_before_load_in_python(no_model_load, pope_root, tmp_path):
    cfg = EvalConfig(benches=["pope"], data_root=str(pope_root), out=str(tmp_path / "r"), model="toy",
                     method="fastv", method_params={"tokens": 1000}, progress=False)
    with pytest.raises(EvalError, match="tokens"):
        evaluate(cfg)
    assert no_model_load == []


def test_eval_method_spec_and_processor_args_reach_the_loader(pope_root, tmp_path, monkeypatch, capsys):
    calls: list[dict] = []

    def record(path, *args, **kwargs):
        calls.append({"path": str(path), **kwargs})
        raise ValueError("stop after recording the call")

    monkeypatch.setattr(loading, "load_model", record)
    base = ["eval", "--model", "toy", "--bench", "pope", "--data-root", str(pope_root), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a"), "--method", "fastv:tokens=16", "--param", "K=1",
                 "--processor-arg", "min_pixels=3136", "--processor-arg", "max_pixels=12544"]) == 2
    assert "stop after recording" in capsys.readouterr().err
    assert calls[-1]["processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}
    assert not (tmp_path / "a" / "config.json").exists()  # nothing written before the model loaded
    assert main([*base, "--out", str(tmp_path / "b"), "--method", "fastv:tokens=16"]) == 2
    assert "processor_kwargs" not in calls[-1]  # none given: the loader's own defaults
    assert main([*base, "--out", str(tmp_path / "c"), "--method", "fastv:tokens=16", "--tokens", "8"]) == 2
    assert "sets tokens, which --param/--tokens/--K set differently" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "d"), "--processor-arg", "min_pixels"]) == 2
    assert "--processor-arg expects key=value, got 'min_pixels'" in capsys.readouterr().err
    assert len(calls) == 2


def test_sweep_passes_processor_kwargs_to_the_loader(pope_root, tmp_path, monkeypatch):
    calls: list[dict] = []

    def record(path, *args, **kwargs):
        calls.append(kwargs)
        raise ValueError("stop after recording the call")

    monkeypatch.setattr(loading, "load_model", record)
    sweep = parse_sweep({"name": "qwen", "benchmarks": ["pope"], "grid": [{"method": "vanilla"}],
                         "settings": {"processor_kwargs": {"min_pixels": 3136}}})
    opts = SweepOptions(data_root=str(pope_root), runs_dir=str(tmp_path / "runs"), model="toy", progress=False)
    with pytest.raises(ValueError, match="stop after recording"):
        run_sweep(sweep, opts)
    assert calls == [{"dtype": None, "device": calls[0]["device"], "processor_kwargs": {"min_pixels": 3136}}]
