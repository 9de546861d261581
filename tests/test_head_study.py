"""A two-cell slice of the toy head study (configs/head_study_toy.yaml, docs/head_study.md) through the real
commands: calibrate, sweep, and the verdict script's bootstrap against ``all``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from finepruner.cli import main
from finepruner.sweep.store import ResultsStore
from finepruner.toy.model import checkpoint_dir
from finepruner.toy.suite import build_default_suite

ROOT = Path(__file__).resolve().parent.parent


def _verdict_module():
    spec = importlib.util.spec_from_file_location("head_study_verdict", ROOT / "benchmarks" / "head_study_verdict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head_study")
    suite = build_default_suite(tmp / "suite", n=3)
    calib = build_default_suite(tmp / "calib", n=3, seed=777)
    heads = tmp / "heads.json"
    assert main(["calibrate", "--model", "toy", "--bench", "gqa", "--data-root", str(calib), "--n", "8",
                 "--layer", "2", "--weights", "--out", str(heads), "--no-progress"]) == 0
    return tmp, suite, heads


def test_two_cell_slice_runs_and_is_compared_with_all(study, monkeypatch):
    tmp, suite, heads = study
    monkeypatch.setenv("HEADS_JSON", str(heads))
    store = tmp / "store.sqlite"
    argv = ["sweep", str(ROOT / "configs" / "head_study_toy.yaml"), "--model", str(checkpoint_dir()),
            "--data-root", str(suite), "--runs", str(tmp / "runs"), "--store", str(store), "--no-progress",
            "--only", "tokens=4", "--only", "strategy=all,sum", "--only", "benchmark=pope",
            "--exclude", "query=instruction", "--exclude", "heads=1,4,6"]
    assert main(argv) == 0
    with ResultsStore(store) as st:
        runs = st.runs(sweep="head_study_toy")
    assert sorted((r.strategy, r.heads) for r in runs) == [("all", None), ("sum", 2)]
    assert all(r.benchmark == "pope" and 0 <= r.value <= 100 for r in runs)

    verdict = _verdict_module()
    configs = verdict.load_configs(str(store), str(suite), "head_study_toy", benches=("pope",))
    tables = verdict.budget_tables(configs, benches=("pope",))
    rows = {e["label"]: e for e in tables[(4, "renormalised")]["rows"]}
    assert rows["all"]["vs_all"]["diff"] == 0.0
    low, high = rows["sum"]["vs_all"]["low"], rows["sum"]["vs_all"]["high"]
    assert low <= rows["sum"]["vs_all"]["diff"] <= high
    assert rows["sum"]["mean"] == pytest.approx(next(r.value for r in runs if r.strategy == "sum"), abs=1e-9)
    text = verdict.markdown(tables, None, None)
    assert "## 4 tokens, renormalised definitions" in text and "| sum | 2 |" in text
    json.dumps({f"{t}:{d}": v for (t, d), v in tables.items()})  # the results file is JSON
