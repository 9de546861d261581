"""The results store: one SQLite file in the runs folder (``results.sqlite``).

Schema version 2 (``PRAGMA user_version`` and ``meta.schema_version``)::

    meta(key TEXT PRIMARY KEY, value TEXT)          schema_version, created, finepruner version
    runs(run_id TEXT PRIMARY KEY,                   sha1 of the cell identity (model, method, params,
                                                    benchmark, answer-changing settings), 16 hex digits
         model_id, method, tokens, heads, strategy, benchmark, label,
         params TEXT (JSON), settings TEXT (JSON),
         status TEXT: pending | running | complete | failed,
         run_dir TEXT (relative to the store's folder), answers_path TEXT (relative to the store's folder),
         metric TEXT, value REAL,                   the benchmark's headline metric and value
         metrics TEXT (JSON), efficiency TEXT (JSON), timing TEXT (JSON), config TEXT (JSON),
         code_version TEXT, claimed_by TEXT (host:pid:session), started_at, finished_at, error TEXT,
         results BLOB)                              the benchmark's per-question results (zlib-compressed
                                                    JSON of ``QuestionResults.to_json``; version 2)
    run_sweeps(sweep TEXT, run_id TEXT, PRIMARY KEY (sweep, run_id))

Version 1 stores (without ``results``) are migrated in place by adding the column.

A run is ``complete`` only after its answers are written and scored; a crash or kill leaves it
``running`` (or ``failed``), and the next sweep reruns it (the eval runner resumes its answers).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
DEFAULT_NAME = "results.sqlite"
STATUSES = ("pending", "running", "complete", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    method TEXT NOT NULL,
    tokens INTEGER,
    heads INTEGER,
    strategy TEXT,
    benchmark TEXT NOT NULL,
    label TEXT,
    params TEXT NOT NULL,
    settings TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'complete', 'failed')),
    run_dir TEXT,
    answers_path TEXT,
    metric TEXT,
    value REAL,
    metrics TEXT,
    efficiency TEXT,
    timing TEXT,
    config TEXT,
    code_version TEXT,
    claimed_by TEXT,
    started_at TEXT,
    finished_at TEXT,
    error TEXT,
    results BLOB
);
CREATE TABLE IF NOT EXISTS run_sweeps (
    sweep TEXT NOT NULL,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    PRIMARY KEY (sweep, run_id)
);
CREATE INDEX IF NOT EXISTS runs_by_bench ON runs(benchmark, method, tokens);
"""

def _add_results_column(conn: sqlite3.Connection) -> None:
    """1 -> 2: the ``results`` column (per-question results of a run)."""
    if "results" not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}:
        conn.execute("ALTER TABLE runs ADD COLUMN results BLOB")


#: ``{from_version: function(connection)}`` upgrading a store by one version. A store older than the
#: oldest migration, or without finepruner's tables, is refused.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _add_results_column}


class StoreError(RuntimeError):
    """The results store cannot be used (wrong schema, not a finepruner store)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def code_version() -> str:
    """``<package version>+git.<describe>`` when the package runs from a git clone, else the version."""
    import finepruner

    version = finepruner.__version__
    root = Path(finepruner.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        inside = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return version
    if out.returncode == 0 and inside.returncode == 0 and Path(inside.stdout.strip()).resolve() == root:
        return f"{version}+git.{out.stdout.strip()}"
    return version


@dataclass
class RunRecord:
    """One row of ``runs``, JSON columns decoded."""

    run_id: str
    model_id: str
    method: str
    tokens: int | None
    heads: int | None
    strategy: str | None
    benchmark: str
    label: str | None
    params: dict[str, Any]
    settings: dict[str, Any]
    status: str
    run_dir: str | None
    answers_path: str | None
    metric: str | None
    value: float | None
    metrics: dict[str, Any] | None
    efficiency: dict[str, Any] | None
    timing: dict[str, Any] | None
    config: dict[str, Any] | None
    code_version: str | None
    claimed_by: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    sweeps: tuple[str, ...] = ()

    def metric_value(self, name: str | None = None) -> float | None:
        """The headline value, or metric ``name`` from the stored metrics (e.g. MME ``total``)."""
        if name is None or name == self.metric:
            return self.value
        value = (self.metrics or {}).get(name)
        return float(value) if isinstance(value, (int, float)) else None


_JSON_COLUMNS = ("params", "settings", "metrics", "efficiency", "timing", "config")


class ResultsStore:
    """SQLite results store; safe for several worker processes on one machine (WAL, busy timeout)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise StoreError(f"results store not found: {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.root = self.path.parent
        self.conn = sqlite3.connect(str(self.path), timeout=120, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise StoreError(f"{self.path}: not an SQLite results store ({err})") from None
        self._prepare()

    # -- schema --------------------------------------------------------------------------------------
    def _tables(self) -> set[str]:
        rows = self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        return {r[0] for r in rows}

    def _prepare(self) -> None:
        tables = self._tables()
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if not tables:
            with self.transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._set_meta("schema_version", str(SCHEMA_VERSION))
                self._set_meta("created", _now())
            return
        if "runs" not in tables or version == 0:
            raise StoreError(
                f"{self.path} is not a finepruner results store of a known schema (tables: "
                f"{', '.join(sorted(tables)) or 'none'}; schema version {version}). Use a new --store file; "
                "old run folders can be re-registered by rerunning the sweep (finished answers are reused)."
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this finepruner's {SCHEMA_VERSION}; "
                "upgrade finepruner to read it"
            )
        while version < SCHEMA_VERSION:
            step = MIGRATIONS.get(version)
            if step is None:
                raise StoreError(
                    f"{self.path} has schema version {version}, which this finepruner cannot migrate to "
                    f"{SCHEMA_VERSION}; use a new --store file (rerunning the sweep reuses finished answers)"
                )
            with self.transaction():
                step(self.conn)
                version += 1
                self.conn.execute(f"PRAGMA user_version={version}")
                self._set_meta("schema_version", str(version))
                self._set_meta(f"migrated_to_{version}", _now())

    def _set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                store.conn.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paths ---------------------------------------------------------------------------------------
    def relative(self, path: str | Path | None) -> str | None:
        if path is None:
            return None
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(p)

    def absolute(self, path: str | None) -> Path | None:
        if path is None:
            return None
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    # -- writing -------------------------------------------------------------------------------------
    def register(self, cells: Iterable[Any], sweep: str | None = None) -> None:
        """Add ``pending`` rows for cells not yet in the store and link them to ``sweep``."""
        with self.transaction():
            for cell in cells:
                self.conn.execute(
                    "INSERT OR IGNORE INTO runs(run_id, model_id, method, tokens, heads, strategy, benchmark, "
                    "label, params, settings, status, run_dir) VALUES (?,?,?,?,?,?,?,?,?,?,'pending',?)",
                    (
                        cell.run_id, cell.model_id, cell.method, cell.tokens, cell.heads, cell.strategy,
                        cell.benchmark, cell.label, json.dumps(dict(cell.params), sort_keys=True, default=str),
                        json.dumps(dict(cell.settings), sort_keys=True, default=str), cell.relative_dir(),
                    ),
                )
                if sweep:
                    self.conn.execute(
                        "INSERT OR IGNORE INTO run_sweeps(sweep, run_id) VALUES (?, ?)", (sweep, cell.run_id)
                    )

    def claim(self, run_id: str, session: str, *, force: bool = False, reclaim: bool = False) -> bool:
        """Mark a run ``running`` for this worker; False when it is complete (unless ``force``) or claimed
        by a live worker (of this session, or a live process on this host; ``reclaim`` ignores others)."""
        me = f"{socket.gethostname()}:{os.getpid()}:{session}"
        with self.transaction():
            row = self.conn.execute("SELECT status, claimed_by FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"run {run_id} is not registered")
            if row["status"] == "complete" and not force:
                return False
            if row["status"] == "running" and row["claimed_by"] and not _stale(row["claimed_by"], session, reclaim):
                return False
            self.conn.execute(
                "UPDATE runs SET status='running', claimed_by=?, started_at=?, finished_at=NULL, error=NULL "
                "WHERE run_id=?",
                (me, _now(), run_id),
            )
            return True

    def complete(self, run_id: str, *, metrics: dict[str, Any], run_dir: str | Path, answers_path: str | Path | None,
                 efficiency: dict[str, Any] | None, timing: dict[str, Any] | None, config: dict[str, Any] | None,
                 version: str | None = None, results: dict[str, Any] | None = None) -> None:
        """Mark a run complete with what its evaluation returned; ``results``: its per-question results
        (``QuestionResults.to_json``), read back by :meth:`results_of`."""
        headline = metrics.get("headline") or {}
        value = headline.get("value")
        blob = None if results is None else zlib.compress(json.dumps(results, default=str).encode(), 6)
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET status='complete', run_dir=?, answers_path=?, metric=?, value=?, metrics=?, "
                "efficiency=?, timing=?, config=?, code_version=?, finished_at=?, error=NULL, results=? "
                "WHERE run_id=?",
                (
                    self.relative(run_dir), self.relative(answers_path), headline.get("metric"),
                    float(value) if isinstance(value, (int, float)) else None,
                    json.dumps(metrics, default=str), json.dumps(efficiency or {}, default=str),
                    json.dumps(timing or {}, default=str), json.dumps(config or {}, default=str),
                    version or code_version(), _now(), blob, run_id,
                ),
            )

    def results_of(self, run_id: str) -> dict[str, Any] | None:
        """The per-question results stored with a complete run, or None (none stored)."""
        row = self.conn.execute("SELECT results FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return json.loads(zlib.decompress(row[0]).decode())

    def fail(self, run_id: str, error: str) -> None:
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?",
                (error[-4000:], _now(), run_id),
            )

    def release(self, run_id: str) -> None:
        """Back to ``pending`` (an interrupted run: its answers so far are kept in its folder)."""
        with self.transaction():
            self.conn.execute(
                "UPDATE runs SET status='pending', claimed_by=NULL WHERE run_id=? AND status='running'", (run_id,)
            )

    # -- reading -------------------------------------------------------------------------------------
    def status(self, run_id: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def counts(self, run_ids: Iterable[str] | None = None) -> dict[str, int]:
        ids = set(run_ids) if run_ids is not None else None
        out = dict.fromkeys(STATUSES, 0)
        for row in self.conn.execute("SELECT run_id, status FROM runs"):
            if ids is None or row[0] in ids:
                out[row[1]] += 1
        return out

    def sweeps(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT sweep FROM run_sweeps ORDER BY sweep")]

    def runs(self, *, sweep: str | None = None, status: str | None = "complete", benchmark: str | None = None,
             model_id: str | None = None) -> list[RunRecord]:
        """Rows (complete ones by default), optionally of one sweep, benchmark or model."""
        sql = "SELECT r.* FROM runs r"
        where, args = [], []
        if sweep is not None:
            sql += " JOIN run_sweeps s ON s.run_id = r.run_id"
            where.append("s.sweep = ?")
            args.append(sweep)
        for col, val in (("r.status", status), ("r.benchmark", benchmark), ("r.model_id", model_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.rowid"
        links: dict[str, list[str]] = {}
        for rid, sw in self.conn.execute("SELECT run_id, sweep FROM run_sweeps"):
            links.setdefault(rid, []).append(sw)
        return [self._record(row, tuple(links.get(row["run_id"], ()))) for row in self.conn.execute(sql, args)]

    def get(self, run_id: str) -> RunRecord | None:
        row = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            return None
        sweeps = tuple(r[0] for r in self.conn.execute("SELECT sweep FROM run_sweeps WHERE run_id=?", (run_id,)))
        return self._record(row, sweeps)

    @staticmethod
    def _record(row: sqlite3.Row, sweeps: tuple[str, ...]) -> RunRecord:
        data = dict(row)
        data.pop("results", None)  # large: read on demand (results_of)
        for col in _JSON_COLUMNS:
            data[col] = json.loads(data[col]) if data[col] else ({} if col in ("params", "settings") else None)
        return RunRecord(**data, sweeps=sweeps)

    def insert_record(self, record: dict[str, Any], sweep: str | None = None) -> None:
        """Insert a complete row directly (tests, imports of runs made elsewhere)."""
        data = {k: (json.dumps(v, default=str) if k in _JSON_COLUMNS and v is not None else v)
                for k, v in record.items()}
        data.setdefault("params", "{}")
        data.setdefault("settings", "{}")
        data.setdefault("status", "complete")
        cols = ", ".join(data)
        with self.transaction():
            self.conn.execute(
                f"INSERT OR REPLACE INTO runs({cols}) VALUES ({', '.join('?' * len(data))})", tuple(data.values())
            )
            if sweep:
                self.conn.execute("INSERT OR IGNORE INTO run_sweeps(sweep, run_id) VALUES (?, ?)",
                                  (sweep, record["run_id"]))


def _stale(claimed_by: str, session: str, reclaim: bool) -> bool:
    """Whether a ``running`` claim may be taken over: not by a worker of this session; yes when its
    process on this host is gone, or with ``reclaim``."""
    host, _, rest = claimed_by.partition(":")
    pid_text, _, their_session = rest.partition(":")
    if their_session == session:
        return False
    if reclaim:
        return True
    if host != socket.gethostname():
        return False
    if pid_text == str(os.getpid()):
        return True  # an earlier session of this very process has ended
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        return False
    return False
