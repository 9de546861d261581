"""On the shipped toy model, an attention-based method keeps the tokens that matter better than random.

Margins are established from the measured figures of ``docs/toy.md`` (fixed small suite, 16 of 144
tokens): GQA colour 100% (FastV) vs 27.8% (random) against 94.4% unpruned, POPE F1 99.6 vs 59.6.
The assertions leave room for about half of each gap, so they fail when a method stops finding the
objects, not on noise (the runs are deterministic: greedy decoding, fixed suite, fixed seeds).
"""

from __future__ import annotations

import pytest

from finepruner.toy.evaluate import evaluate_suite, method_params


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    model_module = pytest.importorskip("finepruner.toy.model")
    try:
        model_module.checkpoint_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    import finepruner
    from finepruner.toy.suite import build_default_suite

    model, processor = finepruner.load_model("toy")
    return model, processor, build_default_suite(tmp_path_factory.mktemp("toy-suite"))


def run(toy, method, tokens):
    model, processor, root = toy
    params = method_params(method, tokens, model, processor)
    return evaluate_suite(model, processor, root, ("gqa", "pope"), method=method, method_params=params)


def test_fastv_beats_random_at_the_smallest_budget(toy):
    fastv, random = run(toy, "fastv", 16), run(toy, "random", 16)
    assert fastv["gqa"]["per_type"]["color"] >= random["gqa"]["per_type"]["color"] + 36
    assert fastv["pope"]["headline"] >= random["pope"]["headline"] + 20


def test_pruning_to_the_smallest_budget_costs_random_selection(toy):
    vanilla, random = run(toy, "vanilla", None), run(toy, "random", 16)
    assert random["gqa"]["per_type"]["color"] <= vanilla["gqa"]["per_type"]["color"] - 33
    assert random["pope"]["headline"] <= vanilla["pope"]["headline"] - 20
