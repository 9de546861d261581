"""On the shipped toy model, a method keeps the tokens that matter better than random.

Margins are established from measured figures (fixed default suite, 16 of 144 tokens; docs/toy.md and
each method's page): GQA colour 100% (FastV) vs 27.8% (random) against 94.4% unpruned, POPE F1 99.6 vs
59.6; suite means (POPE, GQA, MME, MMBench headlines) random 38.5, DivPrune 63.6, DART 64.1. The
assertions leave room for about half of each gap, so they fail when a method stops finding the objects,
not on noise (the runs are deterministic: greedy decoding, fixed suite, fixed seeds). Each (method,
budget) runs once per session and is shared by the tests below.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import finepruner
from finepruner.toy.evaluate import evaluate_suite, method_params, summary_row
from finepruner.toy.suite import build_default_suite

#: Suite-mean points a method must beat random by at 16 tokens (about half the measured gap).
SUITE_MEAN_MARGINS = {
    # DivPrune 63.6 (POPE F1 98.3, GQA 75.6, MME 70.3, MMBench 10.0): gap 25.0
    "divprune": 12,
    # DART 64.1 (99.6, 79.5, 67.2, 10.0): gap 25.5. tokens=16 keeps 16+4 = 20 image tokens from layer 2 on;
    # random at 20 tokens scores 38.8, so the four extra tokens do not explain the gap.
    "dart": 12,
    # VisionZip 59.6 (90.7, 73.1, 64.7, 10.0): gap 21.1 (14 dominant incl. [CLS] + 2 contextual tokens;
    # cls_token=False, LightCompress's variant, scores 63.1)
    "visionzip": 10,
    # PruMerge, tokens=16 (15 merged + the extra token): 63.3 (93.7, 74.4, 70.0, 15.0): gap 24.7
    "prumerge": 12,
    # PruMerge+, tokens=16 (official fixed branch r = 16/288: 8 top + 8 grid + 1 extra = 17 tokens): 56.0 (84.1,
    # 66.7, 68.4, 5.0): gap 17.5; random at 20 tokens scores 38.8, so the extra token does not explain it
    "prumerge_plus": 8,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Callable[[str, int | None], dict]:
    """``run(method, tokens)``: the toy suite's results of a method at a budget (memoised)."""
    model, processor = finepruner.load_model("toy")
    root = build_default_suite(tmp_path_factory.mktemp("toy-suite"))
    results: dict[tuple[str, int | None], dict] = {}

    def evaluate(method: str, tokens: int | None) -> dict:
        if (method, tokens) not in results:
            params = method_params(method, tokens, model)
            results[method, tokens] = evaluate_suite(model, processor, root, method=method, method_params=params)
        return results[method, tokens]

    return evaluate


def test_fastv_beats_random_at_the_smallest_budget(run):
    fastv, random = run("fastv", 16), run("random", 16)
    assert fastv["gqa"]["per_type"]["color"] >= random["gqa"]["per_type"]["color"] + 36
    assert fastv["pope"]["headline"] >= random["pope"]["headline"] + 20


def test_pruning_to_the_smallest_budget_costs_random_selection(run):
    vanilla, random = run("vanilla", None), run("random", 16)
    assert random["gqa"]["per_type"]["color"] <= vanilla["gqa"]["per_type"]["color"] - 33
    assert random["pope"]["headline"] <= vanilla["pope"]["headline"] - 20


@pytest.mark.parametrize("method", sorted(SUITE_MEAN_MARGINS))
def test_method_beats_random_on_the_suite_mean(run, method):
    mean = summary_row(run(method, 16))["mean"]
    assert mean >= summary_row(run("random", 16))["mean"] + SUITE_MEAN_MARGINS[method]
