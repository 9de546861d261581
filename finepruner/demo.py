"""``finepruner demo``: every registered method at three budgets on the shipped toy model.

Runs vanilla and each method at 16 / 32 / 48 of the toy model's 144 visual tokens (the fractions of
64 / 128 / 192 of LLaVA-1.5's 576) over the fixed small toy suite, through the real loaders, generation
and scorers; prints accuracy per benchmark and analytic prefill FLOPs per configuration, and writes a
PNG of accuracy versus budget per method (``docs/toy.md``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

import finepruner
from finepruner.toy.evaluate import BUDGETS, run_grid
from finepruner.toy.suite import BENCHMARKS, DEFAULT_N, DEFAULT_SEED, build_default_suite, load_suite_meta


def chance_percent(chance: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Trivial answerers' headline metrics on the toy suite, in the table's units (MME as % of 800)."""
    return {
        "pope": chance["pope"]["mean_f1"],
        "gqa": chance["gqa"]["accuracy"],
        "mme": 100 * chance["mme"]["perception"] / 800,
        "mmbench": chance["mmbench"]["circular_accuracy"],
    }


def print_table(rows: list[dict[str, Any]], chance: dict[str, float]) -> None:
    """Accuracy (%) per benchmark, their mean, visual tokens and prefill GFLOPs per configuration."""
    head = f"{'method':<11}{'tokens':>7}{'avg vis':>8}" + "".join(f"{b:>9}" for b in BENCHMARKS)
    print(head + f"{'mean':>8}{'GFLOPs':>9}")
    print("-" * len(head + " " * 17))
    print(f"{'(chance)':<11}{'':>7}{'':>8}" + "".join(f"{chance[b]:>9.1f}" for b in BENCHMARKS))
    for row in rows:
        label = f"{row['method']:<11}{row['tokens'] or '-':>7}"
        if "error" in row:
            print(f"{label}  not reachable on this model: {row['error'].split(';')[0]}")
            continue
        values = row["row"]
        print(f"{label}{row['average_visual_tokens']:>8.1f}" + "".join(f"{values[b]:>9.1f}" for b in BENCHMARKS)
              + f"{values['mean']:>8.1f}{row['prefill_gflops']:>9.3f}")


def plot(rows: list[dict[str, Any]], path: Path, num_visual: int) -> None:
    """Mean toy accuracy versus kept visual tokens, one line per method, vanilla as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    vanilla = next((r for r in rows if r["method"] == "vanilla" and "row" in r), None)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "vanilla"):
        points = sorted((r["tokens"], r["row"]["mean"]) for r in rows if r["method"] == method and "row" in r)
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
    if vanilla is not None:
        axis.axhline(vanilla["row"]["mean"], color="black", linestyle="--", label=f"vanilla ({num_visual} tokens)")
    axis.set_xlabel("token budget N (as each method defines it)")
    axis.set_ylabel("mean toy accuracy (%)")
    axis.set_title("finepruner demo: toy suite, accuracy vs budget")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model, processor = finepruner.load_model("toy")
    vision = model.config.vision_config
    num_visual = (vision.image_size // vision.patch_size) ** 2
    root = build_default_suite(Path(tempfile.mkdtemp(prefix="finepruner-demo-")), n=args.n, seed=args.seed)
    chance = chance_percent(load_suite_meta(root)["chance"])
    methods = args.methods or finepruner.methods.available()
    methods = ["vanilla", *[m for m in methods if m != "vanilla"]]
    rows = run_grid(model, processor, root, methods, tuple(args.budgets), progress=True)
    print(f"\ntoy LLaVA ({num_visual} visual tokens), fixed toy suite (n={args.n}, seed={args.seed}); "
          "headline metrics in %")
    print_table(rows, chance)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out, num_visual)
    print(f"\nwrote {out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="every method at three budgets on the embedded toy model")
    parser.add_argument("--methods", nargs="*", help="methods to run (default: every registered method)")
    parser.add_argument("--budgets", nargs="*", type=int, default=list(BUDGETS), help="visual tokens kept")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="toy suite size per benchmark")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="toy suite seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="demo_accuracy_vs_budget.png", help="PNG of accuracy vs budget")
    parser.set_defaults(func=run)
