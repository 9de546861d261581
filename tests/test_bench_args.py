"""``finepruner bench`` with bad arguments: a clear error naming the option, exit code 2, and nothing built
(``docs/errors.md``, "finepruner bench"). Also the per-shape default budgets."""

from __future__ import annotations

import pytest
import torch

from finepruner.bench import cli as bench_cli
from finepruner.bench import runner
from finepruner.cli import main

QUICK = ["--rounds", "1", "--warmup", "0", "--decode-steps", "1", "--quiet"]


@pytest.fixture()
def no_build(monkeypatch):
    """Fail the test if the command gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built although the arguments are bad")

    monkeypatch.setattr(bench_cli, "load_bench_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "argument --rounds: 0 is too small; allowed: 1 or more"),
    (["--rounds", "x"], "argument --rounds: 'x' is not an integer"),
    (["--warmup", "-1"], "argument --warmup: -1 is too small; allowed: 0 or more"),
    (["--batch", "0"], "argument --batch: 0 is too small"),
    (["--decode-steps", "-1"], "argument --decode-steps: -1 is too small; allowed: 0 or more"),
    (["--threads", "0"], "argument --threads: 0 is too small"),
    (["--budgets", "0"], "argument --budgets: 0 is too small"),
    (["--budgets", "many"], "argument --budgets: 'many' is not an integer"),
    (["--system-tokens", "0"], "argument --system-tokens: 0 is too small"),
    (["--text-tokens", "0"], "argument --text-tokens: 0 is too small"),
    (["--attn", "fast"], "argument --attn: invalid choice: 'fast'"),
])
def test_bad_numbers_and_choices_fail_while_parsing(no_build, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--model", "tiny", *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def _bad_inputs(tmp_path) -> list[tuple[list[str], str]]:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    return [
        (["--model", "nope"], "--model 'nope' is neither a named shape (llava-1.5-7b, llava-1.5-13b, medium, "
                              "llava-next-7b, next-medium, qwen2.5-vl-7b, qwen3-vl-8b, qwen-medium, toy, tiny) nor an "
                              "existing local checkpoint directory"),
        (["--model", str(tmp_path / "a_file")], "is a file; pass the checkpoint's directory"),
        (["--model", str(tmp_path / "empty")], "has no config.json"),
        (["--methods", "nope"], "--methods 'nope': unknown method 'nope'; available: "),
        (["--methods", "fastv:K"], "--methods 'fastv:K': method spec 'fastv:K': expected key=value, got 'K'"),
        (["--methods", "fastv:foo=1"],
         "--methods 'fastv:foo=1': unknown parameter(s) foo for method 'fastv'; allowed:"),
        (["--methods", "fastv:budget=all"], "--methods 'fastv:budget=all': fastv: budget='all'; allowed: 'kept'"),
        (["--methods", "fastv:tokens=5"], "the budget comes from --budgets (tokens=N); drop tokens="),
        (["--methods", "fastv", "fastv"], "--methods: 'fastv' is given twice"),
        (["--budgets", "8", "8"], "--budgets 8 8: each budget once"),
        (["--dtype", "int8"], "--dtype 'int8': allowed: float32, bfloat16, float16"),
        (["--dtype", "fp32"], "--dtype 'fp32': allowed: float32, bfloat16, float16"),
        (["--device", "toaster"], "device 'toaster' is not a device name"),
        (["--json", str(tmp_path / "missing" / "b.json")], "does not exist; create it first"),
        (["--json", str(tmp_path)], "is a directory; give a file name"),
        (["--markdown", str(tmp_path / "missing" / "b.md")], "does not exist; create it first"),
        (["--plot", str(tmp_path / "b.jpg")], f"--plot '{tmp_path / 'b.jpg'}': the file name must end in .png"),
        (["--json", str(tmp_path / "same"), "--markdown", str(tmp_path / "same")], "must name different files"),
        (["--clip-model", str(tmp_path / "no_clip")], "is not a directory (a local CLIP checkpoint)"),
    ]


def test_bad_inputs_fail_before_the_model_is_built(no_build, capsys, tmp_path):
    for argv, message in _bad_inputs(tmp_path):
        assert main(["bench", "--model", "tiny", *QUICK, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("finepruner bench: error: ") and message in err, (argv, err)
        assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda(no_build, capsys):
    assert main(["bench", "--model", "tiny", "--device", "cuda", *QUICK]) == 2
    assert "CUDA is not available on this machine" in capsys.readouterr().err


def test_prompt_longer_than_the_model_fails_before_running(capsys):
    assert main(["bench", "--model", "tiny", "--text-tokens", "100000", *QUICK]) == 2
    assert "more than the model's" in capsys.readouterr().err


def test_run_bench_refuses_zero_rounds():
    with pytest.raises(ValueError, match="rounds=0"):
        runner.run_bench(None, {"input_ids": torch.zeros(1, 1)}, [], rounds=0)


def test_default_budgets_fit_the_model():
    assert runner.default_budgets(576) == (64, 128, 192)
    assert runner.default_budgets(144) == (16, 32, 64)  # the toy model
    assert runner.default_budgets(64) == (8, 16, 32)  # the tiny shape
    assert runner.default_budgets(100) == (11, 22, 33)
    assert all(b < 144 for b in runner.default_budgets(144))
