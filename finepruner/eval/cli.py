"""``finepruner eval`` and ``finepruner score`` (issue 3, item 5; see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finepruner.eval.errors import EvalError


def method_and_params(
    method: str | None, param_items: list[str] | None, tokens: int | None = None, K: int | None = None
) -> tuple[str | None, dict[str, Any]]:
    """``--method NAME[:KEY=VALUE,...]`` with ``--param``/``--tokens``/``--K`` -> ``(name, params)``, all
    through ``finepruner.methods.spec``; a parameter given twice with different values is an error."""
    from finepruner.methods.spec import parse_method_spec, parse_params

    name, params = (None, {}) if method is None else parse_method_spec(method)
    extra = parse_params(param_items, "--param")
    for flag, key, value in (("--tokens", "tokens", tokens), ("--K", "K", K)):
        if value is not None:
            if key in extra and extra[key] != value:
                raise EvalError(f"{flag} {value} and --param {key}={extra[key]!r} set {key} differently")
            extra[key] = value
    clash = sorted(k for k in extra if k in params and params[k] != extra[k])
    if clash:
        raise EvalError(f"--method {method} sets {', '.join(clash)}, which --param/--tokens/--K set differently")
    return name, {**params, **extra}


def parse_files(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``--file BENCH.KEY=PATH`` -> ``{bench: {key: path}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        target, sep, path = item.partition("=")
        bench, dot, key = target.partition(".")
        if not sep or not dot or not bench or not key:
            raise EvalError(f"--file expects BENCH.KEY=PATH (e.g. pope.annotations=coco), got {item!r}")
        out.setdefault(bench, {})[key] = path
    return out


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM judge (MM-Vet grading, MMBench fallback); off unless a model is named")
    g.add_argument("--judge-model", help="judge model name (env FINEPRUNER_JUDGE_MODEL)")
    g.add_argument(
        "--judge-base-url",
        help="OpenAI-compatible base URL (env FINEPRUNER_JUDGE_BASE_URL, "
        "OPENAI_BASE_URL); the key comes from FINEPRUNER_JUDGE_API_KEY or OPENAI_API_KEY",
    )


def _bench_help() -> str:
    from finepruner.eval import benchmarks

    return "benchmark name, optionally name:split (repeatable): " + ", ".join(benchmarks.available())


def register(subparsers: Any) -> None:
    """Add the ``eval`` and ``score`` sub-commands."""
    p = subparsers.add_parser(
        "eval",
        help="run LLaVA-1.5 benchmarks (optionally with a pruning method)",
        description="Generate answers for benchmarks and score them (docs/benchmarks.md). "
        "Multi-GPU: torchrun --nproc_per_node=G -m finepruner eval ...",
    )
    p.add_argument("--model", required=True, help="local llava-hf checkpoint directory (or 'toy')")
    p.add_argument("--model-id", help="model_id written in the answers (default: the model folder's name)")
    p.add_argument("--bench", action="append", required=True, help=_bench_help())
    p.add_argument("--data-root", required=True, help="LLaVA's playground/data/eval folder")
    p.add_argument("--out", required=True, help="run directory (rerunning with the same one resumes)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, help="only the first N questions of each benchmark")
    p.add_argument("--max-new-tokens", type=int, help="override the benchmark's max_new_tokens")
    p.add_argument("--method", metavar="NAME[:KEY=VALUE,...]",
                   help="pruning method (see finepruner.methods.available()), optionally with its parameters, "
                   "e.g. finepruner:tokens=64,heads=16; default: none")
    p.add_argument("--tokens", type=int, help="visual-token budget of the method")
    p.add_argument("--K", type=int, help="method parameter K (e.g. the pruning layer)")
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="extra method parameter (repeatable)"
    )
    p.add_argument(
        "--file",
        action="append",
        metavar="BENCH.KEY=PATH",
        help="override a benchmark file, relative to its folder or absolute (repeatable)",
    )
    p.add_argument(
        "--processor-arg",
        action="append",
        metavar="KEY=VALUE",
        help="keyword argument of the model's processor (repeatable; e.g. min_pixels=200704 on Qwen-VL)",
    )
    p.add_argument(
        "--image-aspect-ratio",
        choices=("pad", "original"),
        default=None,
        help="pad: LLaVA-1.5's expand-to-square with the mean colour; original: the processor's own handling "
        "(default: the model family's protocol, pad on LLaVA-1.5, original on LLaVA-NeXT/OneVision)",
    )
    p.add_argument(
        "--layout",
        default="hf",
        help="image-token layout: hf (the model's own, default) or, on LLaVA-NeXT, paper2880 (the papers' fixed "
        "2x2 grid: 5 x 576 tokens, no unpadding, no newline)",
    )
    p.add_argument("--dtype", help="model dtype (e.g. float16, bfloat16, float32)")
    p.add_argument("--device", help="device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_judge_args(p)
    p.set_defaults(func=run_eval)

    s = subparsers.add_parser(
        "score",
        help="print the official metrics of an answers file",
        description="Score an answers JSONL (from finepruner or LLaVA's scripts).",
    )
    s.add_argument("--bench", required=True, help=_bench_help())
    s.add_argument("--answers", required=True, help="answers JSONL file")
    s.add_argument("--data-root", required=True, help="LLaVA's playground/data/eval folder")
    s.add_argument("--file", action="append", metavar="BENCH.KEY=PATH", help="override a benchmark file")
    s.add_argument("--out", help="folder for submission/result files (default: none written)")
    s.add_argument("--model-id", help="name used in submission file names (default: answers file stem)")
    s.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_judge_args(s)
    s.set_defaults(func=run_score)


def _print_summary(metrics: dict[str, Any], stream: Any = None) -> None:
    stream = stream or sys.stdout
    for spec, m in metrics.items():
        counts = dict(m.get("counts") or {})
        if "expected" in m:  # a run's own benchmark: missing among the questions it ran (after --limit)
            counts["missing"] = m["missing"]
        tail = ", ".join(f"{k} {counts[k]}" for k in ("missing", "unknown") if counts.get(k))
        if m.get("errors"):
            tail = (tail + ", " if tail else "") + f"errors {m['errors']}"
        if m.get("scored"):
            h = m["headline"]
            value = "n/a" if h["value"] is None else f"{h['value']:.2f}"
            line = f"{spec}: {h['metric']} = {value}"
        else:
            line = f"{spec}: not scored here ({m.get('reason', '')})"
            if m.get("submission"):
                line += f"; submission: {m['submission']}"
        print(line + (f" [{tail}]" if tail else ""), file=stream)
        if m.get("warning"):
            print(f"  warning: {m['warning']}", file=stream)


def _check_model_id(model_id: str | None) -> None:
    if model_id and any(c in model_id for c in "/\\"):
        raise EvalError(f"--model-id {model_id!r} must not contain '/' or '\\' (it names submission files)")


def run_eval(args: argparse.Namespace) -> int:
    from finepruner.eval.runner import EvalConfig, evaluate

    try:
        _check_model_id(args.model_id)
        from finepruner.methods.spec import parse_params

        method, params = method_and_params(args.method, args.param, args.tokens, args.K)
        config = EvalConfig(
            benches=args.bench,
            data_root=args.data_root,
            out=args.out,
            model=args.model,
            model_id=args.model_id,
            method=method,
            method_params=params,
            batch_size=args.batch_size,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            image_aspect_ratio=args.image_aspect_ratio,
            layout=args.layout,
            files=parse_files(args.file),
            processor_kwargs=parse_params(args.processor_arg, "--processor-arg"),
            dtype=args.dtype,
            device=args.device,
            judge_model=args.judge_model,
            judge_base_url=args.judge_base_url,
            progress=not args.no_progress,
        )
        metrics = evaluate(config)
    except (EvalError, ValueError, OSError) as err:
        print(f"finepruner eval: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"finepruner eval: interrupted; the answers written so far are kept in {Path(args.out)}; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    if not metrics:
        return 0
    _print_summary(metrics)
    print(f"run directory: {Path(args.out)}")
    incomplete = [(spec, m) for spec, m in metrics.items() if not m.get("complete", True)]
    for spec, m in incomplete:
        print(
            f"finepruner eval: {spec}: incomplete: {m['missing']} of {m['expected']} questions without an "
            f"answer, {m['errors']} answers recorded as errors (see metadata.error in {m['answers_file']}); "
            "rerun the same command to retry them",
            file=sys.stderr,
        )
    return 1 if incomplete else 0


def run_score(args: argparse.Namespace) -> int:
    from finepruner.eval.benchmarks import parse_spec
    from finepruner.eval.judge import judge_from_settings
    from finepruner.eval.runner import score_file

    try:
        name = parse_spec(args.bench)[0]
        all_files = parse_files(args.file)
        files = all_files.pop(name, None)
        if all_files:
            raise EvalError(f"--file names benchmark(s) {', '.join(sorted(all_files))}, not --bench {name}")
        _check_model_id(args.model_id)
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise EvalError(f"--out {args.out} is a file; pass a directory for the submission/result files")
        judge = judge_from_settings(
            args.judge_model,
            args.judge_base_url,
            cache_path=Path(args.out) / "judge_cache.jsonl" if args.out else None,
        )
        metrics = score_file(
            args.bench,
            args.answers,
            args.data_root,
            files=files,
            out_dir=args.out,
            judge=judge,
            model_id=args.model_id,
        )
    except (EvalError, ValueError, OSError) as err:
        print(f"finepruner score: error: {err}", file=sys.stderr)
        return 2
    counts = metrics.get("counts") or {}
    if counts.get("missing") or counts.get("unknown"):
        print(
            f"finepruner score: {args.answers}: {counts.get('missing', 0)} questions without an answer, "
            f"{counts.get('unknown', 0)} answers with unknown question ids "
            f"({counts.get('answers')} answers, {counts.get('questions')} questions)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False, default=str))
    else:
        _print_summary({args.bench: metrics})
    return 0
