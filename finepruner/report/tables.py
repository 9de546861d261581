"""Tables generated only from the results store (``finepruner report``).

* **Papers' layout** (``papers_tables``): one block per budget, rows = methods, columns = benchmarks in
  the LLaVA-1.5 order, plus ``Acc.`` = mean of the benchmark values with MME divided by 20 (perception,
  0-2000; ``--mme total`` divides the 0-2800 total by 28) and ``Rel.`` = mean over benchmarks of
  value / upper-bound value (the vanilla row), as in ``reported_results.md``. Acc./Rel. computed over
  fewer benchmarks than the table has are marked ``†``.
* **Head-ablation layout** (``head_tables``): one table per benchmark, rows = budget x heads, columns =
  strategies (with any other varying parameter, e.g. ``random seed=1``). Runs that do not depend on H
  (``all``, FastV) appear in every row of their budget.

Marks (both layouts): **bold** = best in its comparison group (a budget's benchmark column; a row of
the head table); ``≈`` = not significantly different from the best at 95% (paired bootstrap interval of
the difference contains 0); without per-question data no mark is given and the notes say so.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finepruner.sweep.store import RunRecord

TIED = "≈"
PARTIAL = "†"
NOT_SCORED = "sub."


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # CSV rows (raw values)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"* {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_value(r.get(k)) for k in keys})
    Path(path).write_text(buf.getvalue())


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(round(v, 6))
    return "" if v is None else v


def bench_order(names: Sequence[str]) -> list[str]:
    from finepruner.eval import benchmarks

    order = benchmarks.available()

    def key(spec: str) -> tuple[int, str]:
        name = spec.split(":")[0]
        return (order.index(name) if name in order else len(order), spec)

    return sorted(dict.fromkeys(names), key=key)


BENCH_TITLES = {"vqav2": "VQAv2", "gqa": "GQA", "vizwiz": "VizWiz", "sqa": "SQA-IMG", "textvqa": "TextVQA",
                "pope": "POPE", "mme": "MME", "mmbench": "MMB", "mmbench_cn": "MMB-CN", "mmvet": "MM-Vet"}


def bench_title(spec: str, mme_metric: str = "perception") -> str:
    name, _, split = spec.partition(":")
    title = BENCH_TITLES.get(name, name)
    if name == "mme":
        title += {"perception": "(P)", "total": "(P+C)", "cognition": "(C)"}.get(mme_metric, "")
    return f"{title} {split}" if split else title


def record_value(r: RunRecord, mme_metric: str = "perception") -> float | None:
    if r.benchmark.split(":")[0] == "mme":
        return r.metric_value(mme_metric)
    return r.value


def fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_SCORED
    return f"{value:.1f}" if spec.split(":")[0] == "mme" else f"{value:.2f}"


def varying_label(records: Sequence[RunRecord], exclude: Sequence[str]) -> Callable[[RunRecord], str]:
    """Label = the record's parameters (other than ``exclude``) whose values vary across ``records`` of
    the same method; methods with several configurations get ``key=value`` suffixes."""
    by_method: dict[str, list[RunRecord]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    varying: dict[str, list[str]] = {}
    for method, rs in by_method.items():
        keys = sorted({k for r in rs for k in r.params} - set(exclude))
        varying[method] = [k for k in keys if len({repr(r.params.get(k)) for r in rs}) > 1]

    def label(r: RunRecord) -> str:
        extra = [f"{k}={r.params[k]}" for k in varying[r.method] if k in r.params]
        return " ".join([r.method, *extra])

    return label


def constant_params(records: Sequence[RunRecord], exclude: Sequence[str]) -> list[str]:
    """Notes listing each method's parameters that are the same in every record of it."""
    by_method: dict[str, list[RunRecord]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    notes = []
    for method, rs in sorted(by_method.items()):
        keys = sorted({k for r in rs for k in r.params} - set(exclude))
        fixed = [f"{k}={rs[0].params[k]}" for k in keys
                 if all(k in r.params for r in rs) and len({repr(r.params.get(k)) for r in rs}) == 1]
        if fixed:
            notes.append(f"{method}: {', '.join(fixed)}")
    return notes


#: ``compare(a, b)`` -> a ``Comparison`` of b minus a, or None when per-question data is unavailable.
CompareFn = Callable[[RunRecord, RunRecord], Any]


def _mark_group(cells: dict[Any, tuple[RunRecord, float | None]], compare: CompareFn | None
                ) -> tuple[set[Any], dict[Any, Any]]:
    """Best keys of a comparison group and, for the others, their comparison with the (first) best."""
    scored = {k: v for k, (_, v) in cells.items() if v is not None and not math.isnan(v)}
    if not scored:
        return set(), {}
    top = max(scored.values())
    best = {k for k, v in scored.items() if v == top}
    comps: dict[Any, Any] = {}
    if compare is not None and len(scored) > 1:
        ref = cells[sorted(best, key=str)[0]][0]
        for k in scored:
            if k not in best:
                comps[k] = compare(ref, cells[k][0])
    return best, comps


def _decorate(text: str, is_best: bool, comp: Any) -> str:
    if is_best:
        return f"**{text}**"
    if comp is not None and not comp.significant:
        return f"{text} {TIED}"
    return text


def _comp_fields(comp: Any) -> dict[str, Any]:
    if comp is None:
        return {"diff_vs_best": None, "ci_low": None, "ci_high": None, "p_bootstrap": None,
                "mcnemar_p": None, "significant_vs_best": None}
    return {"diff_vs_best": comp.diff, "ci_low": comp.ci_low, "ci_high": comp.ci_high,
            "p_bootstrap": comp.p_bootstrap, "mcnemar_p": comp.mcnemar.p_exact if comp.mcnemar else None,
            "significant_vs_best": comp.significant}


def is_upper_bound(r: RunRecord) -> bool:
    return r.method in ("vanilla", "none") or (r.tokens is None and not r.params)


def papers_tables(records: Sequence[RunRecord], *, mme_metric: str = "perception",
                  compare: CompareFn | None = None, title: str = "") -> list[Table]:
    """The papers' layout (see the module docstring); one table per model."""
    tables = []
    by_model: dict[str, list[RunRecord]] = {}
    for r in records:
        by_model.setdefault(r.model_id, []).append(r)
    for model_id, rs in by_model.items():
        benches = bench_order([r.benchmark for r in rs])
        upper = {r.benchmark: r for r in rs if is_upper_bound(r)}
        pruned = [r for r in rs if not is_upper_bound(r)]
        label = varying_label(pruned, exclude=("tokens",))
        budgets = sorted({r.tokens for r in pruned if r.tokens is not None}, reverse=True)
        header = ["Method", *[bench_title(b, mme_metric) for b in benches], "Acc.", "Rel."]
        rows: list[list[str]] = []
        out_records: list[dict[str, Any]] = []
        partial_used = False

        def summary(values: dict[str, float | None], upper: dict[str, RunRecord] = upper,
                    benches: list[str] = benches) -> tuple[str, str, float | None, float | None, bool]:
            have = {b: v for b, v in values.items() if v is not None}
            if not have:
                return "—", "—", None, None, False
            scale = {"perception": 20.0, "total": 28.0, "cognition": 8.0}.get(mme_metric, 20.0)
            acc = sum(v / scale if b.split(":")[0] == "mme" else v for b, v in have.items()) / len(have)
            ratios = [v / ub for b, v in have.items()
                      if b in upper and (ub := record_value(upper[b], mme_metric))]
            rel = 100.0 * sum(ratios) / len(ratios) if ratios else None
            partial = len(have) < len(benches) or len(ratios) < len(benches)
            mark = PARTIAL if partial else ""
            return (f"{acc:.1f}{mark}", f"{rel:.1f}%{mark}" if rel is not None else "—", acc, rel, partial)

        if upper:
            values = {b: record_value(upper[b], mme_metric) if b in upper else None for b in benches}
            acc_s, rel_s, acc, rel, partial = summary(values)
            partial_used |= partial
            ub_tokens = next((r.params.get("tokens") for r in upper.values()), None)
            name = f"vanilla ({ub_tokens} tokens, upper bound)" if ub_tokens else "vanilla (upper bound)"
            rows.append([f"**{name}**", *[fmt(values[b], b) if b in upper else "—" for b in benches], acc_s, rel_s])
            for b in benches:
                if b in upper:
                    out_records.append({"model": model_id, "tokens": None, "method": "vanilla", "benchmark": b,
                                        "value": values[b], "run_id": upper[b].run_id, "best": None,
                                        **_comp_fields(None)})
            out_records.append({"model": model_id, "tokens": None, "method": "vanilla", "benchmark": "Acc.",
                                "value": acc})
            out_records.append({"model": model_id, "tokens": None, "method": "vanilla", "benchmark": "Rel.",
                                "value": rel})
        for tokens in budgets:
            block = [r for r in pruned if r.tokens == tokens]
            methods = list(dict.fromkeys(label(r) for r in block))
            cell: dict[tuple[str, str], RunRecord] = {(label(r), r.benchmark): r for r in block}
            rows.append([f"*{tokens} tokens*", *[""] * (len(benches) + 2)])
            marks: dict[str, tuple[set[Any], dict[Any, Any]]] = {}
            for b in benches:
                group = {m: (cell[(m, b)], record_value(cell[(m, b)], mme_metric)) for m in methods if (m, b) in cell}
                marks[b] = _mark_group(group, compare)
            for m in methods:
                values = {b: record_value(cell[(m, b)], mme_metric) if (m, b) in cell else None for b in benches}
                acc_s, rel_s, acc, rel, partial = summary(values)
                partial_used |= partial
                texts = []
                for b in benches:
                    if (m, b) not in cell:
                        texts.append("—")
                        continue
                    best, comps = marks[b]
                    texts.append(_decorate(fmt(values[b], b), m in best, comps.get(m)))
                    out_records.append({"model": model_id, "tokens": tokens, "method": m, "benchmark": b,
                                        "value": values[b], "run_id": cell[(m, b)].run_id, "best": m in best,
                                        **_comp_fields(comps.get(m))})
                out_records.append({"model": model_id, "tokens": tokens, "method": m, "benchmark": "Acc.",
                                    "value": acc})
                out_records.append({"model": model_id, "tokens": tokens, "method": m, "benchmark": "Rel.",
                                    "value": rel})
                rows.append([m, *texts, acc_s, rel_s])
        notes = [
            "Acc. = mean of the benchmark values with MME "
            + {"perception": "perception / 20", "total": "total / 28", "cognition": "cognition / 8"}.get(
                mme_metric, "/ 20") + "; Rel. = mean of per-benchmark ratios to the upper-bound row.",
            f"**bold** = best of the budget on that benchmark; {TIED} = not significantly different from the "
            "best (95% paired bootstrap)." if compare is not None else
            "**bold** = best of the budget on that benchmark; significance not computed (pass --data-root).",
        ]
        if partial_used:
            notes.append(f"{PARTIAL} computed over fewer benchmarks than the table has (missing, not scored "
                         "locally, or no upper bound).")
        if any(v is None for v in (record_value(r, mme_metric) for r in rs)):
            notes.append(f"{NOT_SCORED} = not scored locally (server or judge): see the run's submission file.")
        fixed = constant_params(pruned, exclude=("tokens",))
        if fixed:
            notes.append("Fixed parameters: " + "; ".join(fixed) + ".")
        tables.append(Table(f"{title or 'Results'}: {model_id}", header, rows, notes, out_records))
    return tables


def head_tables(records: Sequence[RunRecord], *, mme_metric: str = "perception",
                compare: CompareFn | None = None, title: str = "") -> list[Table]:
    """The head-ablation layout (see the module docstring); one table per model and benchmark."""
    tables = []
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        if r.tokens is not None:
            groups.setdefault((r.model_id, r.benchmark), []).append(r)
    for (model_id, bench) in sorted(groups, key=lambda k: (k[0], bench_order([x[1] for x in groups]).index(k[1]))):
        rs = groups[(model_id, bench)]
        extra = varying_label(rs, exclude=("tokens", "heads", "strategy"))

        def column(r: RunRecord, extra: Callable[[RunRecord], str] = extra) -> str:
            base = r.strategy or ("all" if r.method == "fastv" else r.method)
            if r.method not in ("finepruner", "fastv"):
                base = f"{r.method}:{base}" if r.strategy else r.method
            suffix = extra(r)[len(r.method):].strip()
            return f"{base} {suffix}".strip()

        columns = list(dict.fromkeys(column(r) for r in rs))
        heads_values = sorted({r.heads for r in rs if r.heads is not None}, reverse=True) or [None]
        budgets = sorted({r.tokens for r in rs}, reverse=True)
        header = ["tokens", "H", *columns]
        rows, out = [], []
        for tokens in budgets:
            for h in heads_values:
                group: dict[str, tuple[RunRecord, float | None]] = {}
                for r in rs:
                    if r.tokens == tokens and (r.heads == h or r.heads is None):
                        group.setdefault(column(r), (r, record_value(r, mme_metric)))
                if not group:
                    continue
                best, comps = _mark_group(group, compare)
                texts = []
                for c in columns:
                    if c not in group:
                        texts.append("—")
                        continue
                    rec, value = group[c]
                    texts.append(_decorate(fmt(value, bench), c in best, comps.get(c)))
                    out.append({"model": model_id, "benchmark": bench, "tokens": tokens, "heads": h, "column": c,
                                "value": value, "run_id": rec.run_id, "best": c in best, **_comp_fields(comps.get(c))})
                rows.append([str(tokens), "—" if h is None else str(h), *texts])
        notes = [
            f"**bold** = best in the row; {TIED} = not significantly different from the row's best (95% paired "
            "bootstrap)." if compare is not None else
            "**bold** = best in the row; significance not computed (pass --data-root).",
        ]
        if any(r.heads is None for r in rs):
            notes.append("Columns whose runs do not depend on H (all heads = FastV) repeat in every H row.")
        fixed = constant_params(rs, exclude=("tokens", "heads", "strategy"))
        if fixed:
            notes.append("Fixed parameters: " + "; ".join(fixed) + ".")
        name = f"{title + ': ' if title else ''}{bench_title(bench, mme_metric)} ({model_id})"
        tables.append(Table(name, header, rows, notes, out))
    return tables
