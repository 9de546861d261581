"""Runner, resume, CLI, bad input and torchrun tests on synthetic fixtures with a tiny random LLaVA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import FIXTURE_SIZES, answer_texts, make_playground, make_pope, playground_root, saved_tiny  # noqa: F401 (the tiny and playground fixtures)
from PIL import Image

from finepruner.cli import main as eval_cli
from finepruner.eval import EvalConfig, evaluate
from finepruner.eval.errors import DataError, EvalError
from finepruner.eval.io import read_answers
from finepruner.eval.prompting import build_prompt, expand2square

REPO = Path(__file__).resolve().parents[1]


def test_prompt_and_padding() -> None:
    p = build_prompt("Q?", True)
    assert p.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert p.endswith(" USER: <image>\nQ? ASSISTANT:")
    assert build_prompt("Q?", False).endswith("USER: Q? ASSISTANT:")
    img = expand2square(Image.new("RGB", (40, 20), (255, 0, 0)), (1, 2, 3))
    assert (
        img.size == (40, 40) and img.getpixel((0, 0)) == (1, 2, 3) and img.getpixel((20, 20)) == (255, 0, 0)
    )


def test_all_benchmarks_end_to_end(tiny, playground, tmp_path) -> None:
    model, processor, _ = tiny
    out = tmp_path / "run"
    cfg = EvalConfig(
        benches=list(FIXTURE_SIZES),
        data_root=str(playground),
        out=str(out),
        max_new_tokens=2,
        batch_size=2,
        progress=False,
        model_id="tiny",
    )
    metrics = evaluate(cfg, model=model, processor=processor)
    assert set(metrics) == set(FIXTURE_SIZES)
    for spec, n in FIXTURE_SIZES.items():
        d = out / spec.replace(":", "_")
        answers = read_answers(d / "answers.jsonl")
        assert len(answers) == n, spec
        assert set(answers[0]) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert json.loads((d / "metrics.json").read_text())["benchmark"] == spec.split(":")[0]
        m = metrics[spec]
        assert m["errors"] == 0 and m["counts"]["missing"] == 0 and m["counts"]["unknown"] == 0
        assert m["scored"] is (spec not in ("vqav2", "vizwiz", "mmvet")), spec
        if not m["scored"]:
            assert m["status"] == "not scored here" and Path(m["submission"]).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_id"] == "tiny" and config["benchmarks"]["pope"]["max_new_tokens"] == 2
    timing = json.loads((out / "timing.json").read_text())
    assert timing["benchmarks"]["pope"]["generated"] == 6
    # questions are in question order, MMBench rows carry their extra fields
    mmb = read_answers(out / "mmbench" / "answers.jsonl")
    assert [a["question_id"] for a in mmb] == [0, 1000000, 1] and mmb[0]["option_char"] == ["A", "B", "C"]
    # a rerun resumes: nothing left to generate, same answers
    before = answer_texts(out / "pope" / "answers.jsonl")
    evaluate(
        EvalConfig(
            benches=["pope"],
            data_root=str(playground),
            out=str(out),
            max_new_tokens=2,
            batch_size=2,
            progress=False,
            model_id="tiny",
        ),
        model=model,
        processor=processor,
    )
    assert json.loads((out / "timing.json").read_text())["benchmarks"]["pope"]["generated"] == 0
    assert answer_texts(out / "pope" / "answers.jsonl") == before


def test_resume_after_crash_equals_uninterrupted(tiny, playground, tmp_path) -> None:
    model, processor, _ = tiny

    def cfg(out: Path) -> EvalConfig:
        return EvalConfig(
            benches=["pope"],
            data_root=str(playground),
            out=str(out),
            max_new_tokens=3,
            batch_size=1,
            progress=False,
            model_id="tiny",
        )

    evaluate(cfg(tmp_path / "full"), model=model, processor=processor)

    def crash(spec: str, batch: int) -> None:
        if batch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg(tmp_path / "resumed"), model=model, processor=processor, on_batch=crash)
    assert len(read_answers(tmp_path / "resumed" / "pope" / "answers.jsonl")) == 3  # flushed per batch
    evaluate(cfg(tmp_path / "resumed"), model=model, processor=processor)
    assert answer_texts(tmp_path / "resumed" / "pope" / "answers.jsonl") == answer_texts(
        tmp_path / "full" / "pope" / "answers.jsonl"
    )
    with pytest.raises(EvalError, match="model_id"):
        evaluate(
            EvalConfig(
                benches=["pope"],
                data_root=str(playground),
                out=str(tmp_path / "full"),
                max_new_tokens=3,
                progress=False,
                model_id="other",
            ),
            model=model,
            processor=processor,
        )


def test_unreadable_image_is_an_error_record(tiny, tmp_path) -> None:
    model, processor, _ = tiny
    root = tmp_path / "eval"
    make_pope(root)
    (root / "pope" / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(b"not an image")
    m = evaluate(
        EvalConfig(
            benches=["pope"],
            data_root=str(root),
            out=str(tmp_path / "run"),
            max_new_tokens=2,
            batch_size=4,
            progress=False,
        ),
        model=model,
        processor=processor,
    )
    assert m["pope"]["errors"] == 1
    answers = read_answers(tmp_path / "run" / "pope" / "answers.jsonl")
    assert len(answers) == 6 and "cannot read image" in answers[0]["metadata"]["error"]
    assert "COCO_val2014_000000000001.jpg" in answers[0]["metadata"]["error"]


def test_bad_input_reported_before_model_load(tmp_path, playground, capsys) -> None:
    with pytest.raises(DataError, match="data root not found"):
        evaluate(
            EvalConfig(
                benches=["pope"],
                data_root=str(tmp_path / "nope"),
                out=str(tmp_path / "o"),
                model="/nonexistent/model",
            )
        )
    root = tmp_path / "eval"
    make_pope(root)
    (root / "pope" / "coco" / "coco_pope_random.json").unlink()
    for p in (root / "pope" / "coco").iterdir():
        p.unlink()
    (root / "pope" / "coco").rmdir()
    rc = eval_cli(
        [
            "eval",
            "--model",
            "/nonexistent/model",
            "--bench",
            "pope",
            "--data-root",
            str(root),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "annotations" in err and str(root / "pope" / "coco") in err
    rc = eval_cli(
        ["eval", "--model", "x", "--bench", "poppe", "--data-root", str(root), "--out", str(tmp_path)]
    )
    assert rc == 2 and "valid names: vqav2, gqa, vizwiz, sqa" in capsys.readouterr().err


def test_cli_eval_and_score(tiny, playground, tmp_path, capsys) -> None:
    _, _, model_dir = tiny
    out = tmp_path / "run"
    rc = eval_cli(
        [
            "eval",
            "--model",
            str(model_dir),
            "--bench",
            "mme",
            "--bench",
            "sqa",
            "--data-root",
            str(playground),
            "--out",
            str(out),
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "mme: perception" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["method"] is None and config["method_params"] == {} and config["limit"] == 2
    assert len(read_answers(out / "mme" / "answers.jsonl")) == 2
    rc = eval_cli(
        [
            "score",
            "--bench",
            "mme",
            "--answers",
            str(out / "mme" / "answers.jsonl"),
            "--data-root",
            str(playground),
            "--json",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0 and printed["benchmark"] == "mme" and printed["counts"]["missing"] == 2
    # an answers file with unknown and missing ids is reported with counts
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {
                "question_id": 1,
                "prompt": "Is there a dog in the image?\nAnswer the question using a single word or phrase.",
                "text": "Yes",
            }
        )
        + "\n"
        + json.dumps({"question_id": 999, "prompt": "x", "text": "No"})
        + "\n"
    )
    rc = eval_cli(["score", "--bench", "pope", "--answers", str(bad), "--data-root", str(playground)])
    captured = capsys.readouterr()
    assert rc == 0 and "5 questions without an answer, 1 answers with unknown question ids" in captured.err
    rc = eval_cli(["score", "--bench", "gqa", "--answers", str(bad), "--data-root", str(playground)])
    assert rc == 2 and "none of its 2 answers belong to gqa" in capsys.readouterr().err


def test_method_param_goes_to_apply(tiny, playground, tmp_path) -> None:
    model, processor, _ = tiny
    m = evaluate(
        EvalConfig(
            benches=["pope"],
            data_root=str(playground),
            out=str(tmp_path / "r"),
            max_new_tokens=2,
            method="random",
            method_params={"tokens": 16},
            progress=False,
            limit=2,
        ),
        model=model,
        processor=processor,
    )
    assert m["pope"]["counts"]["answers"] == 2
    efficiency = m["pope"]["efficiency"]
    assert efficiency["samples"] == 2 and efficiency["mean_average_visual_tokens"] == 16.0
    assert efficiency["mean_prefill_tflops"] > 0
    assert "forward" not in vars(model.model.language_model)  # the method was removed after the run


def test_torchrun_two_processes_match_single(tiny, playground, tmp_path) -> None:
    _, _, model_dir = tiny
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--bench",
        "pope",
        "--bench",
        "sqa",
        "--data-root",
        str(playground),
        "--max-new-tokens",
        "2",
        "--no-progress",
        "--model-id",
        "tiny",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    single = subprocess.run(
        [sys.executable, "-m", "finepruner", *args, "--out", str(tmp_path / "one")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "finepruner",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    for bench in ("pope", "sqa"):
        assert answer_texts(tmp_path / "two" / bench / "answers.jsonl") == answer_texts(
            tmp_path / "one" / bench / "answers.jsonl"
        )
        assert not list((tmp_path / "two" / bench).glob("answers.rank*.jsonl"))
        m1 = json.loads((tmp_path / "one" / bench / "metrics.json").read_text())
        m2 = json.loads((tmp_path / "two" / bench / "metrics.json").read_text())
        for m in (m1, m2):
            m.pop("answers_file")
            m.pop("submission", None)
        assert m1 == m2
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
