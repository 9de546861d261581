"""Sweep configs: validation names the bad key, expansion, dedupe, the shipped grids."""

from __future__ import annotations

from pathlib import Path

import pytest

from finepruner.sweep.config import SweepConfigError, cell_matches, load_sweep, parse_filters, parse_sweep

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _sweep(**over):
    base = {"name": "t", "benchmarks": ["pope"], "grid": [{"method": "fastv", "tokens": [64]}]}
    base.update(over)
    return base


@pytest.mark.parametrize(
    "data, needle",
    [
        (_sweep(grid=[{"method": "fastvv", "tokens": [64]}]), "grid[0].method: unknown method 'fastvv'"),
        (_sweep(grid=[{"method": "finepruner", "heads": [8], "strategy": ["sparsity", "nope"]}]),
         "grid[0].strategy: unknown strategy 'nope'"),
        (_sweep(benchmarks=["pope", "popee"]), "benchmarks[1]: unknown benchmark 'popee'"),
        (_sweep(grid=[{"method": "fastv", "benchmarks": ["mmee"]}]), "grid[0].benchmarks[0]: unknown benchmark 'mmee'"),
        (_sweep(grid=[{"method": "fastv", "heads": [8]}]), "grid[0].heads: method 'fastv' has no parameter 'heads'"),
        (_sweep(grid=[{"method": "fastv", "params": {"strategy": "x"}}]), "grid[0].strategy"),
        (_sweep(settings={"batchsize": 2}), "settings: unknown key(s) batchsize"),
        (_sweep(defaults={"tokenz": 2}), "defaults.tokenz"),
        (_sweep(variants={"v": {"definitionz": "original"}}), "variants.v.definitionz"),
        (_sweep(gird=[]), "unknown top-level key(s) gird"),
        (_sweep(grid=[{"tokens": [64]}]), "grid[0]: each block needs a 'method'"),
        (_sweep(benchmarks=["vizwiz:nosplit"]), "benchmarks[0]"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(data, needle):
    with pytest.raises(SweepConfigError) as err:
        parse_sweep(data)
    assert needle in str(err.value)


def test_unknown_variant_and_env(monkeypatch):
    with pytest.raises(SweepConfigError, match="--variant 'x' is not defined"):
        parse_sweep(_sweep(), variant="x")
    monkeypatch.delenv("FP_TEST_CLIP", raising=False)
    bad = _sweep(grid=[{"method": "cdpruner", "tokens": [64], "clip_model": "${FP_TEST_CLIP}"}])
    with pytest.raises(SweepConfigError, match="FP_TEST_CLIP is not set"):
        parse_sweep(bad)
    monkeypatch.setenv("FP_TEST_CLIP", "clipdir")
    assert parse_sweep(bad).blocks[0]["clip_model"] == "clipdir"


def test_expansion_products_lists_defaults_and_dedupe():
    sweep = parse_sweep({
        "name": "g", "benchmarks": ["pope", "mme"], "defaults": {"K": 3},
        "grid": [
            {"method": "vanilla"},
            {"method": "fastv", "tokens": [192, 64]},
            {"method": "finepruner", "tokens": 64, "heads": [8, 16], "strategy": ["sum", "all", "random"],
             "seed": [0, 1]},
        ],
        "variants": {"original": {"definitions": "original"}},
    })
    cells = sweep.cells("m")
    # vanilla 2 + fastv 2x2 + finepruner: sum 2 heads, all 1 (heads and seed ignored), random 2 heads x 2 seeds
    assert len(cells) == 2 + 4 + (2 + 1 + 4) * 2
    fastv = [c for c in cells if c.method == "fastv"]
    assert {c.params["K"] for c in fastv} == {3}  # defaults where accepted
    assert all("K" not in c.params for c in cells if c.method == "vanilla")
    alls = [c for c in cells if c.strategy == "all"]
    assert len(alls) == 2 and all("heads" not in c.params and "seed" not in c.params for c in alls)
    sums = [c for c in cells if c.strategy == "sum"]
    assert all("seed" not in c.params for c in sums)
    assert len({c.run_id for c in cells}) == len(cells)
    original = parse_sweep({
        "name": "g", "benchmarks": ["pope"], "grid": [{"method": "finepruner", "tokens": 64, "heads": 8}],
        "variants": {"original": {"definitions": "original"}}}, variant="original")
    assert original.full_name == "g@original"
    (cell,) = original.cells("m")
    assert cell.params["definitions"] == "original"
    # overrides: one method, or every method that accepts the key; location params are not identity
    over = sweep.cells("m", overrides={"fastv.K": 5})
    assert {c.params["K"] for c in over if c.method == "fastv"} == {5}
    cd = parse_sweep(_sweep(grid=[{"method": "cdpruner", "tokens": 64}]))
    a = cd.cells("m", overrides={"cdpruner.clip_model": "here"})[0]
    b = cd.cells("m", overrides={"cdpruner.clip_model": "there"})[0]
    assert a.run_id == b.run_id and a.params["clip_model"] == "here"


def test_filters():
    cells = parse_sweep(_sweep(benchmarks=["pope", "mme"], grid=[{"method": "fastv", "tokens": [192, 64]}])).cells()
    only = parse_filters(["tokens=64", "benchmark=mme,pope"])
    assert {(c.tokens, c.benchmark) for c in cells if cell_matches(c, only)} == {(64, "mme"), (64, "pope")}
    with pytest.raises(SweepConfigError):
        parse_filters(["tokens"])


def test_shipped_configs():
    ev = load_sweep(CONFIGS / "eval.yaml")
    cells = ev.cells("llava-v1.5-7b")
    assert len(ev.benchmarks) == 10
    per_bench = {}
    for c in cells:
        per_bench.setdefault(c.benchmark, []).append(c)
    assert all(len(v) == len(cells) // 10 for v in per_bench.values())
    methods = {(c.method, c.tokens) for c in per_bench["pope"]}
    assert ("vanilla", None) in methods
    for m in ("fastv", "pdrop", "sparsevlm", "vispruner", "cdpruner", "finepruner"):
        assert {t for mm, t in methods if mm == m} == {192, 128, 64}, m
    assert all(c.params["budget"] == "average" for c in cells if c.method in ("fastv", "finepruner"))

    ha = load_sweep(CONFIGS / "head_ablation.yaml")
    assert sorted(ha.benchmarks) == ["gqa", "mme", "pope", "textvqa"]
    cells = [c for c in ha.cells("m") if c.benchmark == "pope"]
    strategies = {c.strategy for c in cells}
    assert {"all", "random", "sum", "sparsity", "hierarchical", "graph_based", "max_attention"} <= strategies
    assert {c.heads for c in cells} == {8, 16, 24, 32, None}
    assert {c.tokens for c in cells} == {192, 128, 64}
    assert all(c.params["budget"] == "average" and c.params.get("K", 2) == 2 for c in cells)
    assert len([c for c in cells if c.strategy == "all"]) == 3  # once per budget
    assert len([c for c in cells if c.strategy == "random"]) == 3 * 3 * 3
    orig = load_sweep(CONFIGS / "head_ablation.yaml", variant="original").cells("m")
    assert all(c.params["definitions"] == "original" for c in orig if c.strategy not in ("all", "random"))
    shared = {c.run_id for c in orig} & {c.run_id for c in ha.cells("m")}
    assert len(shared) == (3 + 27) * 4  # the controls do not depend on the definitions


def test_processor_kwargs_setting_is_checked_and_part_of_the_identity():
    with pytest.raises(SweepConfigError, match="settings.processor_kwargs: expected"):
        parse_sweep(_sweep(settings={"processor_kwargs": [1, 2]}))
    plain = parse_sweep(_sweep()).cells("m")[0]
    small = parse_sweep(_sweep(settings={"processor_kwargs": {"min_pixels": 3136}})).cells("m")[0]
    large = parse_sweep(_sweep(settings={"processor_kwargs": {"min_pixels": 12544}})).cells("m")[0]
    assert len({plain.run_id, small.run_id, large.run_id}) == 3
    assert parse_sweep(_sweep(settings={"processor_kwargs": None})).cells("m")[0].run_id == plain.run_id


def test_calibrated_heads_share_one_run_across_definitions(tmp_path):
    """``heads_from`` makes the strategy ``calibrated``, a control without head statistics: a definitions
    variant neither passes ``definitions`` to it (the strategy would refuse the option) nor makes it a new run."""
    import json

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"format": "finepruner-heads", "format_version": 1, "num_layers": 4,
                                 "num_heads": 4, "num_visual": 64, "layer": 1, "strategy": "sum", "options": {},
                                 "best": "largest", "n_samples": 1, "scores": [4, 3, 2, 1],
                                 "scores_std": [0, 0, 0, 0], "ranked_heads": [0, 1, 2, 3]}))
    data = {"name": "c", "benchmarks": ["pope"],
            "grid": [{"method": "finepruner", "tokens": 16, "heads": 2, "heads_from": str(heads)}],
            "variants": {"original": {"definitions": "original"}}}
    (base,) = parse_sweep(data).cells("m")
    (variant,) = parse_sweep(data, variant="original").cells("m")
    assert "definitions" not in variant.params and variant.run_id == base.run_id
