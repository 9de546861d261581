"""Reading and writing LLaVA-format question and answer files (spec section 1, "Answer file")."""

from __future__ import annotations

import json
import os
import secrets
import string
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from finepruner.eval.errors import AnswersError, DataError

_ALPHABET = string.ascii_letters + string.digits


def new_answer_id() -> str:
    """A random 22-character id like LLaVA's ``shortuuid.uuid()``."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(22))


def read_jsonl(path: Path, *, kind: str = "question file") -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line raises :class:`DataError` naming file and line."""
    if not path.is_file():
        raise DataError(f"{kind} not found: {path}")
    rows: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from err
    return rows


def read_json(path: Path, *, kind: str = "annotation file") -> Any:
    """Read a JSON file, naming it on a missing file or a parse error."""
    if not path.is_file():
        raise DataError(f"{kind} not found: {path}")
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def _read_lines(path: Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line; a malformed line raises naming file and line."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise AnswersError(f"{kind} {what}: {path}")
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise AnswersError(f"{path}:{lineno}: not UTF-8 text ({err})") from err
            except json.JSONDecodeError as err:
                raise AnswersError(f"{path}:{lineno}: not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise AnswersError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def validate_answers(
    rows: list[dict[str, Any]],
    path: Path | str,
    *,
    lines: list[int] | None = None,
    identity: Callable[[dict[str, Any]], Any] | None = None,
) -> None:
    """Raise :class:`AnswersError` (naming ``path`` and the line) for an answer without ``question_id`` or
    ``text``, a ``text`` that is not a string, or two answers with the same ``identity`` (default:
    ``question_id`` and ``prompt``, as for resuming; a benchmark passes its ``answer_identity``).
    ``lines[i]`` is the line number of ``rows[i]`` (default ``i + 1``).

    LLaVA's official scripts crash on a non-string ``text`` (``text.lower()``) and let the last of
    several answers to one question win silently; both are reported here instead.
    """
    identity = identity or (lambda a: [a["question_id"], a.get("prompt")])
    first_line: dict[str, int] = {}
    duplicates: list[str] = []
    for i, row in enumerate(rows):
        lineno = lines[i] if lines is not None else i + 1
        for fld in ("question_id", "text"):
            if fld not in row:
                raise AnswersError(f"{path}:{lineno}: answer has no {fld!r} field")
        text = row["text"]
        if not isinstance(text, str):
            raise AnswersError(
                f"{path}:{lineno}: 'text' of question {row['question_id']!r} must be a string, "
                f"got {type(text).__name__} ({json.dumps(text)}); the official scripts fail on it too"
            )
        key = json.dumps(identity(row), ensure_ascii=False, default=str)
        if key in first_line:
            duplicates.append(f"question {key} on lines {first_line[key]} and {lineno}")
        else:
            first_line[key] = lineno
    if duplicates:
        shown = "; ".join(duplicates[:5]) + (f"; ... ({len(duplicates)} in all)" if len(duplicates) > 5 else "")
        raise AnswersError(
            f"{path}: {len(duplicates)} duplicate answer(s): {shown}. Each question needs exactly one answer "
            "(the official scripts would silently keep one of them, or misalign the others); remove the duplicates"
        )


def read_answers(
    path: Path | str, *, identity: Callable[[dict[str, Any]], Any] | None = None
) -> list[dict[str, Any]]:
    """Read an answers JSONL file (ours or LLaVA's), checked by :func:`validate_answers`."""
    path = Path(path)
    numbered = _read_lines(path, "answers file")
    rows = [row for _, row in numbered]
    validate_answers(rows, path, lines=[n for n, _ in numbered], identity=identity)
    return rows


def repair_torn_tail(path: Path) -> int:
    """Cut an incomplete last line (a crash in the middle of a write) off ``path``; returns the bytes cut.

    Every record is written as one line ending in ``\\n``, so a tail without a newline is torn. A last
    line that ends in a newline but is not valid JSON is cut as well (a torn write whose newline made it
    to disk before the rest).
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        start = data.rfind(b"\n", 0, max(keep - 1, 0)) + 1
        last = data[start:keep]
        if last.strip():
            try:
                json.loads(last)
            except (json.JSONDecodeError, UnicodeDecodeError):
                keep = start
    cut = len(data) - keep
    if cut:
        with path.open("r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return cut


def answer_key(question_id: Any, prompt: str) -> str:
    """Identity of a question for resuming; ``question_id`` alone is not unique in MME and TextVQA."""
    return json.dumps([question_id, prompt], ensure_ascii=False)


class AnswerWriter:
    """Appends answer records to a JSONL file and flushes (and fsyncs) after every batch.

    A torn last line left by a crash is cut off before the first append (:func:`repair_torn_tail`).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.repaired_bytes = repair_torn_tail(path)
        self._fh = path.open("a", encoding="utf-8")

    def write_batch(self, records: Iterable[dict[str, Any]]) -> None:
        """Append ``records`` as one write (one line each), then flush and fsync."""
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_error_record(record: dict[str, Any]) -> bool:
    """Whether ``record`` marks a failed sample (``metadata.error``, e.g. an unreadable image)."""
    metadata = record.get("metadata")
    return isinstance(metadata, dict) and bool(metadata.get("error"))


def iter_existing_answers(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Answers already on disk (for resuming), in file order; a torn last line from a crash is cut off
    first, any other malformed line raises :class:`AnswersError` naming file and line."""
    for path in paths:
        if path.is_file():
            repair_torn_tail(path)
            for _, row in _read_lines(path, "answers file"):
                yield row


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_answers_coverage(
    expected_keys: Iterable[Any], answers: Iterable[dict[str, Any]], key=lambda a: a["question_id"]
) -> dict[str, int]:
    """Counts of answers vs questions: ``missing`` questions and ``unknown`` answer ids."""
    expected = list(expected_keys)
    expected_set = set(expected)
    seen = set()
    unknown = 0
    n = 0
    for a in answers:
        n += 1
        k = key(a)
        if k in expected_set:
            seen.add(k)
        else:
            unknown += 1
    return {
        "questions": len(expected_set),
        "answers": n,
        "missing": len(expected_set - seen),
        "unknown": unknown,
    }
