"""``finepruner demo``: every registered method at low budgets on the shipped toy models, compared at equal cost.

Runs vanilla and each method at 4 / 8 / 16 / 32 of 144 visual tokens (``DEMO_BUDGETS``) on each shipped toy
(``TOYS``: the toy LLaVA and the toy Qwen2.5-VL, both 144 visual tokens per scene) over a toy suite of
``DEMO_N`` images per benchmark, through the real loaders, generation and scorers. Prints one table: per
toy and configuration, the headline of each benchmark, the suite mean with its 95% bootstrap interval, the
layer-averaged visual tokens and the analytic language-model prefill GFLOPs per sample; then, per toy, the
spread between the best and the worst method at the lowest budget with its paired interval. Draws one
figure, a panel per toy: the suite mean against prefill GFLOPs with the intervals as error bars
(``docs/toy.md``). A method a family does not support is a "not reachable" row with the reason. The toys
run side by side in separate processes (``--jobs``, default 2 on a two-core machine).

Prefill FLOPs, not the budget, are the x axis: each method defines "N tokens" differently (kept after layer
K, entering the LLM, layer average), so equal N is not equal cost, while the FLOPs count what each
configuration computes (every layer's tokens, attention included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import finepruner
from finepruner.toy.evaluate import SuiteBootstrap, bootstrap_suite, json_row, run_grid, suite_visual_tokens
from finepruner.toy.suite import BENCHMARKS, DEFAULT_N, DEFAULT_SEED, build_default_suite, load_suite_meta

#: The shipped toys: name -> (table label, title); ``toy_checkpoint`` gives what ``load_model`` takes.
TOYS: dict[str, tuple[str, str]] = {
    "llava": ("llava", "toy LLaVA"),
    "qwen2_5_vl": ("qwen2.5", "toy Qwen2.5-VL"),
}


def toy_checkpoint(toy: str) -> str:
    """What ``finepruner.load_model`` (and ``run_grid``'s ``checkpoint``) takes for a shipped toy."""
    if toy == "llava":
        return "toy"
    from finepruner.toy.qwen_model import qwen_checkpoint_dir

    return str(qwen_checkpoint_dir())


#: Budgets of the demo, of the toy model's 144 visual tokens (2.8-22%; LLaVA's 64 of 576 is 11%).
DEMO_BUDGETS = (4, 8, 16, 32)
#: Images per benchmark (per MME subtask) of the demo's suite, the fixed small suite of the tests: at the
#: lowest budget the best and the worst method's 95% intervals are far apart, also without the baselines
#: (``docs/toy.md``), and the demo takes about 4 minutes on one core.
DEMO_N = DEFAULT_N
RESAMPLES = 2000
#: Baselines (random selection, plain pooling): the spread is also given without them.
CONTROLS = ("random", "pool")

#: What each toy runs when ``--methods`` / ``--budgets`` are not given: every method at ``DEMO_BUDGETS`` on
#: the toy LLaVA; on the toy Qwen2.5-VL (several times slower per configuration on CPU: 576 patches per
#: image through its tower, against 144 through the LLaVA's) the random control and two methods at 16
#: tokens (``docs/toy.md``).
TOY_DEFAULTS: dict[str, tuple[tuple[str, ...] | None, tuple[int, ...]]] = {
    "llava": (None, DEMO_BUDGETS),
    "qwen2_5_vl": (("random", "fastv", "divprune"), (16,)),
}


def chance_percent(chance: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Trivial answerers' headline metrics on the toy suite, in the table's units (MME as % of 800)."""
    return {
        "pope": chance["pope"]["mean_f1"],
        "gqa": chance["gqa"]["accuracy"],
        "mme": 100 * chance["mme"]["perception"] / 800,
        "mmbench": chance["mmbench"]["circular_accuracy"],
    }


def attach_intervals(rows: list[dict[str, Any]], resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple[SuiteBootstrap, list[dict[str, Any]]]:
    """Bootstrap the rows that ran (one joint paired bootstrap, ``bootstrap_suite``) and add to each its
    95% intervals, ``"interval": {bench | "mean": [low, high]}``; returns the bootstrap and those rows."""
    ran = [r for r in rows if "row" in r and "same_as" not in r]
    boot = bootstrap_suite(ran, resamples=resamples, seed=seed)
    for i, row in enumerate(ran):
        row["interval"] = {b: list(boot.interval(i, b)) for b in (*BENCHMARKS, "mean")}
    by_key = {(r["method"], r["tokens"]): r for r in ran}
    for row in rows:
        if "same_as" in row:
            row["interval"] = by_key[(row["method"], row["same_as"])]["interval"]
    return boot, ran


def spread_at(budget: int, boot: SuiteBootstrap, ran: list[dict[str, Any]],
              exclude: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Best and worst method by suite mean at ``budget`` (methods in ``exclude`` left out), the spread
    and its paired 95% interval (best minus worst on the same resamples); None with fewer than two."""
    at = [i for i, r in enumerate(ran) if r["tokens"] == budget and r["method"] not in exclude]
    if len(at) < 2:
        return None
    best = max(at, key=lambda i: ran[i]["row"]["mean"])
    worst = min(at, key=lambda i: ran[i]["row"]["mean"])
    low, high = boot.difference(worst, best)
    return {"budget": budget, "best": ran[best]["method"], "worst": ran[worst]["method"],
            "best_mean": ran[best]["row"]["mean"], "worst_mean": ran[worst]["row"]["mean"],
            "best_interval": ran[best]["interval"]["mean"], "worst_interval": ran[worst]["interval"]["mean"],
            "spread": ran[best]["row"]["mean"] - ran[worst]["row"]["mean"], "spread_interval": [low, high]}


def _interval(values: list[float]) -> str:
    return f"[{values[0]:.1f}, {values[1]:.1f}]"


def print_table(rows: list[dict[str, Any]], chance: dict[str, float]) -> None:
    """Headline (%) per benchmark, suite mean with its 95% interval, layer-averaged visual tokens and
    prefill GFLOPs per configuration."""
    head = (f"{'toy':<9}{'method':<11}{'tokens':>7}{'avg vis':>8}{'GFLOPs':>8}"
            + "".join(f"{b:>9}" for b in BENCHMARKS) + f"{'mean':>7}  95% interval")
    print(head)
    print("-" * len(head))
    print(f"{'-':<9}{'(chance)':<11}{'':>7}{'':>8}{'':>8}" + "".join(f"{chance[b]:>9.1f}" for b in BENCHMARKS))
    for row in rows:
        label = f"{TOYS[row.get('toy', 'llava')][0]:<9}{row['method']:<11}{row['tokens'] or '-':>7}"
        if "error" in row:
            print(f"{label}  not reachable on this model: {row['error'].split(';')[0]}")
            continue
        values = row["row"]
        same = f"  (same parameters as {row['same_as']})" if "same_as" in row else ""
        print(f"{label}{row['average_visual_tokens']:>8.1f}{row['prefill_gflops']:>8.3f}"
              + "".join(f"{values[b]:>9.1f}" for b in BENCHMARKS)
              + f"{values['mean']:>7.1f}  {_interval(row['interval']['mean'])}{same}")


def print_spread(spread: dict[str, Any] | None, what: str) -> None:
    if spread is None:
        return
    print(f"{what}, at {spread['budget']} tokens: best {spread['best']} {spread['best_mean']:.1f} "
          f"{_interval(spread['best_interval'])}, worst {spread['worst']} {spread['worst_mean']:.1f} "
          f"{_interval(spread['worst_interval'])}; spread {spread['spread']:.1f}, paired 95% interval "
          f"{_interval(spread['spread_interval'])}")


def cost_points(rows: list[dict[str, Any]], num_visual: int) -> tuple[list[Any], Any]:
    """One toy's rows as ``CostPoint``s (each annotated with its budget(s)) and the vanilla reference."""
    from finepruner.report.plots import CostPoint

    notes: dict[tuple[str, int | None], list[str]] = {}
    for r in rows:
        if "row" in r:
            notes.setdefault((r["method"], r.get("same_as", r["tokens"])), []).append(str(r["tokens"]))
    points, reference = [], None
    for r in rows:
        if "row" not in r or "same_as" in r:
            continue
        point = CostPoint(method=r["method"], x=r["prefill_gflops"], y=r["row"]["mean"], low=r["interval"]["mean"][0],
                          high=r["interval"]["mean"][1], note="/".join(notes[(r["method"], r["tokens"])]))
        if r["method"] == "vanilla":
            reference = CostPoint(method="vanilla", x=point.x, y=point.y, low=point.low, high=point.high,
                                  note=f"({num_visual} tokens, {point.x:.3f} GFLOPs; 95% interval shaded)")
        else:
            points.append(point)
    return points, reference


def plot(panels: list[tuple[str, list[dict[str, Any]]]], path: Path, num_visual: int, n: int) -> None:
    """One figure, a panel per toy (shared y axis): the suite mean against prefill GFLOPs with 95% intervals,
    one colour per method (the same in every panel), vanilla as the dashed reference."""
    from finepruner.report.plots import cost_figure

    if len(panels) == 1:
        from finepruner.report.plots import plot_cost

        title, rows = panels[0]
        points, reference = cost_points(rows, num_visual)
        plot_cost(points, path, xlabel="language-model prefill GFLOPs per sample (analytic)",
                  ylabel="toy suite mean accuracy (%), 95% interval",
                  title=f"finepruner demo: {title}, {n} images per benchmark; labels = token budget",
                  reference=reference)
        return
    # cost_figure draws one panel per figure: render each and place them side by side in one image
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    images = []
    for title, rows in panels:
        points, reference = cost_points(rows, num_visual)
        fig = cost_figure(points, xlabel="language-model prefill GFLOPs per sample (analytic)",
                          ylabel="toy suite mean accuracy (%), 95% interval",
                          title=f"{title}, {n} images per benchmark; labels = token budget", reference=reference)
        ax = fig.axes[0]
        ax.set_ylim(0, 100)
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=110, bbox_inches="tight")
        plt.close(fig)
        buffer.seek(0)
        images.append(Image.open(buffer).convert("RGB"))
    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    canvas.save(path)


def toy_rows(toy: str, root: str, methods: list[str], budgets: tuple[int, ...], threads: int,
             progress: bool) -> tuple[int, list[dict[str, Any]]]:
    """One toy's grid (``run_grid``) on the suite at ``root``, with ``threads`` torch threads: its visual
    tokens per image and its rows. A top-level function, so that ``--jobs`` can run it in a child process."""
    import torch

    torch.set_num_threads(threads)
    checkpoint = toy_checkpoint(toy)
    model, processor = finepruner.load_model(checkpoint)
    rows = run_grid(model, processor, root, methods, budgets, checkpoint=checkpoint, progress=progress)
    return suite_visual_tokens(model, processor, root), [{"toy": toy, **row} for row in rows]


def run_toys(toys: list[str], root: str, plans: dict[str, tuple[list[str], tuple[int, ...]]], threads: int,
             jobs: int) -> dict[str, tuple[int, list[dict[str, Any]]]]:
    """``toy_rows`` of every toy; with ``jobs`` > 1 the toys after the first run side by side in child
    processes (spawned: each loads its own model; the first toy's progress bar is the one shown), the
    same rows as one after the other (each configuration is computed the same way in either process)."""
    if jobs <= 1 or len(toys) == 1:
        return {toy: toy_rows(toy, root, *plans[toy], threads, True) for toy in toys}
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(min(jobs, len(toys)) - 1, mp_context=get_context("spawn")) as pool:
        later = {toy: pool.submit(toy_rows, toy, root, *plans[toy], threads, False) for toy in toys[1:]}
        results = {toys[0]: toy_rows(toys[0], root, *plans[toys[0]], threads, True)}
        results.update({toy: future.result() for toy, future in later.items()})
    return results


def run(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    if out.is_dir():
        print(f"finepruner demo: --out {out} is a folder; give a PNG file name", file=sys.stderr)
        return 2
    if args.json and Path(args.json).is_dir():
        print(f"finepruner demo: --json {args.json} is a folder; give a file name", file=sys.stderr)
        return 2
    unknown = sorted(set(args.methods or ()) - set(finepruner.methods.available()))
    if unknown:
        print(f"finepruner demo: --methods: unknown method(s) {', '.join(unknown)}; allowed: "
              f"{', '.join(finepruner.methods.available())}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    start = time.time()
    toys = list(dict.fromkeys(args.toys))
    plans: dict[str, tuple[list[str], tuple[int, ...]]] = {}
    for toy in toys:
        default_methods, default_budgets = TOY_DEFAULTS[toy]
        methods = args.methods or default_methods or finepruner.methods.available()
        plans[toy] = (["vanilla", *[m for m in methods if m != "vanilla"]],
                      tuple(args.budgets) if args.budgets else default_budgets)
    rows: list[dict[str, Any]] = []
    num_visual: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="finepruner-demo-") as tmp:  # the suite lives for the run only
        root = build_default_suite(Path(tmp), n=args.n, seed=args.seed)
        suite_meta = load_suite_meta(root)
        for toy, (visual, found) in run_toys(toys, str(root), plans, args.threads, args.jobs).items():
            num_visual[toy] = visual
            rows.extend(found)
    chance = chance_percent(suite_meta["chance"])
    boots = {}
    for toy in toys:  # one paired bootstrap per toy (its rows share the draws)
        boots[toy] = attach_intervals([r for r in rows if r["toy"] == toy], args.resamples, args.bootstrap_seed)
    meta = suite_meta["benchmarks"]
    sizes = ", ".join(f"{meta[b]['questions']} {b}" for b in BENCHMARKS)
    print("\n" + " and ".join(f"{TOYS[t][1]} ({num_visual[t]} visual tokens)" for t in toys)
          + f", toy suite n={args.n} seed={args.seed} ({sizes} questions); headline metrics in %; mean = mean "
          f"of the four, 95% interval from {args.resamples} bootstrap resamples; GFLOPs = analytic "
          "language-model prefill per sample")
    print_table(rows, chance)
    spreads: dict[str, list[dict[str, Any] | None]] = {}
    print()
    for toy in toys:
        boot, ran = boots[toy]
        lowest = min(plans[toy][1])
        spreads[toy] = [spread_at(lowest, boot, ran), spread_at(lowest, boot, ran, exclude=CONTROLS)]
        print_spread(spreads[toy][0], f"{TOYS[toy][1]}, all methods")
        if spreads[toy][1] is not None and spreads[toy][1] != spreads[toy][0]:
            print_spread(spreads[toy][1], f"{TOYS[toy][1]}, without the baselines ({', '.join(CONTROLS)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot([(TOYS[t][1], [r for r in rows if r["toy"] == t]) for t in toys], out, num_visual[toys[0]], args.n)
    print(f"\nwrote {out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        first = toys[0]
        Path(args.json).write_text(json.dumps({
            "n": args.n, "seed": args.seed, "budgets": list(plans[toys[0]][1]),
            "plans": {t: {"methods": plans[t][0], "budgets": list(plans[t][1])} for t in toys},
            "resamples": args.resamples,
            "bootstrap_seed": args.bootstrap_seed, "toys": toys, "visual_tokens": num_visual,
            "rows": [json_row(r) for r in rows],
            "spread_at_lowest_budget": spreads[first][0], "spread_without_baselines": spreads[first][1],
            "spreads": {t: {"all": spreads[t][0], "without_baselines": spreads[t][1]} for t in toys},
        }, indent=1) + "\n")
        print(f"wrote {args.json}")
    print(f"{sum(len(boots[t][1]) for t in toys)} configurations run in {time.time() - start:.0f} s")
    return 0


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="every method at four low budgets on the embedded toy models")
    parser.add_argument("--toys", nargs="+", choices=sorted(TOYS), default=list(TOYS),
                        help="which shipped toys to run (default: both, one table and one figure)")
    parser.add_argument("--methods", nargs="*", help="methods to run (default: every registered method on the "
                                                     "toy LLaVA; random, fastv and divprune on the toy Qwen2.5-VL)")
    parser.add_argument("--budgets", nargs="+", type=_positive, default=None,
                        help=f"visual-token budgets, as each method defines them (default {list(DEMO_BUDGETS)} on "
                             "the toy LLaVA, 16 on the toy Qwen2.5-VL)")
    parser.add_argument("--n", type=_positive, default=DEMO_N,
                        help=f"toy suite images per benchmark (default {DEMO_N})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="toy suite seed")
    parser.add_argument("--resamples", type=_positive, default=RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch CPU threads (default 1: the toy model gains little from more, and a second "
                             "thread slows it down many times on a busy machine)")
    parser.add_argument("--jobs", type=_positive, default=min(2, os.cpu_count() or 1),
                        help="toys run side by side in this many processes (default 2 where the machine has two "
                             "cores, else 1); the rows are the same either way")
    parser.add_argument("--out", default="demo_accuracy_vs_flops.png", help="PNG of accuracy vs prefill FLOPs")
    parser.add_argument("--json", default=None, help="also write every row, interval and the spread here")
    parser.set_defaults(func=run)
