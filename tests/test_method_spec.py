"""One method-spec parser for every command (``finepruner.methods.spec``)."""

from __future__ import annotations

import pytest

from finepruner.bench import runner
from finepruner.cli import build_parser
from finepruner.methods.spec import parse_method_spec, parse_params, parse_value


def test_values():
    assert parse_value("64") == 64 and parse_value("0.5") == 0.5 and parse_value("[8,16]") == [8, 16]
    assert parse_value("true") is True and parse_value("True") is True and parse_value("None") is None
    assert parse_value("sum") == "sum" and parse_value("") == ""


def test_specs():
    assert parse_method_spec("vanilla") == ("vanilla", {})
    assert parse_method_spec("finepruner:tokens=64,heads=16,strategy=sparsity") == (
        "finepruner", {"tokens": 64, "heads": 16, "strategy": "sparsity"})
    # commas inside a list value do not split it
    assert parse_method_spec("sparsevlm:layers=[1,2,4],keeps=[40,20,10]") == (
        "sparsevlm", {"layers": [1, 2, 4], "keeps": [40, 20, 10]})
    assert parse_method_spec(" fastv : tokens = 8 ,") == ("fastv", {"tokens": 8})


@pytest.mark.parametrize(("spec", "message"), [
    ("fastv:tokens", "expected key=value, got 'tokens'"),
    (":tokens=3", "has no method name"),
    ("fastv:=3", "expected key=value"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method_spec(spec)


def test_every_command_parses_the_same_way():
    """bench's --methods, eval's --method and --param, and sweep's --param go through the same parser as
    show's --method."""
    spec = "sparsevlm:layers=[1,2,4],keeps=[40,20,10],version=2.0"
    assert runner.parse_method(spec) == parse_method_spec(spec)
    with pytest.raises(ValueError, match="nope"):
        runner.parse_method("nope")  # bench also checks the name against the registry
    from finepruner.eval.cli import method_and_params

    args = build_parser("eval").parse_args(["eval", "--model", "m", "--bench", "pope", "--data-root", "d",
                                            "--out", "o", "--param", "layers=[1,2,4]", "--param", "version=2.0"])
    assert parse_params(args.param, "--param") == {"layers": [1, 2, 4], "version": 2.0}
    assert method_and_params("sparsevlm:layers=[1,2,4]", ["version=2.0"], tokens=64) == (
        "sparsevlm", {"layers": [1, 2, 4], "version": 2.0, "tokens": 64})
    assert method_and_params(spec, None) == parse_method_spec(spec)
    from finepruner.sweep.cli import _options

    sweep_args = build_parser("sweep").parse_args(["sweep", "c.yaml", "--param", "cdpruner.keeps=[40,20]"])
    assert _options(sweep_args).overrides == parse_params(["cdpruner.keeps=[40,20]"])
    with pytest.raises(ValueError, match="--param expects key=value, got 'K'"):
        parse_params(["K"])


def test_method_registry_refuses_duplicate_names():
    from finepruner import methods
    from finepruner.methods.fastv import FastV

    class OtherFastV(FastV):
        pass

    with pytest.raises(ValueError, match="method name 'fastv' is claimed by FastV and"):
        methods._unique_names((FastV, OtherFastV))
    assert sorted(methods._unique_names((FastV,))) == sorted(["fastv", *getattr(FastV, "aliases", ())])


def test_strategy_registry_refuses_duplicate_names():
    from finepruner.heads import registry

    first = next(iter(registry.REGISTRY.values()))
    with pytest.raises(ValueError, match=f"strategy name {first.name!r} is used twice"):
        registry._unique((first, first))
    assert list(registry._unique(tuple(registry.REGISTRY.values()))) == list(registry.REGISTRY)


def test_a_parameter_given_twice_with_different_values_is_refused():
    from finepruner.eval.cli import method_and_params
    from finepruner.eval.errors import EvalError
    from finepruner.methods.spec import parse_method_spec, parse_params

    assert parse_params(["tokens=8", "tokens=8"]) == {"tokens": 8}
    with pytest.raises(ValueError, match=r"--param: tokens is given twice \(8 and 16\)"):
        parse_params(["tokens=8", "tokens=16"])
    with pytest.raises(ValueError, match="tokens is given twice"):
        parse_method_spec("fastv:tokens=8,tokens=9")
    with pytest.raises(EvalError, match="--tokens 8 and --param tokens=16"):
        method_and_params("fastv", ["tokens=16"], tokens=8)
    assert method_and_params("fastv", ["tokens=8"], tokens=8) == ("fastv", {"tokens": 8})
