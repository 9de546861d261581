"""The command line's entry point: lazy imports, the command table, Ctrl-C."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import types

import pytest

from finepruner import cli


def test_top_level_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from finepruner.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    for name in cli.COMMANDS:
        assert name in out


def test_command_table_matches_what_each_module_registers():
    for module in sorted({module for module, _ in cli.COMMANDS.values()}):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).register(sub)
        expected = sorted(name for name, (owner, _) in cli.COMMANDS.items() if owner == module)
        assert sorted(sub.choices) == expected, module


def test_a_command_parses_with_its_full_arguments():
    args = cli.build_parser("toy-data").parse_args(["toy-data", "--out", "x", "--n", "3"])
    assert args.n == 3 and callable(args.func)


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evl"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'evl'" in capsys.readouterr().err


def test_ctrl_c_exits_130_without_traceback(monkeypatch, capsys):
    def register(subparsers):
        def interrupted(args):
            raise KeyboardInterrupt

        subparsers.add_parser("slow").set_defaults(func=interrupted)

    monkeypatch.setitem(sys.modules, "fake_slow_command", types.SimpleNamespace(register=register))
    monkeypatch.setitem(cli.COMMANDS, "slow", ("fake_slow_command", "a command that gets interrupted"))
    assert cli.main(["slow"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
