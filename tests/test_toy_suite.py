"""The toy suite: deterministic files in LLaVA's layout that load and score through the real harness."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from finepruner.eval import benchmarks
from finepruner.toy.questions import rule_answer
from finepruner.toy.suite import BENCHMARKS, benchmark_chance, chance_levels, load_suite_meta, write_suite

N = 6


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_suite")
    write_suite(root, n=N, seed=7)
    return root


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_suite_is_deterministic(suite, tmp_path):
    write_suite(tmp_path, n=N, seed=7)
    assert _tree_digest(tmp_path) == _tree_digest(suite)


def test_layout_matches_llava_playground(suite):
    for rel in ("pope/llava_pope_test.jsonl", "pope/coco/coco_pope_adversarial.json",
                "pope/coco/coco_pope_popular.json", "pope/coco/coco_pope_random.json",
                "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/testdev_balanced_questions.json",
                "MME/llava_mme.jsonl", "mmbench/mmbench_dev_20230712.tsv", "toy_suite.json"):
        assert (suite / rel).is_file(), rel
    pope = [json.loads(x) for x in (suite / "pope/llava_pope_test.jsonl").read_text().splitlines()]
    assert [q["category"] for q in pope] == sorted([q["category"] for q in pope],
                                                   key=("adversarial", "random", "popular").index)
    assert pope[0]["question_id"] == 1
    assert all(q["text"].endswith("\nAnswer the question using a single word or phrase.") for q in pope)
    mme = [json.loads(x) for x in (suite / "MME/llava_mme.jsonl").read_text().splitlines()]
    assert all(a["question_id"] == b["question_id"] for a, b in zip(mme[::2], mme[1::2], strict=True))
    assert {q["category"] for q in mme} == {"existence", "count", "position", "color"}


def test_recorded_answers_agree_with_rule_check(suite):
    meta = load_suite_meta(suite)
    for bench, records in meta["questions"].items():
        assert records, bench
        for rec in records.values():
            desc = meta["scenes"][rec["scene"]]
            assert rule_answer(desc, rec["question"], rec["options"] or None) == rec["answer"], rec


@pytest.mark.parametrize("name", BENCHMARKS)
def test_suite_loads_and_scores_with_real_harness(suite, name):
    meta = load_suite_meta(suite)
    bench = benchmarks.get(name)
    bench.check(suite)
    samples = bench.load(suite)
    assert len(samples) == meta["benchmarks"][name]["questions"]
    samples[0].open_image()
    from finepruner.toy.evaluate import _record, headline_percent

    def records(answer_of):
        out = []
        for s in samples:
            a = {"question_id": s.question_id, "prompt": s.prompt, "text": "", **s.extra}
            a["text"] = answer_of(_record(meta, name, a))
            out.append(a)
        return out

    perfect = bench.score(records(lambda r: r["answer"]), suite)
    assert perfect["scored"] and headline_percent(name, perfect) == pytest.approx(100.0)
    wrong = bench.score(records(lambda r: "no" if r["answer"] == "yes" else "yes"), suite)
    if name == "pope":
        yes = bench.score(records(lambda r: "yes"), suite)
        assert yes["headline"]["value"] == pytest.approx(benchmark_chance()["pope"]["mean_f1"])
    value = headline_percent(name, wrong)
    assert value is None or value < 100.0


def test_chance_levels():
    c = chance_levels()
    assert c["color"]["answers"] == 6 and c["shape"]["answers"] == 3
    assert c["exist"]["majority"] == pytest.approx(0.5, abs=0.03)
    assert all(0 < v["majority"] < 1 for v in c.values())
    assert set(benchmark_chance()) == set(BENCHMARKS)
