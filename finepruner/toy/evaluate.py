"""Run a model on the toy suite through the real harness (loaders, generation, scorers), per question type.

``evaluate_suite(model, processor, root)`` loads each benchmark with ``finepruner.eval.benchmarks``,
answers with the harness's ``Generator`` (vicuna_v1 prompt, greedy decoding, left padding), scores with
the benchmark's own scorer and adds the toy breakdown: accuracy per question type, beside chance.
``method=`` applies a pruning method (``finepruner.apply``) for the whole run.

``run_grid`` runs every method at every budget (the demo's and ``docs/toy.md``'s tables) and keeps each
row's per-question units (each benchmark's ``units`` of the results it was scored from);
``bootstrap_suite`` resamples them, with the same indices for every row
(``finepruner.sweep.stats.bootstrap_metrics``), into 95% intervals of each row's headlines and suite mean,
and paired intervals of the difference between two rows.

``python -m finepruner.toy.evaluate`` prints the vanilla / pruned table of ``docs/toy.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finepruner.toy.suite import BENCHMARKS, DEFAULT_N, DEFAULT_SEED, chance_levels, load_suite_meta

#: Budgets on the toy model's 144 visual tokens: the same fractions as 64 / 128 / 192 of LLaVA's 576.
BUDGETS = (16, 32, 48)
#: Headline metric of each toy benchmark, as a percentage.
HEADLINES = {"pope": "mean F1", "gqa": "accuracy", "mme": "perception / 800", "mmbench": "circular accuracy"}


def headline_percent(bench: str, metrics: dict[str, Any]) -> float | None:
    if not metrics.get("scored"):
        return None
    value = metrics["headline"]["value"]
    if value is None:  # e.g. POPE's F1 with no true positive: precision and recall are 0 or undefined
        return 0.0
    if bench == "mme":
        n = len(metrics.get("subtasks", {})) or 1
        return value / (2 * n)  # perception sums 0-200 per subtask
    return float(value)


def _correct(bench: str, answer: dict[str, Any], record: dict[str, Any]) -> bool:
    """Per-question correctness with the benchmark's own answer parser."""
    text = str(answer["text"])
    if bench == "pope":
        from finepruner.eval.benchmarks.pope import pope_parse

        return pope_parse(text) == record["answer"]
    if bench == "gqa":
        from finepruner.eval.benchmarks.gqa import gqa_prediction

        return gqa_prediction(text) == record["answer"]
    if bench == "mme":
        from finepruner.eval.benchmarks.mme import mme_parse

        return mme_parse(text.replace("\n", " ").lower() + "\n") == record["answer"]
    from finepruner.eval.benchmarks.mmbench import can_infer

    letters = "ABCD"
    return can_infer(text, dict(zip(letters, record["options"], strict=False))) == record["answer"]


def _record(meta: dict[str, Any], bench: str, answer: dict[str, Any]) -> dict[str, Any]:
    records = meta["questions"][bench]
    if bench == "mme":
        question = str(answer["prompt"]).replace("Answer the question using a single word or phrase.", "")
        return records[f"{answer['question_id']}|{question.strip()}"]
    return records[str(answer["question_id"])]


def per_type_accuracy(bench: str, answers: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, float]:
    hits: dict[str, list[int]] = defaultdict(list)
    for a in answers:
        rec = _record(meta, bench, a)
        qtype = f"mcq_{rec['meta']['base']}" if rec["type"] == "mcq" else rec["type"]
        if bench == "pope":
            qtype = f"exist_{rec.get('split')}"
        hits[qtype].append(int(_correct(bench, a, rec)))
    return {t: 100.0 * sum(h) / len(h) for t, h in sorted(hits.items())}


def evaluate_suite(
    model,
    processor,
    root: str | Path,
    benches: tuple[str, ...] = BENCHMARKS,
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    method: str | None = None,
    method_params: dict[str, Any] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Answer and score the toy suite at ``root``; returns ``{bench: {...}}`` (headline, per-type accuracy,
    metrics, answers, their per-question ``results``, efficiency) plus ``"seconds"``.

    ``max_new_tokens`` defaults to each benchmark's own (128 / 1024; the toy model stops after one
    word). ``limit`` keeps the first questions of each benchmark (scores then cover those only).
    """
    import finepruner
    from finepruner.eval import benchmarks
    from finepruner.eval.runner import Generator, efficiency_summary

    meta = load_suite_meta(root)
    generator = Generator(model, processor)
    t0 = time.time()
    results: dict[str, Any] = {}
    # vanilla runs through the engine too, so that every row gets the same FLOPs accounting
    ctx = finepruner.apply(model, method or "vanilla", processor=processor, **(method_params or {}))
    generator.handle = ctx
    with ctx:
        for name in benches:
            bench = benchmarks.get(name)
            samples = bench.load(root)[:limit]
            answers: list[dict[str, Any]] = []
            for i in range(0, len(samples), batch_size):
                answers += generator.answer_batch(samples[i:i + batch_size],
                                                  max_new_tokens or bench.max_new_tokens, "toy")
            question_results = bench.question_results(answers, root)
            metrics = bench.metrics_from(question_results)
            results[name] = {"headline": headline_percent(name, metrics),
                             "per_type": per_type_accuracy(name, answers, meta), "metrics": metrics,
                             "questions": len(answers), "efficiency": efficiency_summary(answers),
                             "answers": answers, "results": question_results}
    results["seconds"] = time.time() - t0
    return results


def summary_row(results: dict[str, Any]) -> dict[str, float]:
    row = {b: results[b]["headline"] for b in BENCHMARKS if b in results}
    row["mean"] = sum(row.values()) / len(row)
    return row


def suite_visual_tokens(model, processor, root: str | Path) -> int:
    """Visual tokens the model gets for one image of the toy suite (every toy scene has the same size): the
    family's prompt and processor, counted on the family's image token (144 on both toys)."""
    from finepruner.eval import benchmarks
    from finepruner.eval.runner import Generator

    generator = Generator(model, processor)
    sample = next(s for s in benchmarks.get("gqa").load(root) if s.has_image)
    inputs = generator.model_inputs([generator.build_prompt(sample.text, True)], [generator.prepare_image(sample)])
    return int((inputs["input_ids"] == generator.adapter.image_token_id).sum())


def method_params(method: str, tokens: int | None, model, checkpoint: str = "toy",
                  random_seed: int = 0, visual_tokens: int | None = None) -> dict[str, Any]:
    """Parameters that run ``method`` at ``tokens`` on a toy model (shared by this script and the demo):
    the method's ``defaults_for`` the model's shape (``finepruner``: H = heads/4; SparseVLM: the v1.5
    schedule scaled to the depth), the toy CLIP text tower for CDPruner when the checkpoint ships one
    (the toy LLaVA), ``random_seed`` for random. ``visual_tokens``: per image (``suite_visual_tokens``);
    None reads the LLaVA vision config's fixed grid."""
    from finepruner import methods
    from finepruner.methods.base import ModelShape

    config = model.config
    if visual_tokens is None:
        vision = config.vision_config
        visual_tokens = (int(vision.image_size) // int(vision.patch_size)) ** 2
    shape = ModelShape(int(config.text_config.num_hidden_layers), int(config.text_config.num_attention_heads),
                       int(visual_tokens))
    params = methods.get(method).defaults_for(shape, {} if tokens is None else {"tokens": tokens})
    if method == "cdpruner":
        from finepruner.toy.model import clip_text_dir, load_clip_text

        directory = None if checkpoint == "toy" else checkpoint
        if clip_text_dir(directory).is_dir():
            params["clip_text"] = load_clip_text(directory)
    if method == "random":
        params.setdefault("seed", random_seed)
    return params


def _params_key(method: str, params: dict[str, Any]) -> str:
    """A configuration's identity: the method and its parameters (objects such as a text tower by type)."""
    def plain(value: Any) -> Any:
        return value if isinstance(value, (int, float, str, bool, type(None), list, tuple)) else type(value).__name__

    return json.dumps([method, sorted((k, plain(v)) for k, v in params.items())], default=str)


def run_grid(model, processor, root: str | Path, methods: list[str], budgets: tuple[int, ...] = BUDGETS,
             checkpoint: str = "toy", on_row=None, progress: bool = False,
             random_seed: int = 0) -> list[dict[str, Any]]:
    """Vanilla-style rows for every method at every budget (``tokens=None`` for vanilla): headline per
    benchmark, per-type accuracy, mean prefill FLOPs and layer-averaged visual tokens per sample, and the
    per-question units of each benchmark under ``"scores"`` (for ``bootstrap_suite``; not JSON); or the
    error of an unreachable budget. A budget whose parameters equal an earlier budget's (e.g. SparseVLM's
    mapping onto the nearest official schedule) is not run again: its row repeats the earlier one, with
    ``"same_as"`` = that budget."""
    from tqdm import tqdm

    from finepruner.eval import benchmarks

    grid = [(m, None) if m == "vanilla" else (m, b) for m in methods for b in ([None] if m == "vanilla" else budgets)]
    visual_tokens = suite_visual_tokens(model, processor, root)
    rows: list[dict[str, Any]] = []
    done: dict[str, dict[str, Any]] = {}
    for method, tokens in tqdm(grid, desc="toy suite", unit="config", disable=not progress):
        try:
            params = method_params(method, tokens, model, checkpoint, random_seed, visual_tokens)
            key = _params_key(method, params)
            if key in done:
                row = {**done[key], "tokens": tokens, "same_as": done[key]["tokens"]}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                continue
            res = evaluate_suite(model, processor, root, method=method, method_params=params)
        except (ValueError, RuntimeError) as err:  # e.g. a budget a schedule cannot reach on 6 layers
            row = {"method": method, "tokens": tokens, "error": str(err)}
        else:
            efficiency = [res[b]["efficiency"] for b in BENCHMARKS if res[b].get("efficiency")]
            row = {"method": method, "tokens": tokens, "row": summary_row(res),
                   "per_type": {b: res[b]["per_type"] for b in BENCHMARKS}, "seconds": res["seconds"],
                   "prefill_gflops": 1e3 * sum(e["mean_prefill_tflops"] for e in efficiency) / len(efficiency),
                   "average_visual_tokens": sum(e["mean_average_visual_tokens"] for e in efficiency)
                   / len(efficiency),
                   "scores": {b: benchmarks.get(b).units(res[b]["results"]) for b in BENCHMARKS}}
            done[key] = row
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ``run_grid`` row without its per-question units (for JSON)."""
    return {k: v for k, v in row.items() if k != "scores"}


def _percent(bench: str, values: np.ndarray, strata: Sequence[str]) -> np.ndarray:
    """Bootstrap metric values in the table's units: MME's perception sum as % of its maximum, and a POPE
    F1 without a true positive (NaN) as 0, as ``headline_percent`` does."""
    if bench == "mme":
        values = values / (2 * len(set(strata)))
    return np.nan_to_num(values, nan=0.0)


@dataclass
class SuiteBootstrap:
    """Bootstrap of the headlines and the suite mean of several rows on the same suite: ``values[bench]``
    and ``values["mean"]`` are ``[rows, resamples]``, every resample drawing the same units for every row."""

    benches: tuple[str, ...]
    values: dict[str, np.ndarray]
    resamples: int
    seed: int

    def interval(self, row: int, bench: str = "mean", confidence: float = 0.95) -> tuple[float, float]:
        """Percentile interval of row ``row``'s ``bench`` headline (or ``"mean"``)."""
        alpha = 100 * (1 - confidence) / 2
        low, high = np.percentile(self.values[bench][row], [alpha, 100 - alpha])
        return float(low), float(high)

    def difference(self, a: int, b: int, bench: str = "mean", confidence: float = 0.95) -> tuple[float, float]:
        """Paired percentile interval of row ``b`` minus row ``a``."""
        alpha = 100 * (1 - confidence) / 2
        low, high = np.percentile(self.values[bench][b] - self.values[bench][a], [alpha, 100 - alpha])
        return float(low), float(high)


def bootstrap_suite(rows: Sequence[dict[str, Any]], resamples: int = 2000, seed: int = 0,
                    benches: tuple[str, ...] = BENCHMARKS) -> SuiteBootstrap:
    """Paired stratified bootstrap (``finepruner.sweep.stats``) of ``rows`` (``run_grid`` rows with
    ``"scores"``, all on one suite): each benchmark's units are resampled independently of the other
    benchmarks' (seed ``seed + i`` for the i-th benchmark), the same draws for every row; the suite mean is
    the mean of the four resampled headlines."""
    from finepruner.sweep.stats import bootstrap_metrics

    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not rows or any("scores" not in r for r in rows):
        raise ValueError("bootstrap_suite needs run_grid rows that ran (with per-question scores)")
    values: dict[str, np.ndarray] = {}
    for i, bench in enumerate(benches):
        first = rows[0]["scores"][bench]
        runs = []
        for r in rows:
            scores = r["scores"][bench]
            if scores.keys != first.keys or scores.strata != first.strata:
                raise ValueError(f"{bench}: rows answered different questions; bootstrap one suite at a time")
            runs.append(scores.values)
        draws = bootstrap_metrics(first.aggregation, runs, first.strata, resamples, seed + i)
        values[bench] = _percent(bench, draws, first.strata)
    values["mean"] = sum(values[b] for b in benches) / len(benches)
    return SuiteBootstrap(benches=tuple(benches), values=values, resamples=resamples, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Vanilla and pruned toy-suite figures for docs/toy.md.")
    parser.add_argument("--model", default="toy", help="checkpoint folder or 'toy' (the shipped one)")
    parser.add_argument("--data", default=None, help="suite folder (written if missing)")
    parser.add_argument("--n", type=int, default=DEFAULT_N)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--methods", default="vanilla", help="comma-separated, e.g. vanilla,random,fastv")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the random selection control")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args(argv)

    import tempfile

    import torch

    import finepruner
    from finepruner.toy.suite import write_suite

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="finepruner-toy-") as tmp:  # used only without --data
        root = Path(args.data) if args.data else Path(tmp)
        if not (root / "toy_suite.json").is_file():
            write_suite(root, n=args.n, seed=args.seed)
        model, processor = finepruner.load_model(args.model)
        chance = load_suite_meta(root)["chance"]
        print("chance: " + json.dumps({b: round(next(v for v in c.values() if isinstance(v, float)), 1)
                                       for b, c in chance.items()}))
        def show(row: dict[str, Any]) -> None:
            label = f"{row['method']:10s} {row['tokens'] or 144:>4}"
            if "error" in row:
                print(f"{label} not run: {row['error']}", flush=True)
                return
            timing = f"same parameters as {row['same_as']}" if "same_as" in row else f"{row['seconds']:.0f} s"
            print(label + " " + " ".join(f"{k}={v:.1f}" for k, v in row["row"].items()) + f" ({timing})", flush=True)
            if row["method"] == "vanilla":
                for b in BENCHMARKS:
                    print(f"    {b}: " + ", ".join(f"{t} {v:.1f}" for t, v in row["per_type"][b].items()))

        budgets = tuple(int(b) for b in args.budgets.split(","))
        runs = run_grid(model, processor, root, args.methods.split(","), budgets, args.model, on_row=show,
                        random_seed=args.random_seed)
    out: dict[str, Any] = {"n": args.n, "seed": args.seed, "random_seed": args.random_seed,
                           "runs": [json_row(r) for r in runs]}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["BUDGETS", "HEADLINES", "SuiteBootstrap", "bootstrap_suite", "chance_levels", "evaluate_suite",
           "headline_percent", "json_row", "method_params", "per_type_accuracy", "run_grid", "suite_visual_tokens",
           "summary_row"]
