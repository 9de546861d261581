"""The harness-neutral pruned model behind the lmms-eval plugin (``finepruner.integrations.runtime``) and the
local lmms-eval task writer (``finepruner.integrations.lmms_tasks``); none of this needs lmms-eval.

Issue 14, item 3: model arguments are parsed with the method-spec parser and validated before any weight is
read; answers and per-sample statistics equal ``finepruner eval``'s on the same questions at batch size 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import finepruner
from finepruner.cli import main
from finepruner.integrations import lmms_tasks
from finepruner.integrations.runtime import (
    ModelArgs,
    PrunedModel,
    Request,
    greedy_conflicts,
    truncate,
    validate,
)
from finepruner.toy.suite import load_suite_meta, write_suite

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_lmms")
    write_suite(root, n=2, seed=11, benchmarks=("gqa", "mme", "pope"))
    return root


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory) -> Path:
    """Stand-ins for lmms-eval's stock task YAMLs (only their paths matter to the writer)."""
    root = tmp_path_factory.mktemp("stock")
    for name in ("gqa/gqa.yaml", "mme/mme.yaml", "pope/pope_adv.yaml", "pope/pope_pop.yaml",
                 "pope/pope_random.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("task: stock\n")
    return root


# -- model arguments ------------------------------------------------------------------------------------
def test_model_args_split_settings_and_method_parameters():
    args = ModelArgs.from_kwargs({"pretrained": "toy", "method": "pdrop", "layers": "[2,4]", "ratio": 0.5,
                                  "batch_size": "4", "device": "cpu", "positions": "renumber",
                                  "processor.min_pixels": "3136", "max_batch_size": None})
    assert (args.pretrained, args.method, args.batch_size, args.device) == ("toy", "pdrop", 4, "cpu")
    assert args.method_params == {"layers": [2, 4], "ratio": 0.5, "positions": "renumber"}
    assert args.processor_kwargs == {"min_pixels": 3136}
    assert args.describe_method() == "pdrop:layers=[2, 4],ratio=0.5,positions=renumber"


def test_model_args_method_spec_form_and_defaults():
    args = ModelArgs.from_kwargs({"pretrained": "toy", "method": "fastv:tokens=16,K=3"})
    assert (args.method, args.method_params) == ("fastv", {"tokens": 16, "K": 3})
    assert ModelArgs.from_kwargs({"pretrained": "toy"}).method == "vanilla"
    assert ModelArgs.from_kwargs({"pretrained": "toy", "method": "none"}).method is None


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "fastv"}, "pretrained=PATH is required"),
    ({"pretrained": "toy", "batch_size": "auto"}, "batch_size must be an integer >= 1"),
    ({"pretrained": "toy", "batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"pretrained": "toy", "method": "fastv:tokens=16", "tokens": 8}, "tokens given twice"),
])
def test_model_args_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_kwargs(kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "fastvv"}, r"method='fastvv': unknown method .*available: .*fastv"),
    ({"method": "fastv", "tokens": 16, "heads": 4}, r"unknown parameter\(s\) heads .* allowed: .*tokens.*"
                                                     r"model arguments: pretrained, method, batch_size"),
    ({"method": "fastv", "tokens": 999}, r"fastv:tokens=999 on toy \(llava, 6 layers, 8 heads, up to 144"),
    ({"method": "none", "tokens": 16}, r"tokens: not a model argument, and method=none takes no parameters"),
    ({"method": "fastv", "tokens": 16, "image_aspect_ratio": "square"}, "image_aspect_ratio='square'"),
    ({"method": "fastv", "tokens": 16, "dtype": "int8"}, "dtype='int8'"),
])
def test_bad_arguments_fail_before_any_weight_is_read(monkeypatch, kwargs, message):
    loads = []
    monkeypatch.setattr(finepruner, "load_model", lambda *a, **k: loads.append(a))
    args = ModelArgs.from_kwargs({"pretrained": "toy", **kwargs})
    with pytest.raises(ValueError, match=message):
        PrunedModel(args)
    assert loads == []


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate(ModelArgs(pretrained=str(tmp_path / "nope")))


def test_device_defaults_to_the_local_rank_gpu_else_cpu(monkeypatch):
    import torch

    from finepruner.integrations.runtime import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (resolve_device(None), resolve_device("cuda"), resolve_device("cuda:1")) == ("cuda:3", "cuda:3", "cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (resolve_device(None), resolve_device("cpu")) == ("cpu", "cpu")


def test_truncate_and_greedy_conflicts():
    assert truncate("yes\n\nUSER: more", ["\n\n"]) == "yes"
    assert truncate("red. blue", [".", "blue", ""]) == "red"
    assert truncate("two", []) == "two"
    assert greedy_conflicts({"temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
                             "max_new_tokens": 16, "until": ["\n\n"]}) == {}
    assert greedy_conflicts({"temperature": 0.2, "num_beams": 3}) == {"temperature": 0.2, "num_beams": 3}


# -- local lmms-eval tasks ------------------------------------------------------------------------------
def test_written_tasks_hold_the_suite_ground_truth(data_root, stock_dir, tmp_path):
    written = lmms_tasks.write_lmms_tasks(data_root, tmp_path, lmms_tasks_dir=stock_dir)
    assert sorted(written) == ["toy_gqa", "toy_mme", "toy_pope_adv", "toy_pope_pop", "toy_pope_random"]
    yaml_text = written["toy_mme"].read_text()
    assert f"include: \"{(stock_dir / 'mme/mme.yaml').resolve()}\"" in yaml_text
    assert "process_docs: !function finepruner.integrations.lmms_tasks.with_images" in yaml_text
    assert "    test: \"toy_mme.jsonl\"" in yaml_text and "test_split: test" in yaml_text
    meta = load_suite_meta(data_root)["questions"]

    def docs(task):
        return [json.loads(line) for line in (tmp_path / f"{task}.jsonl").read_text().splitlines()]

    gqa = docs("toy_gqa")
    assert [d["answer"] for d in gqa] == [meta["gqa"][d["question_id"]]["answer"] for d in gqa]
    assert all(Image.open(d["image"]).size == (168, 168) for d in gqa)
    mme = docs("toy_mme")
    assert len(mme) == 16 and {d["category"] for d in mme} == {"existence", "count", "position", "color"}
    assert all(d["question"].endswith(" Please answer yes or no.") and d["answer"] in ("Yes", "No") for d in mme)
    assert [d["answer"] for d in mme[:2]] == ["Yes", "No"]  # each image: a Yes then a No question
    for split in ("adv", "pop", "random"):
        pope = docs(f"toy_pope_{split}")
        assert [d["answer"] for d in pope] == [meta["pope"][d["question_id"]]["answer"] for d in pope]
        assert {meta["pope"][d["question_id"]]["split"][:3] for d in pope} == {split[:3]}


def test_task_writer_errors(data_root, stock_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task.*mmbench.*available: gqa, mme"):
        lmms_tasks.write_lmms_tasks(data_root, tmp_path, ["mmbench"], lmms_tasks_dir=stock_dir)
    with pytest.raises(ValueError, match="is not a directory"):
        lmms_tasks.write_lmms_tasks(tmp_path / "missing", tmp_path, lmms_tasks_dir=stock_dir)
    with pytest.raises(FileNotFoundError, match="lmms-eval's task file"):
        lmms_tasks.write_lmms_tasks(data_root, tmp_path, ["gqa"], lmms_tasks_dir=tmp_path)


# -- answers and statistics equal finepruner eval's -----------------------------------------------------
@pytest.mark.parametrize("method, params", [("fastv", {"tokens": 16}), ("divprune", {"tokens": 8})])
def test_answers_and_statistics_equal_finepruner_eval(data_root, tmp_path, method, params):
    run = tmp_path / "run"
    spec = f"{method}:" + ",".join(f"{k}={v}" for k, v in params.items())
    assert main(["eval", "--model", "toy", "--data-root", str(data_root), "--bench", "gqa", "--bench", "mme",
                 "--method", spec, "--batch-size", "2", "--out", str(run), "--no-progress"]) == 0
    reference = {b: [json.loads(x) for x in (run / b / "answers.jsonl").read_text().splitlines()]
                 for b in ("gqa", "mme")}
    pruned = PrunedModel(ModelArgs(pretrained="toy", method=method, method_params=params, batch_size=2))
    try:
        requests = [Request(text=d["question"] + SUFFIX, images=[Image.open(d["image"])], max_new_tokens=128,
                            until=["\n\n"], group="gqa", key={"task": "gqa", "doc_id": i})
                    for i, d in enumerate(lmms_tasks.gqa_docs(data_root))]
        requests += [Request(text=d["question"].replace(" Please answer yes or no.", "") + SUFFIX,
                             images=[Image.open(d["image"])], max_new_tokens=128, group="mme",
                             key={"task": "mme", "doc_id": i})
                     for i, d in enumerate(lmms_tasks.mme_docs(data_root))]
        answers = pruned.answer(requests)
    finally:
        pruned.close()
    expected = [a["text"] for b in ("gqa", "mme") for a in reference[b]]
    assert answers == expected

    def figures(prune):  # everything but the wall time of the selections
        return {k: v for k, v in prune.items() if "seconds" not in k}

    assert [figures(s["prune"]) for s in pruned.samples] == [figures(a["metadata"]["prune"])
                                                             for b in ("gqa", "mme") for a in reference[b]]
    assert all(s["kept"] == [params["tokens"]] for s in pruned.samples)
    record = pruned.stats()
    metrics = json.loads((run / "metrics.json").read_text())
    for bench in ("gqa", "mme"):
        ours, theirs = record["tasks"][bench], metrics[bench]["efficiency"]
        assert ours["questions"] == len(reference[bench]) and ours["mean_kept"] == [params["tokens"]]
        assert figures({k: v for k, v in ours.items() if k in theirs}) == figures(theirs)
    assert record["method"] == f"{method}:tokens={params['tokens']}" and record["family"] == "llava"
    path = PrunedModel.write_stats(record, tmp_path / "out" / "stats.json")
    assert json.loads(path.read_text())["samples"][0]["task"] == "gqa"


def test_batches_follow_groups_and_budgets():
    pruned = PrunedModel.__new__(PrunedModel)
    reqs = [Request("a", group="x"), Request("b", group="x"), Request("c", group="x"), Request("d", group="y"),
            Request("e", group="y", max_new_tokens=16), Request("f", group="y", max_new_tokens=16)]
    assert list(pruned.batches(reqs, 2)) == [[0, 1], [2], [3], [4, 5]]
    assert list(pruned.batches(reqs, 8)) == [[0, 1, 2], [3], [4, 5]]


def test_text_only_and_mixed_batches_and_multi_image_refusal(data_root):
    model, processor = finepruner.load_model("toy")
    pruned = PrunedModel(ModelArgs(pretrained="toy", method="fastv", method_params={"tokens": 16}, batch_size=2),
                         model=model, processor=processor)
    image = Image.open(lmms_tasks.gqa_docs(data_root)[0]["image"])
    try:
        mixed = pruned.answer([Request("How many circles are there?" + SUFFIX, [image], 8, key={"doc_id": 0}),
                               Request("What shape is the red object?" + SUFFIX, [], 8, key={"doc_id": 1})])
        calls = []
        lazy = Request("How many circles are there?" + SUFFIX, lambda: calls.append(1) or [image], 8,
                       key={"doc_id": 2})
        assert calls == []  # images are decoded when their batch runs
        alone = pruned.answer([lazy])
        assert calls == [1] and mixed[0] == alone[0] and isinstance(mixed[1], str)
        assert [s["image"] for s in pruned.samples] == [True, False, True]
        assert "prune" not in pruned.samples[1] and pruned.samples[0]["kept"] == [16]
        with pytest.raises(ValueError, match="has 2 images; .* at most one image"):
            pruned.answer([Request("q", [image, image], 8, key={"doc_id": 3})])
        with pytest.raises(ValueError, match="video and audio inputs are not supported"):
            pruned.answer([Request("q", ["clip.mp4"], 8)])
    finally:
        pruned.close()
    assert pruned.handle is None


@pytest.mark.parametrize("family, tokens", [("llava_next", 8), ("qwen2_5_vl", 3)])
def test_other_family_checkpoints_answer_as_finepruner_eval_does(tmp_path, family, tokens):
    """No family branches: a saved tiny LLaVA-NeXT (chat-template prompt, anyres images, per-image budget) or
    Qwen2.5-VL (its own processor and 3-D positions) through ``pretrained=DIR`` gives ``finepruner eval``'s
    answers and figures on the same POPE questions."""
    from eval_fixtures import make_pope

    from finepruner.models import tiny_families

    model, processor = getattr(tiny_families, f"build_tiny_{family}")(seed=0)
    checkpoint = tmp_path / "next"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    root = tmp_path / "eval"
    make_pope(root)
    run = tmp_path / "run"
    assert main(["eval", "--model", str(checkpoint), "--data-root", str(root), "--bench", "pope", "--method",
                 f"fastv:tokens={tokens}", "--batch-size", "2", "--max-new-tokens", "3", "--out", str(run),
                 "--no-progress"]) == 0
    reference = [json.loads(x) for x in (run / "pope" / "answers.jsonl").read_text().splitlines()]
    pruned = PrunedModel(ModelArgs.from_kwargs({"pretrained": str(checkpoint), "method": "fastv", "tokens": tokens,
                                                "batch_size": 2}))
    try:
        assert pruned.family.family_name() == family and pruned.generator.image_aspect_ratio == "original"
        requests = [Request(d["question"] + SUFFIX, [Image.open(d["image"])], 3, group=split,
                            key={"task": split, "doc_id": i})
                    for split in ("adversarial", "random", "popular")
                    for i, d in enumerate(lmms_tasks.pope_docs(split)(root))]
        answers = pruned.answer(requests)
    finally:
        pruned.close()
    assert answers == [a["text"] for a in reference]
    assert [{k: v for k, v in s["prune"].items() if "seconds" not in k} for s in pruned.samples] == [
        {k: v for k, v in a["metadata"]["prune"].items() if "seconds" not in k} for a in reference]
    assert all(s["kept"] == [tokens] for s in pruned.samples)  # one image per sample
