"""Local lmms-eval tasks over benchmarks kept in LLaVA's ``playground/data/eval`` layout (the toy suite included).

lmms-eval fetches every task's data from the Hugging Face hub (spec ``eval_protocol.md`` §15.1), which is
impossible offline. :func:`write_lmms_tasks` converts the question and annotation files that
``finepruner eval`` reads into lmms-eval's own document schema (one JSONL per task) and writes, for each, a
task YAML that ``include``\\ s lmms-eval's stock task definition (prompts, generation kwargs,
``process_results``, metrics and aggregations unchanged) and replaces only the dataset by the local JSONL.
lmms-eval therefore scores the questions with its own code::

    python -m finepruner.integrations.lmms_tasks --data-root DATA --out TASKS
    lmms-eval --model finepruner --model_args pretrained=toy,method=fastv,tokens=16 \\
        --tasks toy_gqa,toy_mme --include_path TASKS --batch_size 2 --output_path RUN

Tasks (``TASKS``; the written task is ``prefix + name``): ``gqa`` (lmms-eval's ``gqa``: exact match,
case and punctuation ignored), ``mme`` (``mme``: perception/cognition score), ``pope_adv``, ``pope_pop``,
``pope_random`` (one POPE split each: accuracy, precision, recall, F1, yes ratio). Documents keep the
question-file order, so batches are the ones ``finepruner eval`` forms. Image paths are written absolute:
the folder stays valid while the data root does not move. Writing needs no lmms-eval (the stock YAMLs are
found when the tasks are loaded); :func:`with_images` runs inside lmms-eval.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finepruner.eval.benchmarks.base import SHORT_ANSWER

YES_NO = " Please answer yes or no."
DEFAULT_PREFIX = "toy_"
#: This module's import name (the written YAMLs name its with_images; __name__ is __main__ under -m).
_MODULE = "finepruner.integrations.lmms_tasks"


@dataclass(frozen=True)
class LocalTask:
    """One convertible task: lmms-eval's stock YAML (relative to ``lmms_eval/tasks``), the split that YAML
    evaluates, our benchmark whose files are read, and the function that builds the documents."""

    stock_yaml: str
    split: str
    benchmark: str
    docs: Callable[[Path], list[dict[str, Any]]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from err
    return rows


def _bench(name: str) -> Any:
    from finepruner.eval import benchmarks

    return benchmarks.get(name)


def _question(text: str) -> str:
    """The question of a LLaVA prompt text (its short-answer suffix removed)."""
    return text.replace(SHORT_ANSWER, "").strip()


def gqa_docs(data_root: Path) -> list[dict[str, Any]]:
    """lmms-eval GQA documents (``question``, ``answer``, ``image``) of LLaVA's GQA question file, answers
    from GQA's ``testdev_balanced_questions.json``."""
    bench = _bench("gqa")
    annotations_file = bench.path(data_root, "annotations")
    annotations = json.loads(annotations_file.read_text(encoding="utf-8"))
    docs = []
    for sample in bench.load(data_root):
        entry = annotations.get(str(sample.question_id))
        if entry is None:
            raise ValueError(f"{annotations_file}: no annotation for GQA question {sample.question_id!r}")
        docs.append({"question_id": str(sample.question_id), "question": entry["question"],
                     "answer": entry["answer"], "image": str(Path(sample.image).resolve())})
    return docs


def _mme_answers(txt: Path) -> dict[str, str]:
    answers = {}
    for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            parts = line.strip().split("\t")
            if len(parts) != 2:
                raise ValueError(f"{txt}:{lineno}: expected 'question<TAB>answer'")
            answers[parts[0]] = parts[1]
    return answers


def mme_docs(data_root: Path) -> list[dict[str, Any]]:
    """lmms-eval MME documents (``question_id`` = the image, ``question`` with MME's " Please answer yes or
    no.", ``answer`` Yes/No, ``category``, ``image``) of LLaVA's ``llava_mme.jsonl``, answers from the
    ``.txt`` files of ``MME_Benchmark_release_version`` (beside the image or in ``questions_answers_YN/``)."""
    bench = _bench("mme")
    gt_root = bench.path(data_root, "ground_truth")
    cache: dict[Path, dict[str, str]] = {}
    docs = []
    for sample in bench.load(data_root):
        qid = str(sample.question_id)
        category, stem = qid.split("/")[0], Path(qid).stem
        candidates = [gt_root / category / f"{stem}.txt", gt_root / category / "questions_answers_YN" / f"{stem}.txt"]
        txt = next((p for p in candidates if p.is_file()), None)
        if txt is None:
            raise ValueError(f"mme: no ground-truth file for {qid} (looked for {', '.join(map(str, candidates))})")
        answers = cache.setdefault(txt, _mme_answers(txt))
        question = _question(sample.text) + YES_NO
        if question not in answers:
            raise ValueError(f"{txt}: no line for the question {question!r} of {qid}")
        docs.append({"question_id": qid, "question": question, "answer": answers[question],
                     "category": category, "image": str(Path(sample.image).resolve())})
    return docs


def pope_docs(split: str) -> Callable[[Path], list[dict[str, Any]]]:
    """The builder of lmms-eval POPE documents of one split (``question_id``, ``question``, ``answer``
    yes/no, ``category``, ``image``): the k-th label line of ``coco_pope_<split>.json`` belongs to the
    split's k-th question of LLaVA's ``llava_pope_test.jsonl``, as LLaVA's ``eval_pope.py`` reads them."""

    def build(data_root: Path) -> list[dict[str, Any]]:
        bench = _bench("pope")
        labels_file = bench.path(data_root, "annotations") / f"coco_pope_{split}.json"
        if not labels_file.is_file():
            raise ValueError(f"pope: label file not found: {labels_file}")
        labels = _jsonl(labels_file)
        images = bench.path(data_root, "images")
        rows = [r for r in _jsonl(bench.path(data_root, "questions")) if r.get("category") == split]
        if len(rows) != len(labels):
            raise ValueError(f"pope {split}: {len(rows)} questions in the question file but {len(labels)} labels "
                             f"in {labels_file}")
        return [{"question_id": str(row["question_id"]), "question": _question(row["text"]),
                 "answer": label["label"], "category": split, "image": str((images / row["image"]).resolve())}
                for row, label in zip(rows, labels, strict=True)]

    return build


TASKS: dict[str, LocalTask] = {
    "gqa": LocalTask("gqa/gqa.yaml", "testdev", "gqa", gqa_docs),
    "mme": LocalTask("mme/mme.yaml", "test", "mme", mme_docs),
    "pope_adv": LocalTask("pope/pope_adv.yaml", "adversarial", "pope", pope_docs("adversarial")),
    "pope_pop": LocalTask("pope/pope_pop.yaml", "popular", "pope", pope_docs("popular")),
    "pope_random": LocalTask("pope/pope_random.yaml", "random", "pope", pope_docs("random")),
}


def stock_tasks_dir() -> Path:
    """The ``tasks`` folder of the installed lmms-eval; raises ``ModuleNotFoundError`` naming the extra."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "lmms-eval is not installed: pip install finepruner[lmms] (CPU machines: see docs/benchmarks.md, "
            "'Running any lmms-eval task with pruning')", name="lmms_eval")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def with_images(dataset: Any) -> Any:
    """``process_docs`` of the written tasks: the ``image`` column (file paths) as an image feature, so the
    stock ``doc_to_visual`` functions receive PIL images."""
    import datasets

    return dataset.cast_column("image", datasets.Image())


def _yaml(stock: Path, task: str, split: str, data_file: str) -> str:
    return (
        "# Written by finepruner.integrations.lmms_tasks: lmms-eval's stock task on local data.\n"
        f"include: {json.dumps(str(stock))}\n"
        f"task: {json.dumps(task)}\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    {split}: {json.dumps(data_file)}\n"
        f"test_split: {split}\n"
        f"process_docs: !function {_MODULE}.with_images\n"
    )


def write_lmms_tasks(
    data_root: str | Path,
    out: str | Path,
    tasks: Sequence[str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    lmms_tasks_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write ``prefix + name`` task YAMLs and their JSONL documents into ``out`` (pass it to lmms-eval's
    ``--include_path``); returns ``{task name: yaml path}``.

    ``tasks``: names of :data:`TASKS` (default: every one whose benchmark folder exists under
    ``data_root``). ``lmms_tasks_dir``: lmms-eval's ``tasks`` folder (default: the installed package's).
    """
    root = Path(data_root)
    if not root.is_dir():
        raise ValueError(f"data_root {root} is not a directory (expected LLaVA's playground/data/eval layout)")
    if tasks is None:
        tasks = [name for name, t in TASKS.items() if _bench(t.benchmark).folder(root).is_dir()]
        if not tasks:
            names = sorted({t.benchmark for t in TASKS.values()})
            raise ValueError(f"data_root {root} holds none of the benchmarks {', '.join(names)}")
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
    stock_dir = Path(lmms_tasks_dir) if lmms_tasks_dir is not None else stock_tasks_dir()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in tasks:
        task = TASKS[name]
        stock = stock_dir / task.stock_yaml
        if not stock.is_file():
            raise FileNotFoundError(f"lmms-eval's task file {stock} not found (lmms-eval 0.7.x expected)")
        docs = task.docs(root)
        task_name = prefix + name
        data_file = f"{task_name}.jsonl"
        with (out_dir / data_file).open("w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        yaml_path = out_dir / f"{task_name}.yaml"
        yaml_path.write_text(_yaml(stock.resolve(), task_name, task.split, data_file), encoding="utf-8")
        written[task_name] = yaml_path
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finepruner.integrations.lmms_tasks",
        description="Write lmms-eval tasks (YAML + JSONL) over benchmarks in LLaVA's playground/data/eval layout.",
    )
    parser.add_argument("--data-root", required=True, help="LLaVA's playground/data/eval (or a toy suite)")
    parser.add_argument("--out", required=True, help="folder to write; pass it to lmms-eval --include_path")
    parser.add_argument("--task", action="append", choices=sorted(TASKS),
                        help="task to write (repeatable; default: every benchmark found under --data-root)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"task-name prefix (default {DEFAULT_PREFIX!r})")
    args = parser.parse_args(argv)
    try:
        written = write_lmms_tasks(args.data_root, args.out, args.task, args.prefix)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
