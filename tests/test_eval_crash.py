"""Crash safety of ``finepruner eval``: torn last lines, error records retried on resume, Ctrl-C, a real
SIGKILL mid-run on the shipped toy model, and runs with missing answers reported as incomplete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_fixtures import answer_texts, make_playground, make_pope, playground_root, saved_tiny  # noqa: F401 (the tiny and playground fixtures)

import finepruner
from finepruner.cli import main
from finepruner.eval import EvalConfig, evaluate
from finepruner.eval.io import AnswerWriter, read_answers, repair_torn_tail
from finepruner.eval.runner import Generator
from finepruner.toy.suite import write_suite

REPO = Path(__file__).resolve().parents[1]


def _config(root: Path, out: Path, **kw) -> EvalConfig:
    return EvalConfig(benches=["pope"], data_root=str(root), out=str(out), max_new_tokens=3, batch_size=1,
                      progress=False, model_id="tiny", **kw)


def test_repair_torn_tail(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert repair_torn_tail(path) == len(b'{"c": ') and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert repair_torn_tail(path) == 0
    path.write_bytes(b'{"a": 1}\n{"b"\n')  # the newline made it to disk, the rest did not
    assert repair_torn_tail(path) == 5 and path.read_bytes() == b'{"a": 1}\n'
    with AnswerWriter(path) as writer:  # appending starts on a clean line
        writer.write_batch([{"d": 4}])
    assert path.read_text().splitlines() == ['{"a": 1}', '{"d": 4}']


def test_torn_last_line_is_cut_before_resuming(tiny, playground, tmp_path):
    model, processor, _ = tiny
    full = evaluate(_config(playground, tmp_path / "full"), model=model, processor=processor)

    def crash(spec: str, batch: int) -> None:
        if batch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(playground, tmp_path / "torn"), model=model, processor=processor, on_batch=crash)
    answers = tmp_path / "torn" / "pope" / "answers.jsonl"
    whole = answers.read_text().splitlines()
    assert len(whole) == 3
    answers.write_text("\n".join(whole[:2]) + "\n" + whole[2][: len(whole[2]) // 2])  # crash mid-write
    resumed = evaluate(_config(playground, tmp_path / "torn"), model=model, processor=processor)
    assert answer_texts(answers) == answer_texts(tmp_path / "full" / "pope" / "answers.jsonl")
    assert resumed["pope"]["headline"] == full["pope"]["headline"]
    assert resumed["pope"]["missing"] == 0 and resumed["pope"]["complete"] is True


def test_corrupt_line_inside_answers_stops_resume(tiny, playground, tmp_path):
    model, processor, _ = tiny
    evaluate(_config(playground, tmp_path / "r", limit=3), model=model, processor=processor)
    answers = tmp_path / "r" / "pope" / "answers.jsonl"
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(Exception, match=r"answers.jsonl:2: not valid JSON"):
        evaluate(_config(playground, tmp_path / "r"), model=model, processor=processor)


def test_error_records_are_retried_on_resume(tiny, tmp_path):
    model, processor, _ = tiny
    root = tmp_path / "eval"
    make_pope(root)
    image = root / "pope" / "val2014" / "COCO_val2014_000000000002.jpg"
    good = image.read_bytes()
    image.write_bytes(b"not an image")
    first = evaluate(_config(root, tmp_path / "run"), model=model, processor=processor)
    assert first["pope"]["errors"] == 1 and first["pope"]["complete"] is False
    image.write_bytes(good)  # the user fixes the file and reruns
    second = evaluate(_config(root, tmp_path / "run"), model=model, processor=processor)
    evaluate(_config(root, tmp_path / "ref"), model=model, processor=processor)
    assert second["pope"]["errors"] == 0 and second["pope"]["complete"] is True
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())["benchmarks"]["pope"]
    assert timing["generated"] == 1 and timing["already_done"] == 5
    run, ref = (tmp_path / name / "pope" / "answers.jsonl" for name in ("run", "ref"))
    assert answer_texts(run) == answer_texts(ref)


def test_incomplete_run_exits_non_zero(tiny, tmp_path, capsys):
    _, _, model_dir = tiny
    root = tmp_path / "eval"
    make_pope(root)
    (root / "pope" / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(b"not an image")
    rc = main(["eval", "--model", str(model_dir), "--bench", "pope", "--data-root", str(root), "--out",
               str(tmp_path / "run"), "--max-new-tokens", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "pope: incomplete: 0 of 6 questions without an answer, 1 answers recorded as errors" in err
    metrics = json.loads((tmp_path / "run" / "pope" / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["errors"] == 1 and metrics["missing"] == 0
    assert metrics["expected"] == 6


def test_ctrl_c_leaves_whole_lines_and_says_how_to_resume(tiny, playground, tmp_path, capsys, monkeypatch):
    _, _, model_dir = tiny
    args = ["eval", "--model", str(model_dir), "--bench", "pope", "--data-root", str(playground), "--out",
            str(tmp_path / "run"), "--max-new-tokens", "2", "--batch-size", "2", "--no-progress", "--model-id", "t"]
    calls = []
    real = Generator.answer_batch

    def interrupted(self, batch, max_new_tokens, model_id):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch, max_new_tokens, model_id)

    monkeypatch.setattr(Generator, "answer_batch", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    answers = tmp_path / "run" / "pope" / "answers.jsonl"
    assert answers.read_text().endswith("\n") and len(read_answers(answers)) == 2
    monkeypatch.setattr(Generator, "answer_batch", real)
    assert main(args) == 0
    assert [a[0] for a in answer_texts(answers)] == [1, 2, 10000001, 10000002, 20000001, 20000002]


def _answer_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    root = tmp_path / "suite"
    write_suite(root, n=4, seed=5)
    benches = ("pope", "gqa")
    reference = tmp_path / "reference"
    model, processor = finepruner.load_model("toy")
    evaluate(EvalConfig(benches=list(benches), data_root=str(root), out=str(reference), progress=False,
                        model_id="toy"), model=model, processor=processor)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "finepruner", "eval", "--model", "toy", "--data-root", str(root),
           "--out", str(out), "--no-progress", "--model-id", "toy"]
    for bench in benches:
        cmd += ["--bench", bench]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    answers = out / "pope" / "answers.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a bound against hanging, not a timing assertion
        while _answer_lines(answers) < 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = _answer_lines(answers)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert seen >= 10 and not (out / "pope" / "metrics.json").exists()
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    timing = json.loads((out / "timing.json").read_text())["benchmarks"]["pope"]
    assert timing["already_done"] >= seen  # everything on disk at the kill was kept
    for bench in benches:
        got = answer_texts(out / bench / "answers.jsonl")
        assert got == answer_texts(reference / bench / "answers.jsonl"), bench  # same answers, same order
        assert len({(q, p) for q, p, _ in got}) == len(got)
        m = json.loads((out / bench / "metrics.json").read_text())
        assert m["complete"] is True and m["headline"] == json.loads(
            (reference / bench / "metrics.json").read_text())["headline"]
