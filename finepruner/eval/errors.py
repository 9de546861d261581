"""Error types of the evaluation harness; every message names the file, field or parameter at fault."""

from __future__ import annotations


class EvalError(Exception):
    """Base class of evaluation errors reported to the user without a traceback."""


class DataError(EvalError):
    """A data root, question, annotation or image path is missing or malformed."""


class UnknownBenchmarkError(EvalError, KeyError):
    """A benchmark name is not in the registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AnswersError(EvalError):
    """An answers file cannot be read or does not match the benchmark's questions."""


class NoQuestionScores(EvalError, ValueError):
    """A benchmark split has no local per-question results (a server-scored test split, MM-Vet without
    a judge, or no answered question)."""
