"""``finepruner calibrate`` writes a heads.json that the ``finepruner`` method reads back and uses."""

from __future__ import annotations

import json

import pytest
import torch

import finepruner
from finepruner.cli import main
from finepruner.heads import load_head_set
from finepruner.models.tiny import build_tiny_llava
from tests.conftest import noise_images
from tests.eval_fixtures import make_pope


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, processor = build_tiny_llava(seed=0, qk_scale=8.0)
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_calibrate_cli_writes_a_usable_head_set(checkpoint, tmp_path):
    root = tmp_path / "eval"
    make_pope(root)
    out = tmp_path / "heads.json"
    code = main(["calibrate", "--model", str(checkpoint), "--bench", "pope", "--data-root", str(root),
                 "--n", "4", "--layer", "2", "--strategy", "sum", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["layer"] == 1 and data["num_heads"] == 4 and data["n_samples"] == 4
    head_set = load_head_set(out)
    model, _ = finepruner.load_model(checkpoint)
    with finepruner.apply(model, "finepruner", tokens=8, heads=2, heads_from=str(out)) as handle:
        assert handle.method.guidance.strategy == "calibrated"
    assert torch.equal(head_set.top(2), torch.tensor(sorted(data["ranked_heads"][:2])))
    # a set calibrated for K=2 does not fit K=3
    with pytest.raises(ValueError, match="layer"):
        finepruner.apply(model, "finepruner", tokens=8, heads=2, K=3, heads_from=str(out))


def test_calibrate_reports_missing_data(checkpoint, tmp_path, capsys):
    code = main(["calibrate", "--model", str(checkpoint), "--bench", "pope", "--data-root", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "h.json")])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_calibrate_weights_feed_the_hawk_weighting(checkpoint, tmp_path):
    root = tmp_path / "eval"
    make_pope(root)
    out = tmp_path / "weights.json"
    code = main(["calibrate", "--model", str(checkpoint), "--bench", "pope", "--data-root", str(root),
                 "--n", "4", "--layer", "2", "--weights", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    total = sum(data["scores"])
    assert data["weights"] == pytest.approx([s / total for s in data["scores"]])  # L1-normalised mass
    assert data["data"] == "pope: the first 4 questions with an image"
    model, processor = finepruner.load_model(checkpoint)
    inputs = processor(images=noise_images(1), text=["USER: <image> is there a cat ? ASSISTANT:"],
                       return_tensors="pt")
    with finepruner.apply(model, "finepruner", tokens=8, weighting="hawk", heads_from=str(out)) as handle:
        with torch.no_grad():
            model(**inputs)
    attn = handle.attention[0][0]  # [heads, visual] last-query rows the scores came from
    want = sum(w * row / row.norm() for w, row in zip(data["weights"], attn, strict=True))
    assert torch.equal(handle.kept[0][0], want.topk(8).indices.sort().values)


def test_calibrate_weights_need_a_largest_is_best_strategy(checkpoint, tmp_path, capsys, no_model_load):
    code = main(["calibrate", "--model", str(checkpoint), "--bench", "pope", "--data-root", str(tmp_path),
                 "--strategy", "entropy", "--weights", "--out", str(tmp_path / "h.json")])
    assert code == 2
    assert "--weights needs a --strategy whose largest scores are best; 'entropy'" in capsys.readouterr().err
    assert no_model_load == []
