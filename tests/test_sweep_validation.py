"""Bad sweep input fails early and clearly (issue 12, item 3), worker failures and incomplete cells are
reported (item 4), and dry-run ids match the real run's (item 7)."""

from __future__ import annotations

import sys

import pytest
from eval_fixtures import make_pope

from finepruner.cli import main
from finepruner.sweep import runner as sweep_runner
from finepruner.sweep.store import ResultsStore

CONFIG = """name: s
benchmarks: [pope]
settings: {max_new_tokens: 2, batch_size: 2, limit: 4}
grid:
  - method: vanilla
  - method: fastv
    tokens: [16]
    K: 1
"""


def _config(tmp_path, text: str = CONFIG):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("param, message", [
    ("fastv.tokns=3", "--param fastv.tokns: method 'fastv' has no parameter 'tokns'; allowed: tokens"),
    ("nosuch.tokens=3", "--param nosuch.tokens: 'nosuch' is not a method of this sweep (vanilla, fastv)"),
    ("pdrop.tokens=3", "--param pdrop.tokens: 'pdrop' is not a method of this sweep"),
    ("tokns=3", "--param tokns: no method of this sweep (vanilla, fastv) has a parameter 'tokns'"),
    ("tokens=abc", "fastv: tokens='abc' is str; allowed: an integer or null"),
    ("K=1.5", "fastv: K=1.5 is float; allowed: an integer"),
])
def test_bad_param_is_an_error_before_the_model_loads(tmp_path, capsys, no_model_load, param, message):
    make_pope(tmp_path / "data")
    for extra in (["--dry-run"], ["--model", "toy", "--data-root", str(tmp_path / "data")]):
        rc = main(["sweep", _config(tmp_path), "--runs", str(tmp_path / "runs"), "--param", param, *extra])
        assert rc == 2
        assert message in capsys.readouterr().err
    assert no_model_load == []
    assert not (tmp_path / "runs" / "results.sqlite").exists()


def test_wrong_typed_config_value_fails_dry_run(tmp_path, capsys, no_model_load):
    cfg = _config(tmp_path, CONFIG.replace("tokens: [16]", "tokens: [16, abc]"))
    assert main(["sweep", cfg, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "fastv K=1 t16" in captured.out  # the grid is still listed
    assert "'fastv K=1 tabc': fastv: tokens='abc' is str; allowed: an integer or null" in captured.err
    # what needs the model's shape is checked against its config.json, without loading weights
    cfg = _config(tmp_path, CONFIG.replace("tokens: [16]", "tokens: [16, 500]"))
    assert main(["sweep", cfg, "--dry-run"]) == 0
    assert main(["sweep", cfg, "--dry-run", "--model", "toy"]) == 2
    assert "tokens=500" in capsys.readouterr().err
    cfg = _config(tmp_path, CONFIG + "  - method: finepruner\n    tokens: 16\n    heads: 99\n")
    assert main(["sweep", cfg, "--dry-run", "--model", "toy"]) == 2
    assert "heads=99" in capsys.readouterr().err
    assert main(["sweep", cfg, "--dry-run", "--model", str(tmp_path / "nomodel")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert no_model_load == []


@pytest.mark.parametrize("gpus, message", [
    ("abc", "'abc' is not a GPU index"), ("0,,1", "'' is not a GPU index"), ("-1", "'-1' is not a GPU index"),
    ("99", "no CUDA device is visible"), ("all", "no CUDA device is visible"), ("", "--gpus is empty"),
])
def test_bad_gpus_fail_before_anything_starts(tmp_path, capsys, monkeypatch, no_model_load, gpus, message):
    import subprocess

    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    started: list[object] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    make_pope(tmp_path / "data")
    rc = main(["sweep", _config(tmp_path), "--model", "toy", "--data-root", str(tmp_path / "data"),
               "--runs", str(tmp_path / "runs"), "--gpus", gpus])
    assert rc == 2 and message in capsys.readouterr().err
    assert started == [] and no_model_load == []
    assert not (tmp_path / "runs").exists()


def test_gpu_count_checked_against_devices():
    with pytest.raises(ValueError, match="GPU 2 not present; this machine has 2 CUDA device"):
        sweep_runner.parse_gpus("0,2", available=2)
    with pytest.raises(ValueError, match="count of GPUs must be 1..2"):
        sweep_runner.parse_gpus("3", available=2)
    cmds = sweep_runner.worker_commands(["sweep", "c.yaml"], ["0", "1"], "s", env={"CUDA_VISIBLE_DEVICES": "4,6"})
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in cmds] == ["4", "6"]  # indices of the visible devices


def test_dead_workers_are_reported_and_fail_the_sweep(tmp_path, capsys, monkeypatch):
    """One worker killed, the other gone without running anything: the sweep must not say "0 failed"
    and exit 0 with its cells undone."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    fake = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    quiet = [sys.executable, "-c", "pass"]
    monkeypatch.setattr(sweep_runner, "worker_commands",
                        lambda argv, gpus, session: [(fake, {}), (quiet, {})])
    make_pope(tmp_path / "data")
    rc = main(["sweep", _config(tmp_path), "--model", "toy", "--data-root", str(tmp_path / "data"),
               "--runs", str(tmp_path / "runs"), "--gpus", "0,1", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "s: 2 cells: 0 run, 0 already complete, 0 failed, 2 not run" in captured.out
    assert "GPU 0: worker exited with code -9" in captured.err
    assert "GPU 1" not in captured.err  # exit 0 is not a worker failure ...
    assert "2 cell(s) neither complete nor failed" in captured.err  # ... but its cells are undone


def test_incomplete_cell_is_not_complete_and_reruns(tmp_path):
    """A cell whose run recorded an answer as an error (an unreadable image) is stored failed, from the
    counts that evaluate returned; once the image is fixed, the next sweep regenerates only that answer."""
    import shutil

    from finepruner.models.tiny import build_tiny_llava
    from finepruner.sweep.config import parse_sweep

    model, processor = build_tiny_llava(seed=0, qk_scale=8.0)
    make_pope(tmp_path / "data")
    image = tmp_path / "data" / "pope" / "val2014" / "COCO_val2014_000000000001.jpg"
    shutil.copy(image, tmp_path / "good.jpg")
    image.write_bytes(b"not a jpeg")
    sweep = parse_sweep({"name": "t", "benchmarks": ["pope"], "settings": {"max_new_tokens": 2, "batch_size": 2},
                         "grid": [{"method": "fastv", "tokens": 16, "K": 1}]})
    opts = sweep_runner.SweepOptions(data_root=str(tmp_path / "data"), runs_dir=str(tmp_path / "runs"),
                                     model_id="tiny", progress=False)
    (cell,) = sweep.cells("tiny")
    result = sweep_runner.run_sweep(sweep, opts, model=model, processor=processor)
    assert (result.completed, result.failed) == (0, 1)
    assert "0 of 6 questions without an answer, 1 answers recorded as errors" in result.errors[cell.run_id]
    with ResultsStore(opts.store_path) as store:
        assert store.status(cell.run_id) == "failed"
    shutil.copy(tmp_path / "good.jpg", image)
    again = sweep_runner.run_sweep(sweep, opts, model=model, processor=processor)
    assert (again.completed, again.failed, again.skipped) == (1, 0, 0)
    with ResultsStore(opts.store_path) as store:
        rec = store.get(cell.run_id)
        assert rec.status == "complete" and rec.timing["already_done"] == 5 and rec.timing["generated"] == 1


def test_dry_run_ids_are_those_of_the_real_run(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["sweep", cfg, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pass --model or --model-id" in out and "----------------  -" in out  # no ids that would differ
    from finepruner.sweep.config import load_sweep

    real_ids = [c.run_id for c in load_sweep(cfg).cells(model_id="toy")]
    for flags in (["--model", "toy"], ["--model-id", "toy"]):
        assert main(["sweep", cfg, "--dry-run", *flags]) == 0
        listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
        assert listed == real_ids


@pytest.mark.parametrize("edit, message", [
    (("batch_size: 2", "batch_size: 0"), "settings.batch_size: 0 is not allowed; allowed: an integer >= 1"),
    (("limit: 4", "limit: -1"), "settings.limit: -1 is not allowed"),
    (("max_new_tokens: 2", "max_new_tokens: abc"), "settings.max_new_tokens: 'abc' is not allowed"),
    (("limit: 4", "image_aspect_ratio: square"), "settings.image_aspect_ratio: 'square' is not allowed"),
    (("limit: 4", "dtype: float17"), "settings.dtype: dtype='float17' is not a floating-point torch dtype name"),
    (("name: s", "name: s\nbogus: 1"), "unknown top-level key(s) bogus"),
    (("grid:", "grid: [\n"), "not valid YAML"),
])
def test_bad_config_file(tmp_path, capsys, edit, message):
    cfg = _config(tmp_path, CONFIG.replace(*edit))
    assert main(["sweep", cfg, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--only", "bogus=3"], "--only bogus=...: unknown key 'bogus'; allowed: method, benchmark"),
    (["--exclude", "tokns=3"], "--exclude tokns=...: unknown key 'tokns'"),
    (["--cell", "0123456789abcdef"], "no cell matches --only/--exclude/--cell (run ids hash the model name"),
    (["--dtype", "float17"], "--dtype: dtype='float17' is not a floating-point torch dtype name"),
    (["--device", "foo"], "--device: device 'foo' is not a device name"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--limit", "-1"], "--limit -1: must be an integer >= 1"),
    (["--runs", "{tmp}/s.yaml"], "is a file; expected a folder"),
    (["--store", "{tmp}"], "is a folder; expected a file"),
    (["--store", "{tmp}/s.yaml"], "not an SQLite results store"),
])
def test_bad_sweep_arguments(tmp_path, capsys, no_model_load, args, message):
    make_pope(tmp_path / "data")
    cfg = _config(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    for extra in (["--dry-run", "--model-id", "m"], ["--model", "toy", "--data-root", str(tmp_path / "data")]):
        assert main(["sweep", cfg, *extra, *args]) == 2
        assert message in capsys.readouterr().err
    assert no_model_load == []


def test_cuda_device_must_be_present(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["sweep", _config(tmp_path), "--dry-run", "--device", "cuda"]) == 2
    assert "--device: device 'cuda': CUDA is not available on this machine" in capsys.readouterr().err
