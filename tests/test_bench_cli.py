"""``finepruner bench`` end to end on the toy model (or the tiny shape when the toy checkpoint is absent),
and the GPU script's smoke mode. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import finepruner
from finepruner.bench import runner
from finepruner.bench.shapes import toy_available
from finepruner.cli import main

MODEL = "toy" if toy_available() else "tiny"
BUDGETS = ["32", "48"]  # feasible for every method on the toy (144 tokens, 6 layers) and tiny (64, 4) shapes
TIMED = ("prefill_s", "vision_s", "llm_s", "decode_s_per_token", "selection_s", "peak_memory_bytes")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", MODEL, "--budgets", *BUDGETS, "--rounds", "1", "--warmup", "0",
            "--decode-steps", "2", "--threads", "2", "--quiet", "--eager-scoring",
            "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"), "--plot", str(out / "bench.png")]
    assert main(argv) == 0
    return out


def test_attention_scored_methods_come_from_the_registry():
    """``--eager-scoring`` adds a ``score_impl=eager`` variant of the methods that declare
    ``scores_attention``; each of them takes a ``score_impl`` parameter."""
    assert set(runner.attention_scored()) == {"fastv", "pdrop", "finepruner"}
    for name in runner.attention_scored():
        assert "score_impl" in finepruner.methods.parameters(name)


def test_method_params_complete_variants_with_the_methods_defaults():
    """``runner.method_params``: extra, then the variant's own parameters, then ``defaults_for`` the shape
    (``finepruner``: a quarter of the heads; SparseVLM off LLaVA-1.5: the scaled schedule)."""
    from finepruner.methods.sparsevlm import sparsevlm_mapping

    def params(method, given=None, **shape):
        return runner.method_params(runner.Variant(method, method, given or {}), 32, None, **shape)

    assert params("finepruner", {"tokens": 64}) == {"tokens": 64, "heads": 8}
    assert params("fastv+finepruner", {"heads": 3}) == {"heads": 3}
    assert params("fastv", {"tokens": 64}) == {"tokens": 64}
    assert params(runner.PLAIN) == {}
    assert params("sparsevlm", {"tokens": 64}) == {"tokens": 64}
    assert params("sparsevlm", {"tokens": 16}, num_layers=6, num_visual=144) == sparsevlm_mapping(16, 6, 144)
    variant = runner.Variant("cdpruner", "cdpruner", {"tokens": 8})
    extra = runner.method_params(variant, 32, lambda m: {"clip_text": "tower"})
    assert extra == {"clip_text": "tower", "tokens": 8}


def test_every_method_and_field(bench_run):
    document = json.loads((bench_run / "bench.json").read_text())
    entries = {e["label"]: e for e in document["variants"]}
    expected = {"vanilla"} | {f"{m}@{b}" for m in finepruner.methods.available() if m != "vanilla" for b in BUDGETS}
    expected |= {f"{m}:score_impl=eager@{b}" for m in runner.attention_scored() for b in BUDGETS}
    assert expected <= set(entries)
    for label in expected:
        entry = entries[label]
        assert entry["status"] == "ok", (label, entry["status"])
        for key in TIMED:
            assert entry[key]["median"] is not None and entry[key]["min"] is not None, (label, key)
        assert entry["kv_cache_bytes"] > 0
        flops = entry["flops"]
        for key in ("decoder", "lm_head", "language_model", "vision_tower", "projector", "decode_step", "total",
                    "paper_tflops_per_sample"):
            assert flops[key] is not None and flops[key] > 0, (label, key)
        ratios = entry["ratios"]
        for key in ("llm_time_median", "llm_flops", "llm_time_over_flops_median", "prefill_time_over_flops_min",
                    "selection_pct_of_vanilla_prefill", "peak_memory", "kv_cache", "decode_flops"):
            assert ratios[key] is not None, (label, key)
        if label != "vanilla":
            assert flops["language_model"] < entries["vanilla"]["flops"]["language_model"] * 1.05, label
            assert entry["kv_cache_bytes"] < entries["vanilla"]["kv_cache_bytes"], label
            assert entry["average_visual_tokens"] < entries["vanilla"]["average_visual_tokens"], label
    assert document["meta"]["model"] == MODEL
    assert document["shapes"]["decoder"]["layers"] >= 1


def test_markdown_and_plot(bench_run):
    table = (bench_run / "bench.md").read_text()
    assert table.startswith("| variant |")
    assert "| vanilla |" in table and f"| fastv@{BUDGETS[0]} |" in table
    header = table.splitlines()[0].split(" | ")
    assert "peak MiB" in header and "KV MiB" in header and "KV MB" not in header  # the values are / 2**20
    document = json.loads((bench_run / "bench.json").read_text())
    vanilla = next(e for e in document["variants"] if e["label"] == "vanilla")
    kv_column = header.index("KV MiB")
    row = next(line for line in table.splitlines() if line.startswith("| vanilla |")).split(" | ")
    assert float(row[kv_column]) == pytest.approx(vanilla["kv_cache_bytes"] / 2**20, abs=0.01)
    assert (bench_run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_transformers_row_and_vanilla_ratios(bench_run):
    """Plain transformers (nothing applied) runs in the same rounds as vanilla; vanilla's prefill, decode and
    peak-memory ratios over it are always in the JSON and under the table."""
    document = json.loads((bench_run / "bench.json").read_text())
    entries = {e["label"]: e for e in document["variants"]}
    plain = entries[runner.PLAIN]
    assert plain["status"] == "ok" and plain["method"] == "plain"
    assert plain["flops"]["language_model"] == entries["vanilla"]["flops"]["language_model"]
    assert plain["kv_cache_bytes"] == entries["vanilla"]["kv_cache_bytes"]
    comparison = document["vanilla_vs_plain"]
    assert comparison == entries["vanilla"]["vs_plain"] and comparison["rounds"] == 1
    for key in ("prefill_s", "decode_s_per_token", "peak_memory_bytes", "prefill_cpu_s", "decode_cpu_s_per_token"):
        assert set(comparison[key]) == {"median", "min", "paired_median"}, key
        assert comparison[key]["median"] > 0, key
    table = (bench_run / "bench.md").read_text()
    assert "| plain |" in table and "vanilla / plain transformers over 1 rounds: prefill " in table


def test_plain_comparison_pairs_rounds():
    plain = [{"prefill_s": 1.0, "peak_memory_bytes": 0}, {"prefill_s": 2.0, "peak_memory_bytes": 0}]
    vanilla = [{"prefill_s": 1.1, "peak_memory_bytes": 5}, {"prefill_s": 2.0, "peak_memory_bytes": 5}]
    out = runner.plain_comparison(plain, vanilla)
    assert out["prefill_s"]["median"] == pytest.approx(3.1 / 3.0)
    assert out["prefill_s"]["min"] == pytest.approx(1.1)
    assert out["prefill_s"]["paired_median"] == pytest.approx(1.05)
    assert out["peak_memory_bytes"] is None  # no ratio over a zero peak


def test_method_specs():
    assert runner.parse_method("finepruner:strategy=dynamic,heads=4") == (
        "finepruner", {"strategy": "dynamic", "heads": 4})
    with pytest.raises(ValueError, match="available"):
        runner.parse_method("nope")
    variants = runner.build_variants(["fastv", "pdrop:lam=0.5"], [64, 128])
    assert [v.label for v in variants] == ["plain", "vanilla", "fastv@64", "fastv@128", "pdrop:lam=0.5@64",
                                           "pdrop:lam=0.5@128"]
    assert variants[-1].params == {"lam": 0.5, "tokens": 128}


def test_gpu_script_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--device", "cpu", "--shape", "tiny", "--rounds", "1", "--warmup", "0", "--budgets", "32",
                        "--batches", "1", "--methods", "fastv", "vispruner", "--decode-steps", "1",
                        "--out", str(tmp_path)])
    assert code == 0
    document = json.loads((tmp_path / "gpu_tiny_b1.json").read_text())
    labels = [e["label"] for e in document["variants"]]
    assert labels == ["plain", "vanilla", "fastv@32", "vispruner@32", "fastv:score_impl=eager@32"]
    assert all(e["status"] == "ok" for e in document["variants"])
    assert (tmp_path / "gpu_tiny.md").read_text().count("| vanilla |") == 1
