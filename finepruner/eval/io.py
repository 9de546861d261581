"""Reading and writing LLaVA-format question and answer files (spec section 1, "Answer file")."""

from __future__ import annotations

import json
import os
import secrets
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from finepruner.eval.errors import AnswersError, DataError

_ALPHABET = string.ascii_letters + string.digits


def new_answer_id() -> str:
    """A random 22-character id like LLaVA's ``shortuuid.uuid()``."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(22))


def read_jsonl(path: Path, *, kind: str = "question file", skip_bad: bool = False) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line raises (naming file and line) unless ``skip_bad``."""
    if not path.is_file():
        raise DataError(f"{kind} not found: {path}")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if skip_bad:
                    continue
                raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from err
    return rows


def read_json(path: Path, *, kind: str = "annotation file") -> Any:
    """Read a JSON file, naming it on a missing file or a parse error."""
    if not path.is_file():
        raise DataError(f"{kind} not found: {path}")
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Read an answers JSONL file (ours or LLaVA's); every line needs ``question_id`` and ``text``."""
    if not Path(path).is_file():
        raise AnswersError(f"answers file not found: {path}")
    rows = read_jsonl(Path(path), kind="answers file")
    for i, row in enumerate(rows, 1):
        for field in ("question_id", "text"):
            if field not in row:
                raise AnswersError(f"{path}: answer {i} has no {field!r} field")
    return rows


def answer_key(question_id: Any, prompt: str) -> str:
    """Identity of a question for resuming; ``question_id`` alone is not unique in MME and TextVQA."""
    return json.dumps([question_id, prompt], ensure_ascii=False)


class AnswerWriter:
    """Appends answer records to a JSONL file and flushes (and fsyncs) after every batch."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write_batch(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_existing_answers(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Answers already on disk (for resuming); a torn last line from a crash is ignored."""
    for path in paths:
        if path.is_file():
            yield from read_jsonl(path, kind="answers file", skip_bad=True)


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
