"""Command-line entry point: ``finepruner <command> ...``.

Each command lives in its own module, which exposes ``register(subparsers)``; that function adds the
command's sub-parser and sets ``func`` (called with the parsed namespace, returning an exit code).

Only the module of the command being run is imported (torch and transformers take seconds to import):
``finepruner --help`` lists the commands from ``COMMANDS`` alone, and ``finepruner eval ...`` imports
``finepruner.eval.cli`` and nothing of the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Every sub-command: name -> (the module that registers it, one-line help for ``finepruner --help``),
#: in the order they appear in ``--help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("finepruner.demo", "every method at several budgets on the embedded toy model"),
    "toy-data": ("finepruner.toy.cli", "write the toy benchmark suite (POPE/GQA/MME/MMBench layouts)"),
    "toy-train": ("finepruner.toy.cli", "train the toy LLaVA from scratch on synthetic scenes"),
    "eval": ("finepruner.eval.cli", "run LLaVA-1.5 benchmarks (optionally with a pruning method)"),
    "score": ("finepruner.eval.cli", "print the official metrics of an answers file"),
    "bench": ("finepruner.bench.cli", "measure FLOPs, latency, memory and KV cache of methods side by side"),
    "calibrate": ("finepruner.calibrate", "rank a model's visual heads over a calibration set"),
    "sweep": ("finepruner.sweep.cli", "run a grid of methods x budgets x heads x strategies x benchmarks"),
    "report": ("finepruner.report.cli", "tables (markdown, CSV) and plots (PNG) from the results store"),
    "show": ("finepruner.report.show", "PNG of the kept tokens of several methods, and per-head attention maps"),
}

#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def _requested_command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first word that is not an option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. The module of ``command`` registers its full sub-parser(s); every other
    command gets a placeholder that carries only its help line (all that ``finepruner --help`` shows)."""
    parser = argparse.ArgumentParser(
        prog="finepruner", description="Training-free visual-token pruning for LLaVA: methods, evaluation, sweeps."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS[command][0] if command is not None else None
    for name, (module, help_line) in COMMANDS.items():
        if module != wanted:
            sub.add_parser(name, help=help_line)
    if wanted is not None:
        importlib.import_module(wanted).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (130 after Ctrl-C, without a traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _requested_command(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nfinepruner {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
