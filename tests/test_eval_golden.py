"""Golden tests: LLaVA-1.5-13B's released answers must score as the paper (shared/realdata/README.md).

The data lives outside the repository at ``../shared/realdata`` (or ``$FINEPRUNER_REALDATA``); these
tests skip with a message where it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finepruner.eval.runner import score_file

REALDATA = Path(
    os.environ.get("FINEPRUNER_REALDATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
)
ROOT = REALDATA / "playground" / "data" / "eval"

pytestmark = pytest.mark.skipif(
    not ROOT.is_dir(), reason=f"real LLaVA-1.5 answers not found at {ROOT} (set FINEPRUNER_REALDATA)"
)


def test_pope_mean_f1() -> None:
    m = score_file("pope", ROOT / "pope/answers/llava-v1.5-13b.jsonl", ROOT)
    assert round(m["mean_f1"], 2) == 85.95
    f1 = {k: round(v["f1"] / 100, 5) for k, v in m["splits"].items()}
    assert f1 == {"adversarial": 0.84459, "popular": 0.86246, "random": 0.87136}
    acc = {k: round(v["accuracy"] / 100, 3) for k, v in m["splits"].items()}
    assert acc == {"adversarial": 0.855, "popular": 0.874, "random": 0.880}


def test_pope_shuffled_answers_match_by_question_id(tmp_path: Path) -> None:
    """Zipping answers with labels by position (as eval_pope.py does) gave 45.5 on these answers shuffled;
    finepruner matches them by question_id and says the order differs."""
    import random

    lines = (ROOT / "pope/answers/llava-v1.5-13b.jsonl").read_text().splitlines()
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    m = score_file("pope", shuffled, ROOT)
    assert round(m["mean_f1"], 2) == 85.95
    assert "not in question-file order" in m["warning"]


def test_mme_perception() -> None:
    m = score_file("mme", ROOT / "MME/answers/llava-v1.5-13b.jsonl", ROOT)
    assert round(m["perception"], 2) == 1531.32
    assert round(m["cognition"], 2) == 295.36
    assert m["perception_complete"] and m["counts"]["missing"] == 0


def test_sqa_img_accuracy() -> None:
    m = score_file("sqa", ROOT / "scienceqa/answers/llava-v1.5-13b.jsonl", ROOT)
    assert round(m["img_accuracy"], 2) == 71.64
    assert round(m["accuracy"], 2) == 74.39


def test_mmbench_circular_accuracy() -> None:
    m = score_file("mmbench", ROOT / "mmbench/answers/mmbench_dev_20230712/llava-v1.5-13b.jsonl", ROOT)
    assert round(m["circular_accuracy"], 2) == 67.69
    assert m["rows_needing_judge"] == 0


def test_vizwiz_submission_matches_release(tmp_path: Path) -> None:
    m = score_file("vizwiz", ROOT / "vizwiz/answers/llava-v1.5-13b.jsonl", ROOT, out_dir=tmp_path)
    assert m["scored"] is False and m["status"] == "not scored here"
    released = ROOT / "vizwiz/answers_upload/llava-v1.5-13b.json"
    assert Path(m["submission"]).read_bytes() == released.read_bytes()


def test_mmvet_without_judge_is_not_scored(tmp_path: Path) -> None:
    m = score_file("mmvet", ROOT / "mm-vet/answers/llava-v1.5-13b.jsonl", ROOT, out_dir=tmp_path)
    assert m["scored"] is False and "judge" in m["reason"]
    results = json.loads(Path(m["submission"]).read_text())
    assert len(results) == 218 and "v1_0" in results
