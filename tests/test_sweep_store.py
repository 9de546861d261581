"""Results store: schema version, refusal of foreign/newer stores, migration, claims, relative paths."""

from __future__ import annotations

import sqlite3

import pytest

from finepruner.sweep import store as store_mod
from finepruner.sweep.config import parse_sweep
from finepruner.sweep.store import SCHEMA_VERSION, ResultsStore, StoreError


def _cells():
    sweep = parse_sweep({"name": "s", "benchmarks": ["pope"], "grid": [{"method": "fastv", "tokens": [64, 32]}]})
    return sweep.cells("m")


def test_new_store_schema_and_lifecycle(tmp_path):
    path = tmp_path / "runs" / "results.sqlite"
    cells = _cells()
    with ResultsStore(path) as st:
        assert st.schema_version == SCHEMA_VERSION
        st.register(cells, "s")
        st.register(cells, "s")  # idempotent
        assert st.counts()["pending"] == 2 and st.sweeps() == ["s"]
        rid = cells[0].run_id
        assert st.claim(rid, "session1")
        assert not st.claim(rid, "session1")  # held by this session
        assert st.claim(rid, "session2")  # an ended session of this very process
        run_dir = tmp_path / "runs" / cells[0].relative_dir()
        st.complete(rid, metrics={"headline": {"metric": "mean_f1", "value": 80.0}, "mean_f1": 80.0},
                    run_dir=run_dir, answers_path=run_dir / "pope" / "answers.jsonl", efficiency={"tflops": 1.0},
                    timing={"seconds": 2.0}, config={"x": 1}, version="v")
        assert not st.claim(rid, "session3")  # complete
        assert st.claim(rid, "session3", force=True)
        st.release(rid)
        assert st.status(rid) == "pending"
        st.fail(cells[1].run_id, "boom")
    with ResultsStore(path, create=False) as st:
        (rec,) = [r for r in st.runs(status=None) if r.run_id == cells[1].run_id]
        assert rec.status == "failed" and rec.error == "boom"
        assert st.runs() == []  # nothing complete
        assert st.get(cells[0].run_id).run_dir == cells[0].relative_dir()  # stored relative


def test_complete_record_roundtrip(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as st:
        cell = _cells()[0]
        st.register([cell], "s")
        st.claim(cell.run_id, "x")
        st.complete(cell.run_id, metrics={"headline": {"metric": "perception", "value": 1500.0}, "total": 1800.0},
                    run_dir=tmp_path / "d", answers_path=tmp_path / "d" / "a.jsonl", efficiency={"tflops": 1.5},
                    timing={}, config={}, version="0.1.0")
        (rec,) = st.runs(sweep="s")
        assert rec.value == 1500.0 and rec.metric_value("total") == 1800.0 and rec.efficiency == {"tflops": 1.5}
        assert rec.answers_path == "d/a.jsonl" and rec.sweeps == ("s",) and rec.code_version == "0.1.0"
        assert st.absolute(rec.answers_path) == tmp_path / "d" / "a.jsonl"


def test_foreign_and_newer_stores_are_refused(tmp_path):
    foreign = tmp_path / "other.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE results (cfg TEXT, score REAL)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not a finepruner results store of a known schema"):
        ResultsStore(foreign)
    newer = tmp_path / "newer.sqlite"
    ResultsStore(newer).close()
    con = sqlite3.connect(newer)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer than this finepruner"):
        ResultsStore(newer)
    text = tmp_path / "notes.sqlite"
    text.write_text("this is not a database " * 100)
    with pytest.raises(StoreError):
        ResultsStore(text)
    with pytest.raises(StoreError, match="not found"):
        ResultsStore(tmp_path / "missing.sqlite", create=False)


def test_older_schema_is_migrated_or_refused(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    ResultsStore(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION - 1 or 0}")
    con.commit()
    con.close()
    if SCHEMA_VERSION - 1 == 0:  # version 0 = unknown: refused with a clear message
        with pytest.raises(StoreError, match="known schema"):
            ResultsStore(path)
    # a registered migration from an older version is applied and recorded
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=f"cannot migrate to {SCHEMA_VERSION + 1}"):
        ResultsStore(path)
    calls = []
    monkeypatch.setitem(store_mod.MIGRATIONS, SCHEMA_VERSION,
                        lambda conn: (calls.append(1), conn.execute("ALTER TABLE runs ADD COLUMN notes TEXT")))
    with ResultsStore(path) as st:
        assert st.schema_version == SCHEMA_VERSION + 1 and calls == [1]
        cols = [r[1] for r in st.conn.execute("PRAGMA table_info(runs)")]
        assert "notes" in cols


def test_version_1_store_gains_the_results_column_and_old_runs_are_rescored(tmp_path):
    """A store written before per-question results were kept: migrated in place; its runs have no stored
    results, so the report scores their answers file again (``run_question_scores``)."""
    import json

    from eval_fixtures import make_pope

    from finepruner.eval import benchmarks
    from finepruner.sweep.scores import run_question_scores

    root = tmp_path / "data"
    make_pope(root)
    samples = benchmarks.get("pope").load(root)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": s.question_id, "prompt": s.prompt,
                                           "text": "Yes" if i % 2 else "No"}) + "\n" for i, s in enumerate(samples)))
    path = tmp_path / "v1.sqlite"
    con = sqlite3.connect(path)
    con.executescript(store_mod._SCHEMA.replace(",\n    results BLOB", ""))
    con.execute("PRAGMA user_version=1")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO runs(run_id, model_id, method, benchmark, params, settings, status, answers_path) "
                "VALUES ('old', 'm', 'fastv', 'pope', '{}', '{}', 'complete', ?)", (str(answers),))
    con.commit()
    assert "results" not in [r[1] for r in con.execute("PRAGMA table_info(runs)")]
    con.close()
    with ResultsStore(path) as st:
        assert st.schema_version == SCHEMA_VERSION == 2
        assert "results" in [r[1] for r in st.conn.execute("PRAGMA table_info(runs)")]
        record = st.get("old")
        assert st.results_of("old") is None
        units = run_question_scores(record, st, root)
        assert len(units.keys) == len(samples)
        st.complete("old", metrics={"headline": {"metric": "mean_f1", "value": 1.0}}, run_dir=tmp_path,
                    answers_path=None, efficiency=None, timing=None, config=None, version="v",
                    results={"benchmark": "pope", "values": []})
        assert st.results_of("old") == {"benchmark": "pope", "values": []}
