"""``finepruner toy-train``: a few steps run end to end, are reproducible by seed, and save a checkpoint
that ``load_model`` reads; the grounding objective rewards image tokens that point at their words."""

from __future__ import annotations

import json

import pytest
import torch

import finepruner
from finepruner.toy.train import AuxHeads, TrainConfig, grounding_loss, train


def _run(out, seed=0):
    return train(TrainConfig(out=str(out), steps=2, seed=seed, batch_size=2, eval_scenes=1, warmup=1,
                             log_every=1, threads=1), log=lambda _msg: None)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("run-a"), tmp_path_factory.mktemp("run-b")
    _run(a), _run(b)
    return a, b


def test_training_saves_a_loadable_checkpoint(two_runs):
    out, _ = two_runs
    model, processor = finepruner.load_model(str(out))
    assert model.config.text_config.rope_parameters["rope_theta"] == 1e6
    tag = json.loads((out / "toy_training.json").read_text())
    assert tag["step"] == 2 and tag["final"] and tag["config"]["aux_ground"] == 0.5
    assert (out / "clip_text" / "model.safetensors").is_file()
    log = (out / "train_log.txt").read_text()
    assert "ground" in log and "chance" in log


def test_training_is_reproducible_by_seed(two_runs):
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "model.safetensors")) for d in two_runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grounding_loss_prefers_tokens_aligned_with_their_words():
    torch.manual_seed(0)
    hidden, vocab = 16, 12
    embeddings = torch.randn(vocab, hidden)
    color_ids, shape_ids = [0, 1, 2, 3, 4, 5], [6, 7, 8]
    heads = AuxHeads(vision_hidden=8, text_hidden=hidden)
    color = torch.tensor([[1, 2, 0, 6]])  # per patch: 0 = nothing, 1..6 = colour
    shape = torch.tensor([[3, 1, 0, 2]])
    batch = {"dense_color": color, "dense_shape": shape}

    def tokens(c, s):
        rows = []
        for ci, si in zip(c[0].tolist(), s[0].tolist(), strict=True):
            v = heads.no_color.detach() + heads.no_shape.detach() if ci == 0 else torch.zeros(hidden)
            if ci:
                v = v + embeddings[color_ids[ci - 1]]
            if si:
                v = v + embeddings[shape_ids[si - 1]]
            rows.append(v)
        return torch.stack(rows)[None]

    aligned = grounding_loss(tokens(color, shape), embeddings, heads, color_ids, shape_ids, batch)
    swapped = grounding_loss(tokens(color.roll(1, 1), shape.roll(1, 1)), embeddings, heads, color_ids, shape_ids,
                             batch)
    assert aligned < swapped


def test_train_cli_overrides_are_typed_and_checked():
    from finepruner.toy.cli import parse_overrides

    assert parse_overrides(["lr=0.002", "lookup_at=answer", "turns=6", "rope_theta=1e5"]) == {
        "lr": 0.002, "lookup_at": "answer", "turns": 6, "rope_theta": 1e5}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["no_such_field=1"])
    with pytest.raises(SystemExit, match="turns"):
        parse_overrides(["turns=many"])


def test_finalize_keeps_machine_paths_out_of_the_shipped_logs(two_runs, tmp_path):
    import shutil

    from finepruner.toy.finalize import ship

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    init = tmp_path / "earlier-run"
    tag = json.loads((run / "toy_training.json").read_text())
    tag["config"]["init"] = str(init)
    (run / "toy_training.json").write_text(json.dumps(tag))
    with (run / "train_log.txt").open("a") as log:
        log.write(f"initialised from {init}\n")
    dest = tmp_path / "shipped"
    ship(run, dest)
    for name in ("toy_training.json", "train_log.txt"):
        text = (dest / name).read_text()
        assert str(tmp_path) not in text, name
    assert "INIT_DIR" in (dest / "train_log.txt").read_text()
    assert (dest / "model.safetensors").is_file() and (dest / "clip_text" / "model.safetensors").is_file()
