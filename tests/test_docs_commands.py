"""Every ``finepruner ...`` command shown in the README and docs/ parses with the real command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from finepruner import cli, methods

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"^(?:torchrun\s.*?-m\s+)?finepruner\s+(\S.*)$")


def shell_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks tagged bash/sh/console, continuation lines joined."""
    blocks, current, tag = [], None, ""
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and current is None:
            current, tag = [], fence.group(1)
        elif fence:
            if tag in ("bash", "sh", "console", "shell"):
                blocks.append(re.sub(r"\\\n\s*", " ", "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line after ``finepruner``) for every runnable example; placeholders (``...``)
    are left out, ``[optional]`` brackets and trailing comments removed."""
    found = []
    for path in DOCS:
        for block in shell_blocks(path.read_text()):
            for line in block.splitlines():
                match = COMMAND.match(line.strip())
                if not match or "..." in match.group(1):
                    continue
                words = re.sub(r"\s#.*$", "", match.group(1)).replace("[", "").replace("]", "")
                found.append((str(path.relative_to(ROOT)), words))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15
    assert {shlex.split(words)[0] for _, words in COMMANDS} >= {"eval", "score", "sweep", "report", "bench"}


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[f"{w}:{c.split()[0]}" for w, c in COMMANDS])
def test_documented_command_parses(where: str, words: str):
    argv = shlex.split(words)
    try:
        args = cli.build_parser(argv[0]).parse_args(argv)
    except SystemExit as err:  # argparse prints the reason on stderr
        raise AssertionError(f"{where}: `finepruner {words}` does not parse") from err
    assert callable(args.func)
    if argv[0] == "eval" and args.method:
        # the method's own validation, as eval runs it before loading the model
        from finepruner.eval.cli import method_and_params

        try:
            name, params = method_and_params(args.method, args.param, args.tokens, args.K)
            methods.create(name, **params)
        except ValueError as err:
            raise AssertionError(f"{where}: `finepruner {words}`: {err}") from err
