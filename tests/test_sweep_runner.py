"""Sweep runner on the tiny model and fixtures: resume, interruption, isolation of crashes, GPU plumbing."""

from __future__ import annotations

import sys

import pytest
from eval_fixtures import make_pope

from finepruner.cli import main
from finepruner.models.tiny import build_tiny_llava
from finepruner.sweep.config import parse_sweep
from finepruner.sweep.runner import SweepOptions, parse_gpus, run_sweep, worker_commands
from finepruner.sweep.store import ResultsStore


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0, qk_scale=8.0)


def _sweep():
    return parse_sweep({
        "name": "tiny", "benchmarks": ["pope"], "settings": {"max_new_tokens": 2, "batch_size": 2},
        "grid": [{"method": "vanilla"}, {"method": "fastv", "tokens": [16], "K": 1},
                 {"method": "finepruner", "tokens": 16, "K": 1, "heads": [99]}],  # H=99: fails at apply
    })


def test_resume_interrupt_and_crash_isolation(tmp_path, tiny):
    model, processor = tiny
    make_pope(tmp_path / "data")
    opts = SweepOptions(data_root=str(tmp_path / "data"), runs_dir=str(tmp_path / "runs"), model_id="tiny",
                        progress=False)
    sweep = _sweep()
    cells = sweep.cells("tiny")
    fastv = next(c for c in cells if c.method == "fastv")

    def interrupt(cell, batch):
        if cell.method == "fastv" and batch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, opts, model=model, processor=processor, on_batch=interrupt)
    with ResultsStore(opts.store_path) as st:
        assert st.status(cells[0].run_id) == "complete"  # vanilla finished before
        assert st.status(fastv.run_id) == "pending"  # interrupted: not complete
        partial = tmp_path / "runs" / fastv.relative_dir() / "pope" / "answers.jsonl"
        assert len(partial.read_text().splitlines()) == 2  # one batch of 2 kept

    result = run_sweep(sweep, opts, model=model, processor=processor)
    assert (result.skipped, result.completed, result.failed) == (1, 1, 1)
    (failed_id,) = result.errors
    assert "heads=99" in result.errors[failed_id]
    with ResultsStore(opts.store_path) as st:
        rec = st.get(fastv.run_id)
        assert rec.status == "complete" and rec.metric == "mean_f1" and rec.value is not None
        assert rec.timing["already_done"] == 2 and rec.timing["generated"] == 4  # resumed, not regenerated
        assert rec.efficiency["visual_tokens"][0] == 64 and rec.efficiency["visual_tokens"][-1] == 16
        assert rec.efficiency["paper_tflops"] > 0 and rec.efficiency["tflops"] > 0
        assert st.absolute(rec.answers_path).is_file()
        assert rec.config["method"] == "fastv" and rec.code_version
        assert st.get(failed_id).status == "failed" and "heads=99" in st.get(failed_id).error
        vanilla = st.get(cells[0].run_id)
        assert vanilla.efficiency["paper_tflops"] > rec.efficiency["paper_tflops"]

    rest = [c for c in cells if c.method != "finepruner"]
    again = run_sweep(sweep, opts, model=model, processor=processor, cells=rest)
    assert (again.skipped, again.completed) == (2, 0)


def test_gpu_worker_plumbing():
    assert parse_gpus("0,2,5", available=8) == ["0", "2", "5"]
    assert parse_gpus("3", available=8) == ["0", "1", "2"]
    assert parse_gpus("all", available=2) == ["0", "1"]
    assert parse_gpus(None) == []
    with pytest.raises(ValueError):
        parse_gpus("1,1", available=8)
    argv = ["sweep", "configs/eval.yaml", "--model", "m", "--gpus", "0,1", "--data-root", "d", "--gpus=0"]
    cmds = worker_commands(argv, ["0", "1"], "sess", env={"PATH": "x", "RANK": "3"})
    assert len(cmds) == 2
    for (cmd, env), gpu in zip(cmds, ["0", "1"]):
        assert cmd[:3] == [sys.executable, "-m", "finepruner"]
        assert "--gpus" not in cmd and not any(a.startswith("--gpus=") for a in cmd)
        assert cmd[cmd.index("--worker-session") + 1] == "sess"
        assert env["CUDA_VISIBLE_DEVICES"] == gpu and "RANK" not in env and env["PATH"] == "x"


def test_cli_dry_run_and_bad_config(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nbenchmarks: [pope]\ngrid:\n  - method: fastv\n    tokens: [64, 32]\n")
    assert main(["sweep", str(cfg), "--dry-run", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "s: 2 cells (run ids and status hash the model name" in out and "fastv t64" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nbenchmarks: [pope]\ngrid:\n  - method: fastv\n  - method: nosuch\n")
    assert main(["sweep", str(bad), "--model", "m", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "grid[1].method: unknown method 'nosuch'" in err
    assert not (tmp_path / "runs" / "results.sqlite").exists()  # nothing ran, nothing written
    assert main(["sweep", str(cfg)]) == 2
    assert "--model and --data-root" in capsys.readouterr().err
    # missing data is reported before any model is loaded
    assert main(["sweep", str(cfg), "--model", "nonexistent", "--data-root", str(tmp_path / "nodata"),
                 "--runs", str(tmp_path / "runs")]) == 2
    assert "data root not found" in capsys.readouterr().err
