"""``finepruner demo`` on the shipped toy model: the table and the plot."""

from __future__ import annotations

import pytest
from PIL import Image

from finepruner.cli import main
from finepruner.demo import chance_percent
from finepruner.toy.suite import benchmark_chance


def test_demo_prints_table_and_writes_plot(tmp_path, capsys):
    pytest.importorskip("finepruner.toy.model").checkpoint_dir()
    out = tmp_path / "demo.png"
    code = main(["demo", "--methods", "fastv", "pdrop", "--budgets", "16", "--n", "2", "--threads", "1",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line for line in printed.splitlines() if line.split()[:1]}
    assert "vanilla" in lines and "fastv" in lines
    assert "144.0" in lines["vanilla"]  # every visual token, layer average
    assert "not reachable" in lines["pdrop"]  # 16 tokens is below PDrop's floor on 6 layers
    with Image.open(out) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_chance_levels_in_table_units():
    chance = chance_percent(benchmark_chance())
    assert chance["mme"] == 37.5 and round(chance["pope"], 1) == 66.7
