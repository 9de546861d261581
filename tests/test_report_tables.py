"""Report tables from a synthetic store, checked cell by cell; CSV; plots; the report CLI."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
from eval_fixtures import make_gqa
from PIL import Image

from finepruner.cli import main
from finepruner.report.plots import pareto_front
from finepruner.report.tables import head_tables, papers_tables
from finepruner.sweep.store import ResultsStore

# (method, tokens, params, benchmark, value, extra metrics)
PAPER_ROWS = [
    ("vanilla", None, {}, "gqa", 60.0, {}),
    ("vanilla", None, {}, "pope", 80.0, {}),
    ("vanilla", None, {}, "mme", 1500.0, {"total": 1800.0}),
    ("fastv", 128, {"budget": "average"}, "gqa", 54.0, {}),
    ("fastv", 128, {"budget": "average"}, "pope", 72.0, {}),
    ("fastv", 128, {"budget": "average"}, "mme", 1350.0, {"total": 1650.0}),
    ("pdrop", 128, {}, "gqa", 57.0, {}),
    ("pdrop", 128, {}, "pope", 76.0, {}),
    ("pdrop", 128, {}, "mme", 1200.0, {"total": 1500.0}),
    ("fastv", 64, {"budget": "average"}, "gqa", 45.0, {}),
    ("fastv", 64, {"budget": "average"}, "pope", 48.0, {}),
]


def _insert(store, rows, sweep):
    for i, (method, tokens, params, bench, value, extra) in enumerate(rows):
        metric = {"gqa": "accuracy", "pope": "mean_f1", "mme": "perception"}.get(bench, "accuracy")
        p = dict(params)
        if tokens is not None:
            p["tokens"] = tokens
        store.insert_record({
            "run_id": f"{sweep}{i:04d}", "model_id": "llava", "method": method, "tokens": tokens,
            "heads": p.get("heads"), "strategy": p.get("strategy"), "benchmark": bench, "label": method,
            "params": p, "settings": {}, "status": "complete", "metric": metric, "value": value,
            "metrics": {"headline": {"metric": metric, "value": value}, metric: value, **extra},
            "efficiency": {"paper_tflops": 3.5 * (tokens or 576) / 576 + 0.3}, "run_dir": f"d{i}",
            "answers_path": f"d{i}/{bench}/answers.jsonl",
        }, sweep=sweep)


def test_papers_layout_cell_by_cell(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as st:
        _insert(st, PAPER_ROWS, "eval")
        (table,) = papers_tables(st.runs(sweep="eval"), title="eval")
    assert table.header == ["Method", "GQA", "POPE", "MME(P)", "Acc.", "Rel."]
    rows = {r[0]: r[1:] for r in table.rows}
    # upper bound: Acc = (60 + 80 + 1500/20) / 3 = 71.666..; Rel = 100%
    assert rows["**vanilla (upper bound)**"] == ["60.00", "80.00", "1500.0", "71.7", "100.0%"]
    order = [r[0] for r in table.rows]
    assert order == ["**vanilla (upper bound)**", "*128 tokens*", "fastv", "pdrop", "*64 tokens*", "fastv"]
    b128 = table.rows[2:4]
    # fastv 128: Acc = (54 + 72 + 67.5) / 3 = 64.5; Rel = (0.9 + 0.9 + 0.9) / 3 = 90.0%; best MME
    assert b128[0] == ["fastv", "54.00", "72.00", "**1350.0**", "64.5", "90.0%"]
    # pdrop 128: Acc = (57 + 76 + 60) / 3 = 64.333; Rel = (0.95 + 0.95 + 0.8) / 3 = 90.0%
    assert b128[1] == ["pdrop", "**57.00**", "**76.00**", "1200.0", "64.3", "90.0%"]
    # fastv 64 misses MME: Acc/Rel over 2 benchmarks, marked; (45 + 48) / 2 = 46.5; (0.75 + 0.6) / 2 = 67.5%
    assert table.rows[5] == ["fastv", "**45.00**", "**48.00**", "—", "46.5†", "67.5%†"]
    assert any("budget=average" in n for n in table.notes)  # fixed parameters listed, not in labels
    by = {(r["tokens"], r["method"], r["benchmark"]): r for r in table.records}
    assert by[(128, "fastv", "Acc.")]["value"] == pytest.approx(64.5)
    assert by[(128, "pdrop", "gqa")]["best"] is True and by[(128, "fastv", "gqa")]["best"] is False


def test_papers_layout_mme_total_and_marks():
    class Fake:
        def __init__(self, sig):
            self.significant, self.diff, self.ci_low, self.ci_high = sig, -1.0, -2.0, 0.5
            self.p_bootstrap, self.mcnemar = 0.3, None

    from finepruner.sweep.store import RunRecord

    def rec(i, method, tokens, bench, value, total=None):
        return RunRecord(run_id=str(i), model_id="m", method=method, tokens=tokens, heads=None, strategy=None,
                         benchmark=bench, label=method, params={"tokens": tokens} if tokens else {}, settings={},
                         status="complete", run_dir=None, answers_path=None, metric="perception", value=value,
                         metrics={"total": total} if total else {}, efficiency=None, timing=None, config=None,
                         code_version=None, claimed_by=None, started_at=None, finished_at=None, error=None)

    recs = [rec(0, "vanilla", None, "mme", 1500, 1862), rec(1, "fastv", 64, "mme", 1000, 1300),
            rec(2, "pdrop", 64, "mme", 1010, 1290), rec(3, "random", 64, "mme", 900, 1100)]
    marks = {"2": Fake(False), "3": Fake(True)}
    (t,) = papers_tables(recs, mme_metric="total", compare=lambda a, b: marks[b.run_id])
    assert t.header[1] == "MME(P+C)"
    assert t.rows[0][1:] == ["1862.0", f"{1862 / 28:.1f}", "100.0%"]
    assert t.rows[2] == ["fastv", "**1300.0**", f"{1300 / 28:.1f}", f"{100 * 1300 / 1862:.1f}%"]
    assert t.rows[3][1] == "1290.0 ≈"  # not significantly different from the best
    assert t.rows[4][1] == "1100.0"  # significantly different: no mark


def test_head_layout_cell_by_cell():
    from finepruner.sweep.store import RunRecord

    def rec(i, tokens, heads, strategy, value, seed=None, method="finepruner"):
        params = {"tokens": tokens, "budget": "average"}
        if heads is not None:
            params["heads"] = heads
        if strategy is not None:
            params["strategy"] = strategy
        if seed is not None:
            params["seed"] = seed
        return RunRecord(run_id=f"r{i}", model_id="m", method=method, tokens=tokens, heads=heads,
                         strategy=strategy, benchmark="pope", label="", params=params, settings={},
                         status="complete", run_dir=None, answers_path=None, metric="mean_f1", value=value,
                         metrics={}, efficiency=None, timing=None, config=None, code_version=None,
                         claimed_by=None, started_at=None, finished_at=None, error=None)

    recs = [
        rec(0, 192, 16, "sum", 76.0), rec(1, 192, 16, "sparsity", 77.0), rec(2, 192, None, "all", 75.0),
        rec(3, 192, 8, "sum", 74.0), rec(4, 192, 8, "sparsity", 73.0),
        rec(5, 192, 16, "random", 70.0, seed=0), rec(6, 192, 16, "random", 71.0, seed=1),
        rec(7, 64, 16, "sum", 40.0), rec(8, 64, 16, "sparsity", 40.0),
    ]
    seen = []

    def compare(a, b):
        seen.append((a.run_id, b.run_id))
        return SimpleNamespace(significant=b.run_id != "r0", diff=b.value - a.value, ci_low=-1.0, ci_high=1.0,
                               p_bootstrap=0.5, mcnemar=None)

    (t,) = head_tables(recs, compare=compare)
    assert t.header == ["tokens", "H", "sum", "sparsity", "all", "random seed=0", "random seed=1"]
    assert t.rows[0] == ["192", "16", "76.00 ≈", "**77.00**", "75.00", "70.00", "71.00"]
    assert t.rows[1] == ["192", "8", "**74.00**", "73.00", "75.00", "—", "—"][:2] + ["74.00", "73.00", "**75.00**",
                                                                                    "—", "—"]
    assert t.rows[2] == ["64", "16", "**40.00**", "**40.00**", "—", "—", "—"]  # tie: both best
    assert ("r1", "r0") in seen  # compared with the row's best
    assert any("repeat in every H row" in n for n in t.notes)
    assert any("budget=average" in n for n in t.notes)
    row = next(r for r in t.records if r["run_id"] == "r0" and r["heads"] == 16)
    assert row["significant_vs_best"] is False and row["diff_vs_best"] == -1.0


def test_pareto_front():
    pts = [(1.0, 50.0), (2.0, 60.0), (1.5, 45.0), (3.0, 59.0), (0.5, 40.0), (2.0, 55.0)]
    assert pareto_front(pts) == [(0.5, 40.0), (1.0, 50.0), (2.0, 60.0)]


def test_report_cli_end_to_end_with_significance(tmp_path, capsys):
    data = tmp_path / "data"
    make_gqa(data)
    runs = tmp_path / "runs"
    rows = [("vanilla", None, {}, "gqa", None, {}), ("fastv", 64, {}, "gqa", None, {}),
            ("pdrop", 64, {}, "gqa", None, {})]
    texts = [["yes", "red", "left"], ["yes", "red", "right"], ["no", "blue", "left"]]
    with ResultsStore(runs / "results.sqlite") as st:
        _insert(st, rows, "eval")
        for i, answers in enumerate(texts):
            path = runs / f"d{i}" / "gqa" / "answers.jsonl"
            path.parent.mkdir(parents=True)
            path.write_text("".join(json.dumps({"question_id": q, "prompt": "", "text": t}) + "\n"
                                    for q, t in zip(("201", "202", "203"), answers)))
            value = 100.0 * sum(a == b for a, b in zip(answers, ["yes", "red", "left"])) / 3
            st.conn.execute("UPDATE runs SET value=? WHERE run_id=?", (value, f"eval{i:04d}"))
    out = tmp_path / "rep"
    assert main(["report", "--runs", str(runs), "--sweep", "eval", "--data-root", str(data), "--out", str(out),
                 "--resamples", "200"]) == 0
    md = (out / "report.md").read_text()
    assert "| vanilla (upper bound)" in md.replace("**", "")
    assert "| fastv | **66.67** |" in md
    assert "| pdrop | 33.33 ≈ |" in md  # 3 questions: the difference is not significant
    with (out / "papers.csv").open() as fh:
        recs = list(csv.DictReader(fh))
    pd = next(r for r in recs if r["method"] == "pdrop" and r["benchmark"] == "gqa")
    assert pd["significant_vs_best"] == "False" and float(pd["diff_vs_best"]) == pytest.approx(-100 / 3)
    for name in ("accuracy_vs_budget.png", "accuracy_vs_tflops.png"):
        with Image.open(out / "plots" / name) as im:
            assert im.size[0] > 100
    assert main(["report", "--runs", str(runs), "--list"]) == 0
    assert "eval: 3/3 complete" in capsys.readouterr().out
    assert main(["report", "--runs", str(runs), "--compare", "eval0000", "eval0001", "--data-root", str(data),
                 "--resamples", "100"]) == 0
    comp = json.loads(capsys.readouterr().out)
    assert comp["diff"] == pytest.approx(-100 / 3) and comp["mcnemar"]["b"] == 1 and comp["n_units"] == 3
    assert main(["report", "--runs", str(tmp_path / "none")]) == 2


def test_head_heatmaps_written(tmp_path):
    from finepruner.report.cli import generate_report

    rows = [("finepruner", t, {"heads": h, "strategy": s, "budget": "average"}, "pope", v, {})
            for t, base in ((192, 75.0), (64, 40.0)) for h in (8, 16) for s, v in
            (("sum", base), ("sparsity", base + 1), ("random", base - 3))]
    rows.append(("finepruner", 192, {"strategy": "all", "budget": "average"}, "pope", 74.0, {}))
    with ResultsStore(tmp_path / "results.sqlite") as st:
        _insert(st, rows, "head_ablation")
        written = generate_report(st, tmp_path / "rep", sweeps=["head_ablation"])
    names = [p.name for p in written["png"]]
    assert any(n.startswith("heads_") for n in names)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Head-selection ablation" in md and "significance not computed" in md
    assert "| 192 | 16 | 75.00 | **76.00** | 72.00 | 74.00 |" in md
