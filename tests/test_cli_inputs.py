"""``calibrate``, ``toy-data`` and ``show``: bad input is a clear error before any model load (issue 12,
item 3)."""

from __future__ import annotations

import pytest
from eval_fixtures import make_pope
from PIL import Image

from finepruner.cli import main


@pytest.fixture
def no_model_load(no_model_load, monkeypatch):
    """The shared fixture, and no CUDA device, so that "--device cuda" fails on every machine."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    return no_model_load


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuch"], "--model nosuch: checkpoint directory nosuch does not exist"),
    (["--bench", "nosuch"], "unknown benchmark 'nosuch'"),
    (["--bench", "pope:zzz"], "benchmark 'pope' has no split 'zzz'"),
    (["--n", "0"], "--n 0: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--layer", "99"], "--layer 99: out of range for toy (6 decoder layers); allowed: 1..5"),
    (["--layer", "0"], "--layer 0: must be an integer >= 1"),
    (["--out", "{tmp}"], "is a folder; pass the heads.json file"),
    (["--out", "{tmp}/afile/h.json"], "afile is a file, not a folder"),
    (["--data-root", "{tmp}/nodata"], "data root not found"),
    (["--dtype", "float17"], "--dtype: dtype='float17' is not a floating-point torch dtype name"),
    (["--device", "cuda"], "--device: device 'cuda': CUDA is not available on this machine"),
])
def test_calibrate_bad_input(tmp_path, capsys, no_model_load, args, message):
    make_pope(tmp_path / "data")
    (tmp_path / "afile").write_text("x")
    base = {"--model": "toy", "--bench": "pope", "--data-root": str(tmp_path / "data"),
            "--out": str(tmp_path / "heads.json")}
    base.update(dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2]))))
    assert main(["calibrate", *[x for kv in base.items() for x in kv], "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert no_model_load == [] and not (tmp_path / "heads.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n 0: must be an integer >= 1"), (["--n", "-3"], "--n -3: must be an integer >= 1"),
    (["--out", "{tmp}/afile"], "is a file; pass a folder"),
    (["--out", "{tmp}/afile/sub"], "afile is a file, not a folder"),
])
def test_toy_data_bad_input(tmp_path, capsys, args, message):
    (tmp_path / "afile").write_text("x")
    base = {"--out": str(tmp_path / "suite"), **dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2])))}
    assert main(["toy-data", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "suite").exists() and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuch"], "--model nosuch: checkpoint directory nosuch does not exist"),
    (["--method", "nosuch:tokens=3"], "--method nosuch: unknown method 'nosuch'"),
    (["--method", "fastv:tokens=abc"], "--method fastv: tokens='abc' is str; allowed: an integer or null"),
    (["--method", "fastv:tokens=999"], "tokens=999 is not allowed; this model has 144 visual tokens"),
    (["--method", "fastv:tokns=3"], "--method fastv: method 'fastv' has no parameter(s) tokns"),
    (["--method", "finepruner:tokens=16,heads=99"], "heads=99 is not allowed; this model has 8 heads"),
    (["--panel", "0"], "--panel 0: must be an integer >= 1"), (["--cols", "-1"], "--cols -1: must be"),
    (["--heads-method", "5"], "--heads-method 5: there are 1 methods"),
    (["--out", "{tmp}/afile"], "is a file; pass a folder"),
    (["--image", "{tmp}/none.png"], "no such file"), (["--image", "{tmp}/afile"], "not a readable image"),
    (["--dtype", "float17"], "--dtype: dtype='float17' is not a floating-point torch dtype name"),
    (["--device", "cuda"], "--device: device 'cuda': CUDA is not available on this machine"),
])
def test_show_bad_input(tmp_path, capsys, no_model_load, args, message):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img.png")
    (tmp_path / "afile").write_text("x")
    base = {"--model": "toy", "--image": str(tmp_path / "img.png"), "--question": "What?",
            "--out": str(tmp_path / "show"), "--method": "fastv:tokens=8"}
    base.update(dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2]))))
    assert main(["show", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err
    assert no_model_load == [] and not (tmp_path / "show").exists()


@pytest.mark.parametrize("args, message", [
    (["--minutes", "0"], "--minutes 0.0: must be a positive number"), (["--steps", "0"], "--steps 0: must be"),
    (["--batch-size", "0"], "--batch-size 0: must be"), (["--threads", "0"], "--threads 0: must be"),
    (["--eval-every", "-1"], "--eval-every -1.0: must be a positive number"),
    (["--init", "{tmp}/nope"], "not a toy checkpoint folder"), (["--out", "{tmp}/afile"], "is a file"),
])
def test_toy_train_bad_input(tmp_path, capsys, monkeypatch, args, message):
    import finepruner.toy.train as train_lib

    monkeypatch.setattr(train_lib, "train", lambda cfg: pytest.fail("training started on bad input"))
    (tmp_path / "afile").write_text("x")
    base = {"--out": str(tmp_path / "ckpt"), **dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2])))}
    assert main(["toy-train", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err
