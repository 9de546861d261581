"""Bad input to ``finepruner eval`` / ``score``, answers files and checkpoints: each is a clear error (exit 2,
naming the option, file or line) and, for ``eval``, happens before any model is loaded (docs/errors.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from eval_fixtures import SHORT, make_image, make_mme, make_playground, make_pope

import finepruner.models.loading as loading
from finepruner.cli import main
from finepruner.eval.errors import AnswersError
from finepruner.eval.io import read_answers
from finepruner.eval.runner import score_file
from finepruner.toy.model import checkpoint_dir


@pytest.fixture(scope="module")
def playground(tmp_path_factory) -> Path:
    return make_playground(tmp_path_factory.mktemp("pg") / "eval")


def _eval(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "toy", "--bench", "pope", "--data-root", str(root), "--out",
            str(tmp_path / "run"), "--no-progress", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "16"], "method parameter(s) tokens given without a pruning method"),
        (["--K", "2"], "method parameter(s) K given without a pruning method"),
        (["--param", "ratio=0.5"], "method parameter(s) ratio given without a pruning method"),
        (["--method", "vanilla", "--tokens", "16"], "(--method is vanilla, which takes none)"),
        (["--limit", "-1"], "--limit must be an integer >= 1, got -1"),
        (["--limit", "0"], "--limit must be an integer >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--device", "garbage"], "device 'garbage' is not a device name (use cpu, cuda, cuda:N or mps)"),
        (["--dtype", "int8"], "dtype='int8' is not a floating-point torch dtype name"),
        (["--dtype", "float17"], "dtype='float17' is not a floating-point torch dtype name"),
        (["--method", "nosuch"], "unknown method 'nosuch'; available:"),
        (["--method", "fastv", "--tokens", "16", "--param", "nosuch=1"], "unknown parameter(s) nosuch"),
        (["--method", "fastv", "--tokens", "-3"], "tokens must be an integer >= 1, got -3"),
        (["--method", "fastv", "--param", "tokens=abc"], "tokens must be an integer >= 1, got 'abc'"),
        (["--method", "finepruner", "--tokens", "8", "--param", "heads_from=missing.json"],
         "heads_from=missing.json: no such file"),
        (["--model-id", "a/b"], "--model-id 'a/b' must not contain '/'"),
        (["--bench", "pope"], "--bench pope given more than once"),
        (["--bench", "nosuch"], "unknown benchmark 'nosuch'; valid names:"),
        (["--bench", "pope:val"], "has no split 'val'"),
        (["--file", "gqa.questions=x.jsonl"], "--file names benchmark(s) gqa that are not in --bench"),
        (["--file", "pope.nokey=x"], "has no file key 'nokey'"),
        (["--file", "pope.questions=missing.jsonl"], "pope: missing questions:"),
    ],
)
def test_eval_bad_option_fails_before_model_load(no_model_load, tmp_path, playground, capsys, extra, message):
    rc = main(_eval(tmp_path, playground, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "CUDA is not available on this machine"),
        ("cuda:7", "CUDA is not available on this machine"),
        ("mps", "MPS is not available on this machine"),
    ],
)
def test_eval_unavailable_device(no_model_load, monkeypatch, tmp_path, playground, capsys, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(_eval(tmp_path, playground, "--device", device)) == 2
    assert message in capsys.readouterr().err


def test_eval_cuda_index_beyond_devices(no_model_load, monkeypatch, tmp_path, playground, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(_eval(tmp_path, playground, "--device", "cuda:7")) == 2
    assert "only 2 CUDA device(s) are visible (cuda:0 to cuda:1)" in capsys.readouterr().err


def test_eval_out_is_a_file(no_model_load, tmp_path, playground, capsys):
    out = tmp_path / "results.json"
    out.write_text("{}")
    args = _eval(tmp_path, playground)
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 2
    assert f"--out {out} is a file" in capsys.readouterr().err and out.read_text() == "{}"


def test_eval_reports_every_missing_file_of_every_benchmark(no_model_load, tmp_path, capsys):
    root = tmp_path / "eval"
    make_pope(root)
    make_mme(root)
    (root / "pope" / "llava_pope_test.jsonl").unlink()
    shutil.rmtree(root / "MME" / "MME_Benchmark_release_version")
    assert main(_eval(tmp_path, root, "--bench", "mme", "--bench", "gqa")) == 2
    err = capsys.readouterr().err
    assert "pope: missing questions:" in err and "mme: missing images:" in err and "gqa: missing" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question_id": 1, "image": "x.jpg"}\n', "llava_pope_test.jsonl: line 1 has no 'text' field"),
        ('{"question_id": 1, "image": "x.j', "llava_pope_test.jsonl:1: not valid JSON"),
    ],
)
def test_eval_malformed_question_file_before_model_load(no_model_load, tmp_path, capsys, content, message):
    root = tmp_path / "eval"
    make_pope(root)
    (root / "pope" / "llava_pope_test.jsonl").write_text(content)
    assert main(_eval(tmp_path, root)) == 2
    assert message in capsys.readouterr().err


def _toy_copy(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    for path in checkpoint_dir().iterdir():
        if path.is_file():
            shutil.copy(path, target / path.name)
    return target


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "model.safetensors is truncated: 1000000 bytes, its header describes"),
        ("garbage", "model.safetensors is truncated or not a safetensors file"),
        ("header", "model.safetensors has a corrupt safetensors header"),
        ("no_config", "has no config.json"),
        ("config_list", "config.json must hold a JSON object, not list"),
        ("bad_architecture", "config.json is not a valid llava configuration"),
    ],
)
def test_eval_damaged_checkpoint_named_before_load(no_model_load, tmp_path, playground, capsys, damage, message):
    ckpt = _toy_copy(tmp_path)
    weights = ckpt / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1_000_000])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 100)
    elif damage == "header":
        weights.write_bytes((20).to_bytes(8, "little") + b"{not json at all...}" + b"\x00" * 100)
    elif damage == "no_config":
        (ckpt / "config.json").unlink()
    elif damage == "config_list":
        (ckpt / "config.json").write_text("[1]")
    else:
        config = json.loads((ckpt / "config.json").read_text())
        config["text_config"]["hidden_size"] = 7  # not a multiple of the heads
        (ckpt / "config.json").write_text(json.dumps(config))
    args = _eval(tmp_path, playground)
    args[args.index("--model") + 1] = str(ckpt)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and str(ckpt) in err and "Traceback" not in err


def test_load_model_wraps_unloadable_tokenizer(tmp_path):
    ckpt = _toy_copy(tmp_path)
    (ckpt / "tokenizer.json").write_text('{"x":')
    with pytest.raises(ValueError, match="cannot load the tokenizer/processor of checkpoint"):
        loading.load_model(ckpt)


# ---------------------------------------------------------------- answers files (score and the runner)


def _pope_answers(root: Path) -> list[dict]:
    questions = [json.loads(x) for x in (root / "pope" / "llava_pope_test.jsonl").read_text().splitlines()]
    labels = {}
    for cat in ("adversarial", "popular", "random"):
        rows = [json.loads(x) for x in (root / "pope" / "coco" / f"coco_pope_{cat}.json").read_text().splitlines()]
        labels[cat] = [r["label"] for r in rows]
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        k = seen.get(q["category"], 0)
        seen[q["category"]] = k + 1
        out.append({"question_id": q["question_id"], "prompt": q["text"], "text": labels[q["category"]][k].title()})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("different", [False, True])
def test_duplicate_question_ids_named_with_lines(tmp_path, playground, capsys, different):
    rows = _pope_answers(playground)
    extra = dict(rows[1], text="No" if different else rows[1]["text"])
    path = _write(tmp_path / "answers.jsonl", [*rows, extra])
    rc = main(["score", "--bench", "pope", "--answers", str(path), "--data-root", str(playground)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}: 1 duplicate answer(s): question {rows[1]['question_id']} on lines 2 and 7" in err


def test_duplicates_in_mme_are_per_question_not_per_image(tmp_path, playground):
    from finepruner.eval import benchmarks

    samples = benchmarks.get("mme").load(playground)
    rows = [{"question_id": s.question_id, "prompt": s.prompt, "text": "Yes"} for s in samples]
    assert rows[0]["question_id"] == rows[1]["question_id"]  # two questions per image: not duplicates
    assert score_file("mme", _write(tmp_path / "ok.jsonl", rows), playground)["counts"]["missing"] == 0
    with pytest.raises(AnswersError, match="duplicate answer"):
        score_file("mme", _write(tmp_path / "dup.jsonl", [*rows, rows[0]]), playground)


@pytest.mark.parametrize(
    ("text", "shown"), [(3, "got int (3)"), (None, "got NoneType (null)"), (["yes"], 'got list (["yes"])')]
)
def test_non_string_text_names_file_and_line(tmp_path, playground, capsys, text, shown):
    rows = _pope_answers(playground)
    rows[2]["text"] = text
    path = _write(tmp_path / "answers.jsonl", rows)
    rc = main(["score", "--bench", "pope", "--answers", str(path), "--data-root", str(playground)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:3: 'text' of question {rows[2]['question_id']} must be a string, {shown}" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"question_id": 1, "text": "Yes"}\n{torn\n', ":2: not valid JSON"),
        (b"[1, 2]\n", ":1: expected a JSON object, got list"),
        (b'{"question_id": 1}\n', ":1: answer has no 'text' field"),
        (b'{"text": "no"}\n', ":1: answer has no 'question_id' field"),
        (b"\xff\xfe garbage\n", ":1: not UTF-8 text"),
        (b"", "has no answers (it is empty)"),
    ],
)
def test_malformed_answers_file(tmp_path, playground, capsys, content, message):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(content)
    rc = main(["score", "--bench", "pope", "--answers", str(path), "--data-root", str(playground)])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--answers", "{tmp}"], "answers file is a directory"),
        (["--answers", "{tmp}/none.jsonl"], "answers file not found"),
        (["--out", "{file}"], "is a file; pass a directory"),
        (["--file", "gqa.questions=x"], "--file names benchmark(s) gqa, not --bench pope"),
        (["--model-id", "x/y"], "--model-id 'x/y' must not contain '/'"),
    ],
)
def test_score_bad_arguments(tmp_path, playground, capsys, args, message):
    answers = _write(tmp_path / "answers.jsonl", _pope_answers(playground))
    file = tmp_path / "a_file"
    file.write_text("x")
    argv = ["score", "--bench", "pope", "--answers", str(answers), "--data-root", str(playground)]
    argv += [a.format(tmp=tmp_path, file=file) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_pope_matches_by_question_id_and_warns_on_order(tmp_path, playground):
    rows = _pope_answers(playground)
    rows[0]["text"] = "No" if rows[0]["text"] == "Yes" else "Yes"  # one wrong answer
    ordered = score_file("pope", _write(tmp_path / "in_order.jsonl", rows), playground)
    shuffled = score_file("pope", _write(tmp_path / "shuffled.jsonl", rows[::-1]), playground)
    assert "warning" not in ordered
    assert shuffled["headline"] == ordered["headline"] and shuffled["splits"] == ordered["splits"]
    assert "not in question-file order" in shuffled["warning"] and "eval_pope.py zips" in shuffled["warning"]
    # splits interleaved but each in question order: the official script gives the same, no warning
    interleaved = score_file("pope", _write(tmp_path / "interleaved.jsonl", rows[0::2] + rows[1::2]), playground)
    assert interleaved["splits"] == ordered["splits"] and "warning" not in interleaved
    # a missing answer does not shift the labels of the following ones
    gapped = score_file("pope", _write(tmp_path / "gapped.jsonl", rows[1:]), playground)
    assert gapped["splits"]["adversarial"]["accuracy"] == 100.0 and gapped["counts"]["missing"] == 1


def test_mme_pairs_by_image_when_shuffled(tmp_path):
    root = tmp_path / "eval"
    gt = root / "MME" / "MME_Benchmark_release_version" / "existence"
    questions = []
    for image in ("0001", "0002"):
        make_image(gt / f"{image}.png")
        (gt / f"{image}.txt").write_text(
            "Is there a dog in this image? Please answer yes or no.\tYes\n"
            "Is there a cat in this image? Please answer yes or no.\tNo\n"
        )
        for q in ("Is there a dog in this image?", "Is there a cat in this image?"):
            questions.append({"question_id": f"existence/{image}.png", "image": f"existence/{image}.png",
                              "text": q + SHORT, "category": "existence"})
    _write(root / "MME" / "llava_mme.jsonl", questions)
    # image 0001 answered right, image 0002 both wrong: acc 50, acc+ 50 (one image of two)
    texts = ["Yes", "No", "No", "Yes"]
    rows = [{"question_id": q["question_id"], "prompt": q["text"], "text": t} for q, t in zip(questions, texts)]
    ordered = score_file("mme", _write(tmp_path / "a.jsonl", rows), root)
    interleaved = [rows[0], rows[2], rows[1], rows[3]]  # consecutive pairs now mix the two images
    shuffled = score_file("mme", _write(tmp_path / "b.jsonl", interleaved), root)
    assert ordered["subtasks"]["existence"]["acc_plus"] == 50.0 and "warning" not in ordered
    assert shuffled["subtasks"] == ordered["subtasks"] and "not in question-file order" in shuffled["warning"]


def test_read_answers_validates(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"question_id": 1, "prompt": "p", "text": "x"}] * 2)
    with pytest.raises(AnswersError, match=r"question \[1, \"p\"\] on lines 1 and 2"):
        read_answers(path)


def test_pope_label_file_with_invalid_line_is_named(tmp_path, capsys):
    root = tmp_path / "eval"
    make_pope(root)
    answers = _write(tmp_path / "answers.jsonl", _pope_answers(root))
    label_file = root / "pope" / "coco" / "coco_pope_random.json"
    label_file.write_text(label_file.read_text() + '{"question_id": 3}\n')
    assert main(["score", "--bench", "pope", "--answers", str(answers), "--data-root", str(root)]) == 2
    assert f"{label_file}:3: expected a JSON object with a 'label' field" in capsys.readouterr().err
