"""Crash-safety of sweeps and of the results store (issue 12, item 3): a sweep killed with SIGKILL, between
two batches and inside the store's write of a finished cell, then resumed, ends with exactly what an
uninterrupted sweep stores: the same complete cells and values, answers neither lost nor duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from eval_fixtures import make_pope

from finepruner.cli import main
from finepruner.sweep.store import ResultsStore

CONFIG = """name: crash
benchmarks: [pope]
settings: {max_new_tokens: 2, batch_size: 2}
grid:
  - method: vanilla
  - method: fastv
    tokens: [16, 8]
    K: 1
"""

#: Runs the sweep CLI and kills its own process (SIGKILL: no cleanup of any kind) at the N-th call of
#: ``Generator.answer_batch`` ("batch") or inside the N-th ``ResultsStore.complete`` transaction, after its
#: UPDATE and before its COMMIT ("store").
DRIVER = """
import os, signal, sys
from finepruner.eval.runner import Generator
from finepruner.sweep.store import ResultsStore

mode, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]

def kill_at_n():
    calls[0] += 1
    return calls[0] == n

if mode == "batch":
    original = Generator.answer_batch
    def answer_batch(self, *args, **kwargs):
        if kill_at_n():
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    Generator.answer_batch = answer_batch
else:
    original = ResultsStore.complete
    def complete(self, run_id, **kwargs):
        if kill_at_n():
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("UPDATE runs SET status='complete', value=-1 WHERE run_id=?", (run_id,))
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, run_id, **kwargs)
    ResultsStore.complete = complete

from finepruner.cli import main
sys.exit(main(argv))
"""


def _args(tmp_path: Path, runs: str) -> list[str]:
    return ["sweep", str(tmp_path / "crash.yaml"), "--model", "toy", "--data-root", str(tmp_path / "data"),
            "--runs", str(tmp_path / runs), "--no-progress"]


def _killed(tmp_path: Path, mode: str, n: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), mode, str(n), *_args(tmp_path, "runs")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _answers(store: ResultsStore, run_id: str) -> list[tuple[object, str]]:
    path = store.absolute(store.get(run_id).answers_path)
    return [(r["question_id"], r["text"]) for r in map(json.loads, path.read_text().splitlines())]


def test_sweep_and_store_survive_sigkill(tmp_path):
    make_pope(tmp_path / "data")  # 6 questions: 3 batches of 2 per cell
    (tmp_path / "crash.yaml").write_text(CONFIG)
    (tmp_path / "driver.py").write_text(DRIVER)
    assert main(_args(tmp_path, "reference")) == 0

    _killed(tmp_path, "batch", 5)  # cell 1 done; cell 2 killed before its second batch
    with ResultsStore(tmp_path / "runs" / "results.sqlite") as store:
        statuses = [r.status for r in store.runs(status=None)]
        assert statuses == ["complete", "running", "pending"]
        second = store.runs(status=None)[1]
        assert len(store.absolute(second.run_dir).joinpath("pope", "answers.jsonl").read_text().splitlines()) == 2

    _killed(tmp_path, "store", 1)  # cell 2 answered in full, killed inside the store's write
    with ResultsStore(tmp_path / "runs" / "results.sqlite") as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rec = store.get(second.run_id)
        assert rec.status == "running" and rec.value is None  # the torn transaction left no trace

    assert main(_args(tmp_path, "runs")) == 0  # resume
    with ResultsStore(tmp_path / "reference" / "results.sqlite") as ref, \
            ResultsStore(tmp_path / "runs" / "results.sqlite") as store:
        expected = {r.run_id: r for r in ref.runs()}
        got = {r.run_id: r for r in store.runs()}
        assert sorted(got) == sorted(expected) and len(got) == 3
        for run_id, rec in got.items():
            assert rec.value == expected[run_id].value
            answers = _answers(store, run_id)
            assert answers == _answers(ref, run_id)  # same answers, same order, none twice
            assert len({qid for qid, _ in answers}) == len(answers) == 6
        assert got[second.run_id].timing["already_done"] == 6  # nothing regenerated after the store kill
        assert store.counts(list(got)) == {"pending": 0, "running": 0, "complete": 3, "failed": 0}
