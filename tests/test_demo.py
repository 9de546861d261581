"""``finepruner demo`` on the shipped toy model: the table with intervals and FLOPs, the spread at the lowest
budget, the plot of accuracy vs prefill FLOPs; and the suite bootstrap behind the intervals."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

import finepruner
from finepruner.cli import main
from finepruner.demo import chance_percent
from finepruner.toy.evaluate import bootstrap_suite, run_grid
from finepruner.toy.suite import BENCHMARKS, benchmark_chance, build_default_suite

INTERVAL = re.compile(r"(-?\d+\.\d) +\[(-?\d+\.\d), (-?\d+\.\d)\]")


def test_demo_prints_table_and_writes_plot(tmp_path, capsys):
    out, report = tmp_path / "demo.png", tmp_path / "demo.json"
    code = main(["demo", "--toys", "llava", "--methods", "fastv", "divprune", "pdrop", "random", "sparsevlm",
                 "--budgets", "4", "8", "15", "16", "--n", "2", "--threads", "1",
                 "--resamples", "200", "--out", str(out), "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    lines = {tuple(line.split()[1:3]): line for line in printed.splitlines() if line.startswith("llava ")}
    vanilla = lines[("vanilla", "-")]
    assert "144.0" in vanilla  # every visual token, layer average
    mean, low, high = map(float, INTERVAL.search(vanilla).groups())
    assert low <= mean <= high and high - low > 0
    assert "not reachable" in lines[("pdrop", "4")]  # 4 tokens is below PDrop's layer-average floor on 6 layers
    # 4 and 8 of 144 are 16 and 32 of 576: no official SparseVLM schedule is near; 15 and 16 both map onto
    # the 64-of-576 schedule, which runs once
    assert "not reachable" in lines[("sparsevlm", "4")] and "not reachable" in lines[("sparsevlm", "8")]
    assert "same parameters as 15" in lines[("sparsevlm", "16")]
    gflops = {key: float(line.split()[4]) for key, line in lines.items()
              if key[0] in ("vanilla", "fastv", "random", "sparsevlm") and INTERVAL.search(line)}
    assert gflops[("random", "4")] < gflops[("random", "8")] < gflops[("fastv", "4")] < gflops[("vanilla", "-")]
    assert "toy LLaVA, all methods, at 4 tokens: best fastv" in printed and "worst random" in printed
    assert "without the baselines (random, pool)" in printed

    data = json.loads(report.read_text())
    rows = {(r["method"], r["tokens"]): r for r in data["rows"]}
    for row in (rows[("vanilla", None)], rows[("fastv", 4)], rows[("random", 8)]):
        assert set(row["interval"]) == {*BENCHMARKS, "mean"}
        assert row["prefill_gflops"] > 0 and row["average_visual_tokens"] > 0
        assert row["row"]["mean"] == pytest.approx(np.mean([row["row"][b] for b in BENCHMARKS]))
    assert rows[("random", 4)]["average_visual_tokens"] == 4.0
    spread = data["spread_at_lowest_budget"]
    assert spread["best"] == "fastv" and spread["worst"] == "random" and spread["spread"] > 0
    assert spread["spread_interval"][0] <= spread["spread"] <= spread["spread_interval"][1]
    with Image.open(out) as image:
        assert image.size[0] > 600 and image.size[1] > 300


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    model, processor = finepruner.load_model("toy")
    root = build_default_suite(tmp_path_factory.mktemp("suite"), n=2, seed=5)
    return run_grid(model, processor, root, ["vanilla", "random", "pdrop"], (4,))


def test_bootstrap_suite_centres_on_the_scorers_headlines(grid):
    ran = [r for r in grid if "row" in r]
    assert [r["method"] for r in ran] == ["vanilla", "random"] and "error" in grid[-1]  # pdrop at 4
    boot = bootstrap_suite(ran, resamples=400, seed=1)
    assert boot.values["mean"].shape == (2, 400)
    for i, row in enumerate(ran):
        for bench in BENCHMARKS:  # the units give back the scorer's headline (MME as % of 800)
            scores = row["scores"][bench]
            value = scores.value() / (8 if bench == "mme" else 1)
            assert value == pytest.approx(row["row"][bench] or 0.0, abs=1e-9) or np.isnan(value)
        low, high = boot.interval(i)
        assert low <= row["row"]["mean"] <= high
    assert boot.difference(0, 0) == (0.0, 0.0)  # the same draws for every row: paired
    low, high = boot.difference(1, 0)  # vanilla minus random
    assert 0 < low < high
    again = bootstrap_suite(ran, resamples=400, seed=1)
    assert np.array_equal(again.values["mean"], boot.values["mean"])  # deterministic by seed


def test_bootstrap_suite_rejects_rows_of_different_suites(grid, tmp_path):
    model, processor = finepruner.load_model("toy")
    other = run_grid(model, processor, build_default_suite(tmp_path, n=1, seed=6), ["vanilla"])
    with pytest.raises(ValueError, match="different questions"):
        bootstrap_suite([grid[0], other[0]], resamples=10)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_suite(grid[:1], resamples=0)


def test_chance_levels_in_table_units():
    chance = chance_percent(benchmark_chance())
    assert chance["mme"] == 37.5 and round(chance["pope"], 1) == 66.7


def test_bad_arguments_are_errors_before_the_model_loads(tmp_path, capsys, no_model_load):
    assert main(["demo", "--methods", "fastv", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) nosuch; allowed: " in err and "fastv" in err
    assert main(["demo", "--json", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is a folder; give a PNG file name" in capsys.readouterr().err


def test_demo_shows_both_toys_in_one_table_and_one_figure(tmp_path, capsys):
    out, report = tmp_path / "demo.png", tmp_path / "demo.json"
    assert main(["demo", "--methods", "random", "--budgets", "16", "--n", "1", "--resamples", "50",
                 "--out", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "toy LLaVA (144 visual tokens) and toy Qwen2.5-VL (144 visual tokens)" in printed
    rows = [line.split()[:3] for line in printed.splitlines() if line.startswith(("llava ", "qwen2.5 "))]
    assert rows == [["llava", "vanilla", "-"], ["llava", "random", "16"], ["qwen2.5", "vanilla", "-"],
                    ["qwen2.5", "random", "16"]]
    data = json.loads(report.read_text())
    assert data["toys"] == ["llava", "qwen2_5_vl"] and data["visual_tokens"] == {"llava": 144, "qwen2_5_vl": 144}
    qwen = [r for r in data["rows"] if r["toy"] == "qwen2_5_vl"]
    assert qwen[1]["average_visual_tokens"] == 16.0 and qwen[0]["prefill_gflops"] > qwen[1]["prefill_gflops"]
    with Image.open(out) as image:  # one figure, a panel per toy side by side
        assert image.size[0] > 2 * image.size[1]


def test_demo_jobs_run_the_toys_side_by_side_with_the_same_rows(tmp_path, capsys):
    """``--jobs 2`` (the default on two cores) runs the toy Qwen2.5-VL in a child process beside the toy
    LLaVA; the rows equal ``--jobs 1``'s (run one after the other), apart from the wall-clock seconds."""
    reports = {}
    for jobs in ("1", "2"):
        report = tmp_path / f"demo{jobs}.json"
        assert main(["demo", "--methods", "random", "--budgets", "16", "--n", "1", "--resamples", "50",
                     "--jobs", jobs, "--out", str(tmp_path / f"demo{jobs}.png"), "--json", str(report)]) == 0
        rows = json.loads(report.read_text())["rows"]
        reports[jobs] = [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    capsys.readouterr()
    assert reports["1"] == reports["2"] and [r["toy"] for r in reports["2"]] == ["llava"] * 2 + ["qwen2_5_vl"] * 2
