"""Run a model on the toy suite through the real harness (loaders, generation, scorers), per question type.

``evaluate_suite(model, processor, root)`` loads each benchmark with ``finepruner.eval.benchmarks``,
answers with the harness's ``Generator`` (vicuna_v1 prompt, greedy decoding, left padding), scores with
the benchmark's own scorer and adds the toy breakdown: accuracy per question type, beside chance.
``method=`` applies a pruning method (``finepruner.apply``) for the whole run.

``python -m finepruner.toy.evaluate`` prints the vanilla / pruned table of ``docs/toy.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

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
    """Answer and score the toy suite at ``root``; returns ``{bench: {...}}`` plus ``"seconds"``.

    ``max_new_tokens`` defaults to each benchmark's own (128 / 1024; the toy model stops after one
    word). ``limit`` keeps the first questions of each benchmark (scores then cover those only).
    """
    import finepruner
    from finepruner.eval import benchmarks
    from finepruner.eval.runner import Generator

    meta = load_suite_meta(root)
    generator = Generator(model, processor)
    t0 = time.time()
    results: dict[str, Any] = {}
    ctx = (finepruner.apply(model, method, **(method_params or {}))
           if method and method != "vanilla" else contextlib.nullcontext())
    with ctx:
        for name in benches:
            bench = benchmarks.get(name)
            samples = bench.load(root)[:limit]
            answers: list[dict[str, Any]] = []
            for i in range(0, len(samples), batch_size):
                answers += generator.answer_batch(samples[i:i + batch_size],
                                                  max_new_tokens or bench.max_new_tokens, "toy")
            metrics = bench.score(answers, root)
            results[name] = {"headline": headline_percent(name, metrics),
                             "per_type": per_type_accuracy(name, answers, meta), "metrics": metrics,
                             "questions": len(answers)}
    results["seconds"] = time.time() - t0
    return results


def summary_row(results: dict[str, Any]) -> dict[str, float]:
    row = {b: results[b]["headline"] for b in BENCHMARKS if b in results}
    row["mean"] = sum(row.values()) / len(row)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Vanilla and pruned toy-suite figures for docs/toy.md.")
    parser.add_argument("--model", default="toy", help="checkpoint folder or 'toy' (the shipped one)")
    parser.add_argument("--data", default=None, help="suite folder (written if missing)")
    parser.add_argument("--n", type=int, default=DEFAULT_N)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--methods", default="vanilla", help="comma-separated, e.g. vanilla,random,fastv")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args(argv)

    import tempfile

    import torch

    import finepruner
    from finepruner.toy.suite import write_suite

    torch.set_num_threads(args.threads)
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="finepruner-toy-"))
    if not (root / "toy_suite.json").is_file():
        write_suite(root, n=args.n, seed=args.seed)
    model, processor = finepruner.load_model(args.model)
    chance = load_suite_meta(root)["chance"]
    print("chance: " + json.dumps({b: round(next(v for v in c.values() if isinstance(v, float)), 1)
                                   for b, c in chance.items()}))
    out: dict[str, Any] = {"n": args.n, "seed": args.seed, "runs": []}
    for method in args.methods.split(","):
        budgets = [None] if method == "vanilla" else [int(b) for b in args.budgets.split(",")]
        for tokens in budgets:
            params: dict[str, Any] = {} if tokens is None else {"tokens": tokens}
            if method == "cdpruner":
                from finepruner.toy.model import load_clip_text

                params["clip_text"] = load_clip_text(None if args.model == "toy" else args.model)
            if method == "random":
                params["seed"] = 0
            try:
                res = evaluate_suite(model, processor, root, method=method, method_params=params)
            except ValueError as err:  # e.g. a budget the method's schedule cannot reach on 6 layers
                print(f"{method:10s} {tokens or 144:>4} not run: {err}", flush=True)
                out["runs"].append({"method": method, "tokens": tokens, "error": str(err)})
                continue
            row = summary_row(res)
            out["runs"].append({"method": method, "tokens": tokens, "row": row,
                                "per_type": {b: res[b]["per_type"] for b in BENCHMARKS},
                                "seconds": res["seconds"]})
            print(f"{method:10s} {tokens or 144:>4} " + " ".join(f"{k}={v:.1f}" for k, v in row.items())
                  + f" ({res['seconds']:.0f} s)", flush=True)
            if method == "vanilla":
                for b in BENCHMARKS:
                    print(f"    {b}: " + ", ".join(f"{t} {v:.1f}" for t, v in res[b]["per_type"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["BUDGETS", "HEADLINES", "chance_levels", "evaluate_suite", "headline_percent", "per_type_accuracy",
           "summary_row"]
