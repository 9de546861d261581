"""Verdict tables and figures of the toy head-selection study (docs/head_study.md).

Reads the runs of ``configs/head_study_toy.yaml`` from a results store, scores every configuration's four
toy benchmarks from their stored per-question results, and runs one joint paired bootstrap per budget
(every configuration of a budget resampled with the same draws, each benchmark stratified by its own
units; the suite mean is the mean of the four headlines, MME as % of its maximum, as ``finepruner demo``).
Each configuration is compared with ``all`` (every head: FastV exactly) and with random heads at the same
H (the mean of the three seeds' resampled suite means). Writes ``head_study_results.md`` (tables) and
``head_study_<definitions>.png`` (heatmaps of the difference to ``all``) into ``--out``; with
``--heads-json`` / ``--query-json`` (``benchmarks/head_study_heads.py``) also the planted-head tables.

    python benchmarks/head_study_verdict.py --store runs/results.sqlite --data-root SUITE --out docs/head_study \
        [--heads-json heads_chosen.json] [--query-json query.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

BENCHES = ("pope", "gqa", "mme", "mmbench")
RESAMPLES = 2000
#: Configurations without head statistics (shared by both definitions).
CONTROLS = ("all", "random", "calibrated", "hawk")


def config_key(params: dict[str, Any]) -> tuple:
    """A configuration's identity without its benchmark: every parameter but the file of ``heads_from``
    (the calibrated control is one configuration whatever its path)."""
    items = []
    for k, v in sorted(params.items()):
        if k == "heads_from":
            v = "calibrated"
        items.append((k, json.dumps(v, sort_keys=True)))
    return tuple(items)


def label_of(params: dict[str, Any]) -> str:
    """A short row label: the strategy (``calibrated``, ``hawk``, ``random``), with ``+instr`` for
    ``query="instruction"``."""
    if params.get("weighting") == "hawk":
        name = "hawk"
    elif params.get("heads_from"):
        name = "calibrated"
    else:
        name = params.get("strategy", "sum")
    return name + ("+instr" if params.get("query") == "instruction" else "")


def load_configs(store_path: str, data_root: str, sweep: str,
                 benches: tuple[str, ...] = BENCHES) -> list[dict[str, Any]]:
    """Configurations of ``sweep`` and its ``original`` variant with every benchmark of ``benches``
    complete: params, label and per-benchmark units."""
    from finepruner.sweep.scores import run_question_scores
    from finepruner.sweep.store import ResultsStore

    store = ResultsStore(store_path, create=False)
    grouped: dict[tuple, dict[str, Any]] = defaultdict(dict)
    params_of: dict[tuple, dict[str, Any]] = {}
    records = {r.run_id: r for name in (sweep, f"{sweep}@original") for r in store.runs(sweep=name)}
    for record in records.values():
        params = {k: v for k, v in record.params.items()}
        key = config_key(params)
        params_of[key] = params
        grouped[key][record.benchmark] = record
    configs = []
    for key, records in grouped.items():
        if not set(benches) <= set(records):
            continue
        params = params_of[key]
        scores = {b: run_question_scores(records[b], store, data_root) for b in benches}
        configs.append({"params": params, "label": label_of(params), "scores": scores,
                        "definitions": params.get("definitions", "renormalised")})
    return configs


def point_estimate(config: dict[str, Any], benches: tuple[str, ...]) -> float:
    """The configuration's suite mean over ``benches`` in the table's units (MME as % of its maximum)."""
    from finepruner.toy.evaluate import _percent

    values = [_percent(b, np.array([config["scores"][b].value()]), config["scores"][b].strata)[0] for b in benches]
    return float(np.mean(values))


def budget_tables(configs: list[dict[str, Any]],
                  benches: tuple[str, ...] = BENCHES) -> dict[tuple[int, str], dict[str, Any]]:
    """Per (budget, definitions): the joint paired bootstrap and every row's point estimate, its
    difference to ``all`` and to random heads at the same H (observed difference and the 95% interval of
    the paired bootstrap)."""
    from finepruner.toy.evaluate import bootstrap_suite

    out = {}
    budgets = sorted({c["params"]["tokens"] for c in configs})
    for tokens in budgets:
        at = [c for c in configs if c["params"]["tokens"] == tokens]
        for definitions in ("renormalised", "original"):
            # the controls compute no head statistics: one run serves both definitions
            rows = [c for c in at if c["definitions"] == definitions
                    or (c["label"].split("+")[0] in CONTROLS and "definitions" not in c["params"])]
            ran_variant = definitions == "renormalised" or any(
                c["params"].get("definitions") == definitions for c in rows)
            if not ran_variant or not any(c["label"] == "all" for c in rows):
                continue
            boot = bootstrap_suite(rows, resamples=RESAMPLES, seed=0, benches=benches)
            mean = boot.values["mean"]
            points = np.array([point_estimate(c, benches) for c in rows])
            reference = next(i for i, c in enumerate(rows) if c["label"] == "all")
            random_by_h: dict[tuple[int, str], list[int]] = defaultdict(list)
            for i, c in enumerate(rows):
                if c["label"].startswith("random"):
                    random_by_h[(c["params"].get("heads"), c["params"].get("query", "last"))].append(i)
            entries = []
            for i, c in enumerate(rows):
                entry = {"label": c["label"], "heads": c["params"].get("heads"), "seed": c["params"].get("seed"),
                         "mean": float(points[i]),
                         "vs_all": _summary(points[i] - points[reference], mean[i] - mean[reference])}
                seeds = random_by_h.get((c["params"].get("heads"), c["params"].get("query", "last")))
                if seeds and not c["label"].startswith("random"):
                    entry["vs_random"] = _summary(points[i] - points[seeds].mean(),
                                                  mean[i] - mean[seeds].mean(axis=0))
                entries.append(entry)
            out[(tokens, definitions)] = {"rows": entries, "all": float(points[reference]),
                                          "all_interval": _interval(mean[reference])}
    return out


def _interval(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def _summary(observed: float, draws: np.ndarray) -> dict[str, Any]:
    low, high = _interval(draws)
    return {"diff": float(observed), "low": low, "high": high,
            "verdict": "better" if low > 0 else "worse" if high < 0 else "tie"}


def compact(table: dict[str, Any]) -> list[str]:
    """Strategy x H matrix of the difference to ``all`` (``+``/``−`` where the interval excludes 0) and,
    after the slash, the verdict against random heads (``>``/``<``)."""
    by = {(e["label"], e["heads"]): e for e in table["rows"] if e["heads"] is not None}
    labels = sorted({label for label, _ in by if not label.startswith("random")})
    lines = ["| strategy | H=1 | H=2 | H=4 | H=6 |", "|---|---|---|---|---|"]
    for label in labels:
        cells = []
        for h in (1, 2, 4, 6):
            e = by.get((label, h))
            if e is None:
                cells.append("–")
                continue
            mark = {"better": " +", "worse": " −"}.get(e["vs_all"]["verdict"], "")
            vr = e.get("vs_random")
            rmark = {"better": " / >r", "worse": " / <r"}.get(vr["verdict"], "") if vr else ""
            cells.append(f"{e['vs_all']['diff']:+.1f}{mark}{rmark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(tables: dict, heads_chosen: dict | None, query: dict | None) -> str:
    lines = ["# Head study: generated tables", "",
             "Generated by `benchmarks/head_study_verdict.py` (do not edit by hand). Suite mean of the four toy "
             "benchmarks; Δ = difference of suite means with its paired 95% bootstrap interval "
             f"({RESAMPLES} resamples); **better**/**worse**: the interval excludes 0.", "",
             "## Summary: difference to `all` (points); + / − significant; >r / <r better / worse than random "
             "heads at the same H", ""]
    for (tokens, definitions), table in sorted(tables.items()):
        lines += [f"**{tokens} tokens, {definitions} definitions** (`all` = {table['all']:.1f})", "",
                  *compact(table), ""]
    for (tokens, definitions), table in sorted(tables.items()):
        low, high = table["all_interval"]
        lines += [f"## {tokens} tokens, {definitions} definitions", "",
                  f"`all` (FastV): {table['all']:.1f} [{low:.1f}, {high:.1f}]", "",
                  "| strategy | H | seed | suite mean | Δ vs all [95%] | vs all | Δ vs random heads [95%] "
                  "| vs random |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in sorted(table["rows"], key=lambda e: (e["label"], e["heads"] or 0, e["seed"] or 0)):
            va = e["vs_all"]
            vr = e.get("vs_random")
            random_cells = (f"{vr['diff']:+.1f} [{vr['low']:+.1f}, {vr['high']:+.1f}] | {vr['verdict']}"
                            if vr else "– | –")
            lines.append(f"| {e['label']} | {e['heads'] if e['heads'] is not None else '–'} | "
                         f"{e['seed'] if e['seed'] is not None else '–'} | {e['mean']:.1f} | "
                         f"{va['diff']:+.1f} [{va['low']:+.1f}, {va['high']:+.1f}] | {va['verdict']} | "
                         f"{random_cells} |")
        lines.append("")
    if heads_chosen is not None:
        lines += ["## Which heads the strategies choose (layer 1; planted heads 0-3)", "",
                  f"Share of chosen heads that are planted (chance: {heads_chosen['chance_planted_share']:.2f}); "
                  "budget-aware selectors at each budget, the others at any budget.", "",
                  "| definitions | strategy | tokens | H=1 | H=2 | H=4 | H=6 |", "|---|---|---|---|---|---|---|"]
        cells: dict[tuple, dict[int, float]] = defaultdict(dict)
        for r in heads_chosen["rows"]:
            cells[(r["definitions"], r["strategy"], r["tokens"])][r["heads"]] = r["planted_share"]
        for (definitions, strategy, tokens), by_h in cells.items():
            values = " | ".join(f"{by_h[h]:.2f}" if h in by_h else "–" for h in (1, 2, 4, 6))
            lines.append(f"| {definitions} | {strategy} | {tokens} | {values} |")
        lines.append("")
    if query is not None:
        lines += ["## What layer 1 sees from the last prompt token and from the naming word", "",
                  f"{query['questions']} questions that name an object ({', '.join(query['qtypes'])}).", "",
                  "Share of each head's image attention on the named object:", "",
                  "| query | " + " | ".join(f"head {h}" for h in range(len(query["named_share"]["last"]))) + " |",
                  "|---|" + "---|" * len(query["named_share"]["last"])]
        for q, values in query["named_share"].items():
            lines.append(f"| {q} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        lines += ["", "Recall of the named object's patches among the top-B tokens:", "",
                  "| query | heads | B=4 | B=8 | B=16 | B=32 |", "|---|---|---|---|---|---|"]
        rec: dict[tuple, dict[int, float]] = defaultdict(dict)
        for r in query["recall"]:
            rec[(r["query"], r["heads"])][r["tokens"]] = r["recall"]
        for (q, heads), by_b in rec.items():
            lines.append(f"| {q} | {heads} | " + " | ".join(f"{by_b[b]:.2f}" for b in (4, 8, 16, 32)) + " |")
        lines.append("")
    return "\n".join(lines)


def heatmaps(tables: dict, out: Path) -> list[Path]:
    """One figure per definitions: a panel per budget, rows strategies, columns H, colour = Δ vs all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for definitions in ("renormalised", "original"):
        panels = sorted(t for (t, d) in tables if d == definitions)
        if not panels:
            continue
        labels = sorted({e["label"] for t in panels for e in tables[(t, definitions)]["rows"]
                         if e["heads"] is not None and not e["label"].startswith("random")})
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 0.32 * len(labels) + 1.5),
                                 squeeze=False)
        for ax, tokens in zip(axes[0], panels, strict=True):
            grid = np.full((len(labels), 4), np.nan)
            marks = {}
            for e in tables[(tokens, definitions)]["rows"]:
                if e["label"] in labels and e["heads"] in (1, 2, 4, 6):
                    i, j = labels.index(e["label"]), (1, 2, 4, 6).index(e["heads"])
                    grid[i, j] = e["vs_all"]["diff"]
                    marks[(i, j)] = {"better": "+", "worse": "−"}.get(e["vs_all"]["verdict"], "")
            im = ax.imshow(grid, cmap="RdBu", vmin=-6, vmax=6, aspect="auto")
            for (i, j), m in marks.items():
                ax.text(j, i, m, ha="center", va="center", fontsize=8)
            ax.set_xticks(range(4), ["1", "2", "4", "6"])
            ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels), fontsize=7)
            ax.set_xlabel("H (heads of 8)")
            ax.set_title(f"{tokens} of 144 tokens\nall = {tables[(tokens, definitions)]['all']:.1f}", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), label="suite mean − all (points)")
        fig.suptitle(f"Toy head study ({definitions} definitions): difference to all-head FastV; "
                     "+/− = 95% interval excludes 0", fontsize=9)
        path = out / f"head_study_{definitions}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--data-root", required=True, help="the toy suite the sweep ran on")
    parser.add_argument("--sweep", default="head_study_toy")
    parser.add_argument("--out", required=True, help="folder for head_study_results.md, JSON and figures")
    parser.add_argument("--heads-json", default=None)
    parser.add_argument("--query-json", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = load_configs(args.store, args.data_root, args.sweep)
    tables = budget_tables(configs)
    heads_chosen = json.loads(Path(args.heads_json).read_text()) if args.heads_json else None
    query = json.loads(Path(args.query_json).read_text()) if args.query_json else None
    (out / "head_study_results.md").write_text(markdown(tables, heads_chosen, query))
    (out / "head_study_results.json").write_text(json.dumps(
        {f"{t}:{d}": v for (t, d), v in tables.items()}, indent=1))
    for path in heatmaps(tables, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'head_study_results.md'} ({len(configs)} configurations)")


if __name__ == "__main__":
    main()
