"""PNG plots from the results store: accuracy vs budget, accuracy vs TFLOPs (Pareto), head heatmaps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finepruner.report.tables import bench_order, bench_title, is_upper_bound, record_value, varying_label
from finepruner.sweep.store import RunRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def plot_budget(records: Sequence[RunRecord], path: str | Path, *, mme_metric: str = "perception") -> Path | None:
    """One panel per benchmark: metric vs token budget, one line per method; vanilla dashed."""
    pruned = [r for r in records if not is_upper_bound(r) and r.tokens is not None]
    if not pruned:
        return None
    plt = _pyplot()
    benches = bench_order([r.benchmark for r in records])
    label = varying_label(pruned, exclude=("tokens",))
    nrows, ncols = _grid(len(benches))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, bench in zip(axes.flat, benches):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in pruned:
            v = record_value(r, mme_metric)
            if r.benchmark == bench and v is not None:
                lines.setdefault(label(r), []).append((r.tokens, v))
        for name, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for r in records:
            if is_upper_bound(r) and r.benchmark == bench and record_value(r, mme_metric) is not None:
                ax.axhline(record_value(r, mme_metric), color="k", linestyle="--", linewidth=1, label="vanilla")
        ax.set_title(bench_title(bench, mme_metric))
        ax.set_xlabel("visual tokens")
        ax.grid(alpha=0.3)
    return _finish_panels(plt, fig, axes, len(benches), path)


def _finish_panels(plt, fig, axes, used: int, path: str | Path) -> Path:
    """Hide unused panels, add one legend with every panel's distinct labels below them, save, close."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def run_tflops(r: RunRecord, convention: str = "paper") -> float | None:
    """TFLOPs per sample of a run's prefill: ``paper`` (the papers' count, multiply-add = 1, no LM head) or
    ``ours`` (language model, multiply-add = 2), from the stored efficiency figures."""
    eff = r.efficiency or {}
    key = "paper_tflops" if convention == "paper" else "tflops"
    value = eff.get(key)
    if value is None and isinstance(eff.get("flops"), dict):
        flops = eff["flops"]
        value = (flops.get("paper_tflops_per_sample") if convention == "paper"
                 else (flops.get("language_model") or 0) / max(1, flops.get("batch") or 1) / 1e12 or None)
    return float(value) if isinstance(value, (int, float)) else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated (no other point has fewer or equal FLOPs and a higher or equal value, one strictly),
    sorted by FLOPs."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(records: Sequence[RunRecord], path: str | Path, *, mme_metric: str = "perception",
                convention: str = "paper") -> Path | None:
    """One panel per benchmark: metric vs TFLOPs per sample, Pareto front drawn; runs without FLOPs skipped."""
    pts_all = [(r, run_tflops(r, convention), record_value(r, mme_metric)) for r in records]
    pts_all = [(r, x, y) for r, x, y in pts_all if x is not None and y is not None]
    if not pts_all:
        return None
    plt = _pyplot()
    benches = bench_order([r.benchmark for r, _, _ in pts_all])
    label = varying_label([r for r, _, _ in pts_all], exclude=("tokens",))
    nrows, ncols = _grid(len(benches))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, bench in zip(axes.flat, benches):
        pts = [(r, x, y) for r, x, y in pts_all if r.benchmark == bench]
        names = list(dict.fromkeys(label(r) for r, _, _ in pts))
        for name in names:
            xs = [x for r, x, _ in pts if label(r) == name]
            ys = [y for r, _, y in pts if label(r) == name]
            ax.scatter(xs, ys, label=name, s=18)
        front = pareto_front([(x, y) for _, x, y in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", linewidth=1, label="Pareto front")
        ax.set_title(bench_title(bench, mme_metric))
        ax.set_xlabel("TFLOPs / sample (" + ("papers' count" if convention == "paper" else "ours") + ")")
        ax.grid(alpha=0.3)
    return _finish_panels(plt, fig, axes, len(benches), path)


def plot_head_heatmaps(tables: Sequence[Any], out_dir: str | Path) -> list[Path]:
    """One PNG per head-ablation table (benchmark): a heatmap per budget, rows = H, columns = strategies,
    annotated with the values; the row's best is boxed, ``≈`` marks runs not significantly worse."""
    import numpy as np

    plt = _pyplot()
    out_dir = Path(out_dir)
    paths = []
    for i, table in enumerate(tables):
        recs = [r for r in table.records if r.get("value") is not None]
        if not recs:
            continue
        columns = list(dict.fromkeys(r["column"] for r in table.records))
        budgets = sorted({r["tokens"] for r in recs}, reverse=True)
        heads = sorted({r["heads"] for r in recs if r["heads"] is not None}, reverse=True) or [None]
        fig, axes = plt.subplots(1, len(budgets), figsize=(max(5, 0.9 * len(columns) + 1.5) * len(budgets) / 1.5,
                                                           0.6 * len(heads) + 2.2), squeeze=False)
        for ax, tokens in zip(axes.flat, budgets):
            grid = np.full((len(heads), len(columns)), np.nan)
            for r in recs:
                if r["tokens"] == tokens:
                    grid[heads.index(r["heads"]), columns.index(r["column"])] = r["value"]
            ax.imshow(grid, aspect="auto", cmap="viridis")
            for r in recs:
                if r["tokens"] != tokens:
                    continue
                y, x = heads.index(r["heads"]), columns.index(r["column"])
                text = f"{r['value']:.1f}" + (" ≈" if r.get("significant_vs_best") is False else "")
                ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white",
                        fontweight="bold" if r.get("best") else "normal")
                if r.get("best"):
                    ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(heads)), ["—" if h is None else str(h) for h in heads])
            ax.set_ylabel("H")
            ax.set_title(f"{tokens} tokens", fontsize=9)
        fig.suptitle(table.title, fontsize=10)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in table.title)[:80]
        path = out_dir / f"heads_{i:02d}_{safe}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
