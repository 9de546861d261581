"""Every registered method runs end to end through ``finepruner eval`` (and a sweep) on the shipped toy model.

Issue 12, item 2: CDPruner failed at the first prefill of an eval because nothing passed the processor;
the engine now decodes each sample's instruction with the processor bound at ``apply`` for every method
that needs it. The list of methods comes from the registry, so a new method is covered automatically.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import finepruner
from finepruner import methods
from finepruner.cli import main
from finepruner.eval import benchmarks
from finepruner.models.adapter import LlavaAdapter
from finepruner.sweep.store import ResultsStore
from finepruner.toy import clip_text_dir as toy_clip_dir
from finepruner.toy.evaluate import method_params
from finepruner.toy.suite import write_suite

BENCH = "gqa"
LIMIT = 4
BUDGET = 32  # of the toy model's 144 visual tokens; PDrop's layer average needs more than 24


@pytest.fixture(scope="module")
def toy():
    return finepruner.load_model("toy")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_data")
    write_suite(root, n=2, seed=3, benchmarks=(BENCH,))
    return root


def cli_params(method: str, model, processor) -> list[str]:
    """``--tokens``/``--param`` arguments that run ``method`` on the toy model (the toy evaluation's own
    defaults), without a CLIP tower for CDPruner: it must find the one shipped in the checkpoint."""
    params = method_params(method, None if method == "vanilla" else BUDGET, model)
    params.pop("clip_text", None)
    args = []
    for key, value in params.items():
        args += ["--tokens", str(value)] if key == "tokens" else ["--param", f"{key}={json.dumps(value)}"]
    return args


@pytest.mark.parametrize("method", methods.available())
def test_eval_runs_every_method(tmp_path, toy, data_root, method):
    model, processor = toy
    out = tmp_path / "run"
    rc = main(["eval", "--model", "toy", "--bench", BENCH, "--data-root", str(data_root), "--out", str(out),
               "--batch-size", "2", "--limit", str(LIMIT), "--method", method, "--no-progress",
               *cli_params(method, model, processor)])
    assert rc == 0
    questions = [s.question_id for s in benchmarks.get(BENCH).load(data_root)[:LIMIT]]
    assert len(questions) == LIMIT
    answers = [json.loads(line) for line in (out / BENCH / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == questions
    assert all(not a["metadata"].get("error") for a in answers)
    metrics = json.loads((out / BENCH / "metrics.json").read_text())
    assert metrics["counts"]["answers"] == LIMIT
    full = LlavaAdapter(model).num_visual_tokens
    if method == "vanilla":  # through the engine, which prunes nothing and records the full prefill
        assert all(a["metadata"]["prune"]["average_visual_tokens"] == full for a in answers)
        assert metrics["efficiency"]["samples"] == LIMIT and metrics["efficiency"]["mean_prefill_tflops"] > 0
    else:  # the method really pruned, in every answer
        assert all(a["metadata"]["prune"]["average_visual_tokens"] < full for a in answers)
        assert metrics["efficiency"]["samples"] == LIMIT


def test_sweep_runs_a_cdpruner_cell(tmp_path, data_root):
    """As ``configs/eval.yaml`` runs it: the CLIP tower named with ``--param cdpruner.clip_model=``."""
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({"name": "cd", "benchmarks": [BENCH], "settings": {"batch_size": 2},
                                  "grid": [{"method": "cdpruner", "tokens": [16]}]}))
    runs = tmp_path / "runs"
    rc = main(["sweep", str(config), "--model", "toy", "--data-root", str(data_root), "--runs", str(runs),
               "--limit", str(LIMIT), "--no-progress", "--param", f"cdpruner.clip_model={toy_clip_dir()}"])
    assert rc == 0
    with ResultsStore(runs / "results.sqlite", create=False) as store:
        (record,) = store.runs(status=None)
    assert record.status == "complete" and record.value is not None and record.method == "cdpruner"
    assert record.efficiency["visual_tokens"][0] == 16
