"""``finepruner report``: bad arguments are errors, an interrupted report leaves no folder, and the automatic
layout keeps every method in the papers' table (issue 12, items 3-4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finepruner.cli import main
from finepruner.report import cli as report_cli
from finepruner.sweep.config import load_sweep
from finepruner.sweep.store import ResultsStore

EVAL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "eval.yaml"
METRIC = {"pope": "mean_f1", "mme": "perception"}


def _store_like_eval_yaml(path: Path, benchmarks: tuple[str, ...] = ("pope", "mme")) -> int:
    """Complete records for every cell of configs/eval.yaml on ``benchmarks``; returns their number."""
    cells = [c for c in load_sweep(EVAL_CONFIG).cells(model_id="llava") if c.benchmark in benchmarks]
    with ResultsStore(path) as store:
        store.register(cells, "eval")
        for i, cell in enumerate(cells):
            value = (1500.0 if cell.benchmark == "mme" else 85.0) - 0.01 * i
            metric = METRIC[cell.benchmark]
            store.complete(cell.run_id, metrics={"headline": {"metric": metric, "value": value}, metric: value},
                           run_dir=path.parent / cell.relative_dir(), answers_path=None, efficiency={},
                           timing={}, config={}, version="test")
    return len(cells)


def test_auto_layout_on_eval_yaml_lists_every_method(tmp_path, capsys):
    n = _store_like_eval_yaml(tmp_path / "results.sqlite")
    out = tmp_path / "rep"
    assert main(["report", "--store", str(tmp_path / "results.sqlite"), "--sweep", "eval", "--out", str(out),
                 "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert f"({n} complete runs)" in md
    assert "## Papers' layout" in md and "## Head-selection ablation" not in md
    rows = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")}
    for method in ("fastv", "finepruner", "pdrop", "sparsevlm", "vispruner", "cdpruner", "random"):
        assert method in rows, method
    assert "**vanilla (upper bound)**" in rows


def test_head_ablation_is_detected():
    from types import SimpleNamespace as R

    one = [R(model_id="m", method="finepruner", tokens=64, benchmark="pope", heads=16, strategy="sum")]
    assert not report_cli.is_head_ablation(one)
    assert report_cli.is_head_ablation(one + [R(**{**vars(one[0]), "strategy": "sparsity"})])
    assert report_cli.is_head_ablation(one + [R(**{**vars(one[0]), "heads": 8})])


@pytest.mark.parametrize("args, message", [
    (["--resamples", "0"], "--resamples 0: must be an integer >= 1"),
    (["--resamples", "-5"], "--resamples -5: must be an integer >= 1"),
    (["--seed", "-1"], "--seed -1: must be a non-negative integer"),
    (["--sweep", "nosuch"], "--sweep nosuch: not in"),
    (["--data-root", "nodata"], "--data-root nodata: not a folder"),
])
def test_bad_arguments_are_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _store_like_eval_yaml(tmp_path / "runs" / "results.sqlite", ("pope",))
    assert main(["report", "--no-plots", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "report").exists()


def test_bad_store_and_out(tmp_path, capsys):
    (tmp_path / "junk.sqlite").write_text("this is not a database\n" * 100)
    assert main(["report", "--store", str(tmp_path / "junk.sqlite")]) == 2
    assert "not an SQLite results store" in capsys.readouterr().err
    _store_like_eval_yaml(tmp_path / "results.sqlite", ("pope",))
    (tmp_path / "afile").write_text("x")
    assert main(["report", "--store", str(tmp_path / "results.sqlite"), "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"
    assert main(["report", "--runs", str(tmp_path)]) == 0  # --runs names the folder of results.sqlite


def test_interrupted_report_leaves_no_folder(tmp_path, monkeypatch):
    from finepruner.report import tables

    _store_like_eval_yaml(tmp_path / "results.sqlite", ("pope",))
    args = ["report", "--store", str(tmp_path / "results.sqlite"), "--no-plots"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tables, "papers_tables", interrupted)
    assert main([*args, "--out", str(tmp_path / "new" / "rep")]) == 130  # Ctrl-C (finepruner.cli)
    assert not (tmp_path / "new").exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
    # an earlier report stays as it was, and other files in the folder are never touched
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "rep")]) == 0
    (tmp_path / "rep" / "mine.txt").write_text("keep")
    before = (tmp_path / "rep" / "report.md").read_text()
    monkeypatch.setattr(tables, "papers_tables", interrupted)
    assert main([*args, "--out", str(tmp_path / "rep")]) == 130
    assert (tmp_path / "rep" / "report.md").read_text() == before
    assert (tmp_path / "rep" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["mine.txt", "papers.csv", "report.md"]


def test_no_complete_run_writes_nothing(tmp_path, capsys):
    with ResultsStore(tmp_path / "results.sqlite"):
        pass
    assert main(["report", "--store", str(tmp_path / "results.sqlite"), "--out", str(tmp_path / "rep")]) == 1
    assert "no complete runs match" in capsys.readouterr().err and not (tmp_path / "rep").exists()
