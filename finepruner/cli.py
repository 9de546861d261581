"""Command-line entry point: ``finepruner <command> ...``.

Each command lives in its own module, which exposes ``register(subparsers)``; that function adds a
sub-parser and sets ``func`` (called with the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that contribute sub-commands, in the order they appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "finepruner.demo",
    "finepruner.toy.cli",
    "finepruner.eval.cli",
    "finepruner.bench.cli",
    "finepruner.calibrate",
    "finepruner.sweep.cli",
    "finepruner.report.cli",
    "finepruner.report.show",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="finepruner", description="Training-free visual-token pruning for LLaVA: methods, evaluation, sweeps."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
