"""The ``finepruner`` model inside the real lmms-eval (issue 14, item 3): registered through the
``lmms_eval.models`` entry point, run by lmms-eval's own command line on local tasks over the toy suite
(``finepruner.integrations.lmms_tasks``: lmms-eval's stock GQA, MME and POPE definitions on local data), the
shipped toy model pruned by FastV (in the LLM) and DivPrune (before it) at batch size 2; lmms-eval's own
scores and answers equal ``finepruner eval``'s on the same questions, and the pruning statistics are
written beside lmms-eval's results.

lmms-eval is installed by ``make test`` (``make lmms``). Without it these tests skip, except in CI (env
``CI`` set), where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import finepruner
from finepruner.cli import main
from finepruner.integrations.lmms_tasks import write_lmms_tasks
from finepruner.toy.scenes import generate_scene
from finepruner.toy.suite import POPE_ID_BASE, write_suite

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
pytestmark = pytest.mark.skipif(
    not HAVE_LMMS and not os.environ.get("CI"),
    reason="lmms-eval is not installed (make lmms); in CI these tests fail instead",
)

TASKS = {"toy_gqa": "gqa", "toy_mme": "mme", "toy_pope_adv": "pope"}
RUNS = {"fastv": "method=fastv,tokens=16", "divprune": "method=divprune:tokens=8"}


def test_lmms_eval_is_installed():
    assert HAVE_LMMS, "lmms-eval must be installed where CI runs (make lmms)"


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from finepruner.integrations.lmms_eval import FinePruner

    assert get_model("finepruner") is FinePruner
    # also when the plugin module is imported before lmms-eval's registry (no import cycle)
    check = ("import finepruner.integrations.lmms_eval as p; from lmms_eval.models import get_model; "
             "assert get_model('finepruner') is p.FinePruner")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Failed to load model entry-point" not in proc.stdout, proc.stdout + proc.stderr


def test_bad_model_args_fail_before_the_model_loads(monkeypatch):
    from lmms_eval.models import get_model

    loads = []
    monkeypatch.setattr(finepruner, "load_model", lambda *a, **k: loads.append(a))
    cls = get_model("finepruner")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) tokenz .*allowed: .*tokens"):
        cls.create_from_arg_string("pretrained=toy,method=fastv,tokenz=16", {"batch_size": "2", "device": None})
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        cls.create_from_arg_string("pretrained=toy,method=fastv,tokens=16", {"batch_size": "auto"})
    with pytest.raises(ValueError, match="pretrained=PATH is required"):
        cls.create_from_arg_string("method=fastv,tokens=16", {})
    assert loads == []


def test_generate_until_reads_lmms_instances(tmp_path):
    """In process, with lmms-eval's own ``Instance``: the task's visuals, ``until`` and ``max_new_tokens``,
    sampling requests answered greedily (and recorded), text-only documents, and ``stats_path``."""
    from lmms_eval.api.instance import Instance

    from finepruner.integrations.lmms_eval import FinePruner

    image = generate_scene(random.Random(0)).render()
    docs = {"t": {"test": [{"q": "How many circles are there?"}, {"q": "Is there a red square in the image?"}]},
            "u": {"test": [{"q": "hello"}]}}

    def visuals(doc):
        return [] if doc["q"] == "hello" else [image]

    def instance(task, doc_id, gen_kwargs):
        text = docs[task]["test"][doc_id]["q"] + "\nAnswer the question using a single word or phrase."
        return Instance(request_type="generate_until", arguments=(text, gen_kwargs, visuals, doc_id, task, "test"),
                        idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})

    model = FinePruner.create_from_arg_string(f"pretrained=toy,method=fastv,tokens=16,stats_path={tmp_path}/s.json",
                                              {"batch_size": 2})
    model.task_dict = docs
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    sampled = {"max_new_tokens": 4, "temperature": 0.7, "until": "e"}  # a stop string that cuts "yes"/"blue"
    answers = model.generate_until([instance("t", 0, greedy), instance("t", 1, sampled), instance("t", 1, greedy),
                                    instance("u", 0, greedy)])
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert answers[1] == answers[2].split("e")[0].strip() and answers[2] in ("yes", "no")
    assert model.ignored_gen_kwargs == {"t": {"temperature": 0.7}}
    record = json.loads((tmp_path / "s.json").read_text())
    assert [(r["task"], r["doc_id"], r["image"]) for r in record["samples"]] == [("t", 0, True), ("t", 1, True),
                                                                               ("u", 0, False)]
    assert record["tasks"]["t"]["mean_kept"] == [16] and "mean_kept" not in record["tasks"]["u"]
    assert record["ignored_gen_kwargs"] == {"t": {"temperature": 0.7}} and record["world_size"] == 1
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        model.loglikelihood([])
    model.runtime.close()


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    """One lmms-eval process (``--config`` with two runs), the suite and the tasks it ran on."""
    root = tmp_path_factory.mktemp("lmms_cli")
    data = root / "data"
    write_suite(data, n=2, seed=5, benchmarks=("gqa", "mme", "pope"))
    tasks = write_lmms_tasks(data, root / "tasks", [t.removeprefix("toy_") for t in TASKS])
    assert sorted(tasks) == sorted(f"toy_{t}" for t in ("gqa", "mme", "pope_adv"))
    config = [{"model": "finepruner", "model_args": f"pretrained=toy,{args}", "tasks": ",".join(TASKS),
               "batch_size": 2, "include_path": str(root / "tasks"), "log_samples": True}
              for args in RUNS.values()]
    (root / "runs.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--config", str(root / "runs.yaml"),
                           "--output_path", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, data, out / "toy"


def _by_method(files: list[Path], read) -> dict[str, object]:
    found = {}
    for path in files:
        record = json.loads(path.read_text())
        found[read(record)] = (path, record)
    return found


@pytest.mark.parametrize("method", list(RUNS))
def test_lmms_eval_scores_equal_finepruner_eval(lmms_run, method):
    root, data, folder = lmms_run
    results = _by_method(sorted(folder.glob("*_results.json")),
                         lambda r: r["config"]["model_args"].split("method=")[1].split(",")[0].split(":")[0])
    assert sorted(results) == sorted(RUNS)
    path, lmms = results[method]
    run = root / f"fp_{method}"
    spec = RUNS[method].replace("method=", "").replace(",tokens=", ":tokens=")
    assert main(["eval", "--model", "toy", "--data-root", str(data), "--bench", "gqa", "--bench", "mme",
                 "--bench", "pope", "--method", spec, "--batch-size", "2", "--out", str(run), "--no-progress"]) == 0
    ours = json.loads((run / "metrics.json").read_text())
    scores = lmms["results"]
    assert scores["toy_gqa"]["exact_match,none"] == pytest.approx(ours["gqa"]["accuracy"] / 100)
    assert scores["toy_mme"]["mme_perception_score,none"] == pytest.approx(ours["mme"]["perception"])
    adversarial = ours["pope"]["splits"]["adversarial"]
    for key in ("accuracy", "precision", "recall", "f1_score"):
        assert scores["toy_pope_adv"][f"pope_{key},none"] == pytest.approx(adversarial[key.replace("_score", "")] / 100)
    # answer by answer: lmms-eval's logged responses are finepruner eval's answers, in question order
    stamp = path.name[: -len("_results.json")]
    for task, bench in TASKS.items():
        logged = [json.loads(x) for x in (folder / f"{stamp}_samples_{task}.jsonl").read_text().splitlines()]
        answers = [json.loads(x) for x in (run / bench / "answers.jsonl").read_text().splitlines()]
        if task == "toy_pope_adv":
            answers = [a for a in answers if a["question_id"] < POPE_ID_BASE["random"]]  # the adversarial split
        responses = [s["filtered_resps"] for s in sorted(logged, key=lambda s: s["doc_id"])]
        responses = [r[0] if isinstance(r, list) else r for r in responses]
        assert responses == [a["text"] for a in answers]
    # and the pruning statistics hold the per-sample FLOPs finepruner eval records for the same questions
    stats = _by_method(sorted(folder.glob("*_finepruner_stats.json")), lambda r: r["config"]["method"])
    record = stats[method][1]
    for task, bench in (("toy_gqa", "gqa"), ("toy_mme", "mme")):
        assert record["tasks"][task]["mean_prefill_tflops"] == pytest.approx(
            ours[bench]["efficiency"]["mean_prefill_tflops"], rel=1e-12)


@pytest.mark.parametrize("method", list(RUNS))
def test_pruning_statistics_are_written_beside_the_results(lmms_run, method):
    root, data, folder = lmms_run
    stats = _by_method(sorted(folder.glob("*_finepruner_stats.json")), lambda r: r["config"]["method"])
    assert sorted(stats) == sorted(RUNS)
    _, record = stats[method]
    tokens = 16 if method == "fastv" else 8
    assert record["family"] == "llava" and record["config"]["batch_size"] == 2
    assert sorted(record["tasks"]) == sorted(TASKS)
    for task, summary in record["tasks"].items():
        rows = [s for s in record["samples"] if s["task"] == task]
        assert summary["questions"] == summary["samples"] == len(rows) > 0
        assert summary["mean_kept"] == [tokens] and all(r["kept"] == [tokens] for r in rows)
        assert [r["doc_id"] for r in rows] == list(range(len(rows)))
        assert 0 < summary["mean_prefill_tflops"] < summary["mean_prefill_tflops_with_vision"]
