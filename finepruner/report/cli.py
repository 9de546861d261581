"""``finepruner report``: markdown/CSV tables and PNG plots from the results store only (docs/sweeps.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="tables (markdown, CSV) and plots (PNG) from the results store",
        description="Generate the papers' layout and the head-ablation layout from the results store, with "
        "differences that are not significant at 95% flagged (needs --data-root for per-question scores).",
    )
    p.add_argument("--runs", default="runs", help="runs folder holding results.sqlite (default: runs)")
    p.add_argument("--store", help="results store file (default: <runs>/results.sqlite)")
    p.add_argument("--sweep", action="append", help="only runs of this sweep (repeatable; see --list)")
    p.add_argument("--model-id", help="only runs of this model")
    p.add_argument("--layout", choices=("auto", "papers", "heads", "both"), default="auto",
                   help="auto: the papers' layout of every method, plus the head-ablation layout when the "
                   "runs compare several head counts or strategies")
    p.add_argument("--out", help="output folder (default: <runs>/report[/<sweep>])")
    p.add_argument("--data-root", help="LLaVA's playground/data/eval folder: enables significance marks")
    p.add_argument("--mme", choices=("perception", "total", "cognition"), default="perception",
                   help="MME number in the tables (papers: perception; SparseVLM v1: total)")
    p.add_argument("--flops", choices=("paper", "ours"), default="paper",
                   help="TFLOPs convention of the Pareto plot (papers' count, or ours: multiply-add = 2)")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--list", action="store_true", help="list the sweeps and run counts in the store")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="print the paired comparison (B minus A) of two runs as JSON (needs --data-root)")
    p.set_defaults(func=run_report)


def _store_path(args: argparse.Namespace) -> Path:
    from finepruner.sweep.store import DEFAULT_NAME

    return Path(args.store) if args.store else Path(args.runs) / DEFAULT_NAME


def generate_report(store: Any, out: Path, *, sweeps: list[str] | None = None, model_id: str | None = None,
                    layout: str = "auto", data_root: str | None = None, mme_metric: str = "perception",
                    flops: str = "paper", resamples: int | None = None, seed: int = 0,
                    plots: bool = True) -> dict[str, list[Path]]:
    """Write ``report.md``, CSVs and PNGs for the selected runs; returns the files written by kind."""
    from finepruner.report import plots as plot_lib
    from finepruner.report.compare import REPORT_RESAMPLES, Comparer
    from finepruner.report.tables import head_tables, papers_tables, write_csv

    records = []
    seen = set()
    for sweep in sweeps or [None]:
        for r in store.runs(sweep=sweep, model_id=model_id):
            if r.run_id not in seen:
                seen.add(r.run_id)
                records.append(r)
    written: dict[str, list[Path]] = {"markdown": [], "csv": [], "png": []}
    if not records:
        return written
    out.mkdir(parents=True, exist_ok=True)
    comparer = (Comparer(store, data_root, mme_metric=mme_metric, resamples=resamples or REPORT_RESAMPLES,
                         seed=seed) if data_root else None)
    heads_like = [r for r in records if r.heads is not None or r.strategy is not None]
    if layout == "auto":
        layout = "both" if is_head_ablation(heads_like) else "papers"
    title = ", ".join(sweeps) if sweeps else "all runs"
    parts = [f"# finepruner report: {title}", "",
             f"Generated from `{store.path.name}` ({len(records)} complete runs). Values are the benchmarks' "
             "official metrics as scored by finepruner; nothing here is typed by hand.", ""]
    if comparer is not None:
        parts.append(f"Significance: paired bootstrap, {comparer.resamples} resamples, seed {seed}, 95% "
                     "percentile interval; McNemar's exact test in the CSV where outcomes are binary.\n")
    if layout in ("papers", "both"):
        tables = papers_tables(records, mme_metric=mme_metric, compare=comparer, title=title)
        parts += ["## Papers' layout", ""] + [t.markdown() for t in tables]
        path = out / "papers.csv"
        write_csv(path, [row for t in tables for row in t.records])
        written["csv"].append(path)
    htables = []
    if layout in ("heads", "both"):
        htables = head_tables(heads_like or records, mme_metric=mme_metric, compare=comparer, title=title)
        parts += ["## Head-selection ablation", ""] + [t.markdown() for t in htables]
        path = out / "heads.csv"
        write_csv(path, [row for t in htables for row in t.records])
        written["csv"].append(path)
    if comparer is not None and comparer.problems:
        parts += ["## Runs without per-question scores", ""]
        parts += [f"* `{k}`: {v}" for k, v in sorted(comparer.problems.items())] + [""]
    if plots:
        plot_dir = out / "plots"
        plot_dir.mkdir(exist_ok=True)
        made = [plot_lib.plot_budget(records, plot_dir / "accuracy_vs_budget.png", mme_metric=mme_metric),
                plot_lib.plot_pareto(records, plot_dir / "accuracy_vs_tflops.png", mme_metric=mme_metric,
                                     convention=flops)]
        made += plot_lib.plot_head_heatmaps(htables, plot_dir) if htables else []
        written["png"] = [p for p in made if p is not None]
        if written["png"]:
            parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in written["png"]] + [""]
    md = out / "report.md"
    md.write_text("\n".join(parts))
    written["markdown"].append(md)
    return written


def is_head_ablation(records: list[Any]) -> bool:
    """Whether the head-selecting runs compare head sets: some method has more than one (heads,
    strategy) configuration at one budget on one benchmark. One fixed head configuration per method (e.g.
    FinePruner-Head H=16 in configs/eval.yaml) is just another method of the papers' table."""
    configs: dict[tuple[Any, ...], set[tuple[Any, Any]]] = {}
    for r in records:
        configs.setdefault((r.model_id, r.method, r.tokens, r.benchmark), set()).add((r.heads, r.strategy))
    return any(len(v) > 1 for v in configs.values())


def write_report_atomically(out: Path, write: Any) -> dict[str, list[Path]]:
    """Call ``write(folder)`` on a fresh temporary folder next to ``out``, then move the files it wrote
    into ``out`` (``report.md`` last). An interrupted or failed report (Ctrl-C included) removes the
    temporary folder and leaves ``out`` as it was: no empty or half-written folder; files of ``out`` that
    the report does not write are never touched."""
    import os
    import shutil
    import tempfile

    base = next(p for p in (out.absolute(), *out.absolute().parents) if p.is_dir() and p != out.absolute())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=base))
    try:
        written = write(tmp)
        if not written["markdown"]:
            return written
        files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.name == "report.md")
        out.mkdir(parents=True, exist_ok=True)
        for path in files:
            dest = out / path.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {kind: [out / p.relative_to(tmp) for p in paths] for kind, paths in written.items()}


def _check_args(args: argparse.Namespace) -> str | None:
    """The first invalid argument, as a message, or None."""
    if args.resamples is not None and args.resamples < 1:
        return f"--resamples {args.resamples}: must be an integer >= 1 (default 2000)"
    if args.seed < 0:
        return f"--seed {args.seed}: must be a non-negative integer"
    if args.data_root is not None and not Path(args.data_root).is_dir():
        return f"--data-root {args.data_root}: not a folder (LLaVA's playground/data/eval)"
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out}: is a file; pass a folder for report.md, the CSVs and plots/"
    store = _store_path(args)
    if store.is_dir():
        return f"{store}: is a folder, not a results store file (pass --runs FOLDER or --store FILE)"
    return None


def run_report(args: argparse.Namespace) -> int:
    from finepruner.sweep.store import ResultsStore, StoreError

    problem = _check_args(args)
    if problem:
        print(f"finepruner report: error: {problem}", file=sys.stderr)
        return 2
    path = _store_path(args)
    try:
        store = ResultsStore(path, create=False)
    except StoreError as err:
        print(f"finepruner report: error: {err}", file=sys.stderr)
        return 2
    with store:
        unknown = [s for s in args.sweep or [] if s not in store.sweeps()]
        if unknown and not args.list:
            print(f"finepruner report: error: --sweep {', '.join(unknown)}: not in {path}; sweeps: "
                  f"{', '.join(store.sweeps()) or 'none'}", file=sys.stderr)
            return 2
        if args.list:
            for sweep in store.sweeps():
                runs = store.runs(sweep=sweep, status=None)
                done = sum(r.status == "complete" for r in runs)
                print(f"{sweep}: {done}/{len(runs)} complete")
            return 0
        if args.compare:
            return _compare(store, args)
        name = "_".join(args.sweep) if args.sweep else "all"
        out = Path(args.out) if args.out else Path(args.runs) / "report" / name
        written = write_report_atomically(out, lambda folder: generate_report(
            store, folder, sweeps=args.sweep, model_id=args.model_id, layout=args.layout,
            data_root=args.data_root, mme_metric=args.mme, flops=args.flops, resamples=args.resamples,
            seed=args.seed, plots=not args.no_plots,
        ))
    if not written["markdown"]:
        print("finepruner report: no complete runs match", file=sys.stderr)
        return 1
    for kind in ("markdown", "csv", "png"):
        for p in written[kind]:
            print(p)
    return 0


def _compare(store: Any, args: argparse.Namespace) -> int:
    from finepruner.report.compare import Comparer
    from finepruner.sweep.stats import DEFAULT_RESAMPLES

    if not args.data_root:
        print("finepruner report --compare needs --data-root", file=sys.stderr)
        return 2
    a, b = (store.get(x) for x in args.compare)
    for rid, rec in zip(args.compare, (a, b)):
        if rec is None or rec.status != "complete":
            print(f"finepruner report: run {rid} is not a complete run in {store.path}", file=sys.stderr)
            return 2
    if a.benchmark != b.benchmark:
        print(f"finepruner report: {a.benchmark} vs {b.benchmark}: runs on different benchmarks", file=sys.stderr)
        return 2
    comparer = Comparer(store, args.data_root, mme_metric=args.mme, resamples=args.resamples or DEFAULT_RESAMPLES,
                        seed=args.seed)
    comp = comparer(a, b)
    if comp is None:
        print("finepruner report: " + "; ".join(comparer.problems.values()), file=sys.stderr)
        return 1
    print(json.dumps({"a": a.label, "b": b.label, **comp.as_dict()}, indent=2, default=str))
    return 0
