"""PNG plots: accuracy vs budget, accuracy vs TFLOPs (Pareto), accuracy vs cost with intervals (the demo),
head heatmaps.

Every plot colours a method with ``finepruner.report.colours.method_colour`` (one fixed colour per
registered method, a stable hash-chosen one for other names), so a method looks the same in every
figure, the bench's Pillow plot included. Several configurations of one method in one panel share its
colour and differ by marker and line style. Legends sit outside the axes (right of the panels; saved
with ``bbox_inches="tight"``), so they never cover a panel, a tick label or an axis label; x axes have
at most a few ticks with compact labels, so labels do not overlap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finepruner.report.colours import method_colour, method_name
from finepruner.report.tables import bench_order, bench_title, is_upper_bound, record_value, varying_label
from finepruner.sweep.store import RunRecord

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")
MAX_X_TICKS = 5


def label_styles(labels: Sequence[str]) -> dict[str, dict[str, str]]:
    """Matplotlib style keywords per label: the method's colour; labels of the same method get distinct
    markers and line styles, in the order they come."""
    seen: dict[str, int] = {}
    styles = {}
    for label in dict.fromkeys(labels):
        i = seen.get(method_name(label), 0)
        seen[method_name(label)] = i + 1
        styles[label] = {"color": method_colour(label), "marker": _MARKERS[i % len(_MARKERS)],
                         "linestyle": _LINESTYLES[(i // len(_MARKERS)) % len(_LINESTYLES)]}
    return styles


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def _compact_x_ticks(ax, integer: bool = False) -> None:
    """At most ``MAX_X_TICKS`` x ticks with 3-significant-digit labels (no offset or scientific notation)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_X_TICKS, integer=integer, min_n_ticks=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:.3g}"))


def budget_figure(records: Sequence[RunRecord], *, mme_metric: str = "perception"):
    """The figure of ``plot_budget`` (matplotlib ``Figure``, not closed), or None without pruned runs."""
    pruned = [r for r in records if not is_upper_bound(r) and r.tokens is not None]
    if not pruned:
        return None
    plt = _pyplot()
    benches = bench_order([r.benchmark for r in records])
    label = varying_label(pruned, exclude=("tokens",))
    styles = label_styles([label(r) for r in pruned])
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
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **styles[name])
        for r in records:
            if is_upper_bound(r) and r.benchmark == bench and record_value(r, mme_metric) is not None:
                ax.axhline(record_value(r, mme_metric), color=method_colour("vanilla"), linestyle="--", linewidth=1,
                           label="vanilla")
        ax.set_title(bench_title(bench, mme_metric))
        ax.set_xlabel("visual tokens")
        _compact_x_ticks(ax, integer=True)
        ax.grid(alpha=0.3)
    _finish_panels(fig, axes, len(benches))
    return fig


def plot_budget(records: Sequence[RunRecord], path: str | Path, *, mme_metric: str = "perception") -> Path | None:
    """One panel per benchmark: metric vs token budget, one line per method; vanilla dashed."""
    return _save(budget_figure(records, mme_metric=mme_metric), path)


def _finish_panels(fig, axes, used: int) -> None:
    """Hide unused panels and add one legend with every panel's distinct labels, right of the panels."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.tight_layout()
    if labels:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def _save(fig, path: str | Path, dpi: int = 100) -> Path | None:
    """Save ``fig`` (legend outside the axes included: ``bbox_inches="tight"``) and close it."""
    if fig is None:
        return None
    plt = _pyplot()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
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


def pareto_figure(records: Sequence[RunRecord], *, mme_metric: str = "perception", convention: str = "paper"):
    """The figure of ``plot_pareto`` (matplotlib ``Figure``, not closed), or None without FLOPs."""
    pts_all = [(r, run_tflops(r, convention), record_value(r, mme_metric)) for r in records]
    pts_all = [(r, x, y) for r, x, y in pts_all if x is not None and y is not None]
    if not pts_all:
        return None
    plt = _pyplot()
    benches = bench_order([r.benchmark for r, _, _ in pts_all])
    label = varying_label([r for r, _, _ in pts_all], exclude=("tokens",))
    styles = label_styles([label(r) for r, _, _ in pts_all])
    nrows, ncols = _grid(len(benches))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, bench in zip(axes.flat, benches):
        pts = [(r, x, y) for r, x, y in pts_all if r.benchmark == bench]
        names = list(dict.fromkeys(label(r) for r, _, _ in pts))
        for name in names:
            xs = [x for r, x, _ in pts if label(r) == name]
            ys = [y for r, _, y in pts if label(r) == name]
            ax.scatter(xs, ys, label=name, s=18, color=styles[name]["color"], marker=styles[name]["marker"])
        front = pareto_front([(x, y) for _, x, y in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], color="0.35", linestyle=":", linewidth=1,
                label="Pareto front")
        ax.set_title(bench_title(bench, mme_metric))
        ax.set_xlabel("TFLOPs / sample (" + ("papers' count" if convention == "paper" else "ours") + ")")
        _compact_x_ticks(ax)
        ax.grid(alpha=0.3)
    _finish_panels(fig, axes, len(benches))
    return fig


def plot_pareto(records: Sequence[RunRecord], path: str | Path, *, mme_metric: str = "perception",
                convention: str = "paper") -> Path | None:
    """One panel per benchmark: metric vs TFLOPs per sample, Pareto front drawn; runs without FLOPs skipped."""
    return _save(pareto_figure(records, mme_metric=mme_metric, convention=convention), path)


@dataclass(frozen=True)
class CostPoint:
    """One configuration of ``cost_figure``: its method, cost ``x``, value ``y`` with its interval
    ``[low, high]`` and a short annotation (e.g. the budget)."""

    method: str
    x: float
    y: float
    low: float
    high: float
    note: str = ""


def cost_figure(points: Sequence[CostPoint], *, xlabel: str, ylabel: str, title: str = "",
                reference: CostPoint | None = None, dodge: float = 0.004):
    """Value against cost with interval error bars, one line per method (its points in cost order,
    annotated); ``reference`` (vanilla) as a dashed horizontal line with its interval shaded, its cost in
    the legend (off the x range, which stays on the points). Points of equal cost are spread sideways by
    ``dodge`` of the x range per method, so that their bars stay apart (said in the axis label). Returns
    the matplotlib ``Figure`` (not closed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    methods = list(dict.fromkeys(p.method for p in points))
    xs = [p.x for p in points]
    span = (max(xs) - min(xs)) if xs else 0.0
    for i, method in enumerate(methods):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.x)
        shift = (i - (len(methods) - 1) / 2) * dodge * span
        x = [p.x + shift for p in mine]
        y = [p.y for p in mine]
        errors = [[p.y - p.low for p in mine], [p.high - p.y for p in mine]]
        colour = method_colour(method)
        ax.errorbar(x, y, yerr=errors, color=colour, marker="o", markersize=4, linewidth=1.2, elinewidth=0.9,
                    capsize=2, label=method)
        for xi, p in zip(x, mine):
            if p.note:
                ax.annotate(p.note, (xi, p.y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=colour)
    if reference is not None:
        colour = method_colour(reference.method)
        ax.axhspan(reference.low, reference.high, color=colour, alpha=0.08, linewidth=0)
        ax.axhline(reference.y, color=colour, linestyle="--", linewidth=0.9,
                   label=f"{reference.method} {reference.note}".strip())
    ax.set_xlabel(xlabel + (" (equal-cost points spread sideways)" if dodge and len(methods) > 1 else ""))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    _compact_x_ticks(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    return fig


def plot_cost(points: Sequence[CostPoint], path: str | Path, *, xlabel: str, ylabel: str, title: str = "",
              reference: CostPoint | None = None, dpi: int = 110) -> Path:
    """``cost_figure`` saved to ``path`` (PNG)."""
    fig = cost_figure(points, xlabel=xlabel, ylabel=ylabel, title=title, reference=reference)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


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
