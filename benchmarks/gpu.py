#!/usr/bin/env python
"""GPU efficiency benchmark: the LLaVA-1.5-7B shape (random weights, nothing downloaded) in bf16 with sdpa
on one CUDA device; vanilla and every registered method at 64/128/192 tokens, batch 1 and 8, interleaved
over rounds after a warm-up (``finepruner.bench.runner``). Sized to finish in under 8 minutes on one H100.

    python benchmarks/gpu.py                      # writes benchmarks/results/gpu_llava-1.5-7b_b{1,8}.json + .md
    python benchmarks/gpu.py --device cpu --shape medium --rounds 1     # CPU smoke mode (minutes)

Not yet run on a GPU (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from finepruner.bench import runner
from finepruner.bench.report import markdown_table, plot_png
from finepruner.bench.shapes import INSTRUCTION, clip_text_for, load_bench_model, synthetic_inputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llava-1.5-7b", help="llava-1.5-7b (default), llava-1.5-13b, medium, tiny")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 192])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--no-eager-scoring", action="store_true",
                        help="skip the fastv:score_impl=eager variants (run by default to show that cost)")
    parser.add_argument("--max-minutes", type=float, default=7.5,
                        help="skip the remaining batch sizes once this much time has passed")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --shape medium --rounds 1 for the smoke mode", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, _, description = load_bench_model(args.shape, dtype, args.device, args.attn)
    specs = list(args.methods) if args.methods else runner.default_methods()
    if not args.no_eager_scoring and "fastv" in specs:
        specs.append("fastv:score_impl=eager")
    clip_text = clip_text_for(model, args.shape) if "cdpruner" in specs else None
    if "cdpruner" in specs and clip_text is None:
        specs.remove("cdpruner")
        print("cdpruner skipped: finepruner.models.clip_text is missing", file=sys.stderr)
    if clip_text is not None:
        clip_text.to(args.device)

    def extra(method: str) -> dict:
        return {"clip_text": clip_text} if method == "cdpruner" else {}

    variants = runner.build_variants(specs, args.budgets)
    sections = [f"# {description}, {dtype}, {args.attn}, {args.device}\n"]
    for batch in args.batches:
        elapsed = (time.perf_counter() - started) / 60
        if elapsed > args.max_minutes:
            sections.append(f"batch {batch}: skipped, {elapsed:.1f} min already spent (--max-minutes)\n")
            continue
        inputs = synthetic_inputs(model, batch, 35, args.text_tokens, args.device, dtype)
        entries = runner.run_bench(model, inputs, variants, rounds=args.rounds, warmup=args.warmup,
                                   decode_steps=args.decode_steps, extra_params=extra, instruction=INSTRUCTION,
                                   log=lambda m, b=batch: print(f"batch {b}: {m}", file=sys.stderr, flush=True))
        meta = {"command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "shape": args.shape, "batch": batch, "dtype": str(dtype), "attn": args.attn,
                "rounds": args.rounds, "warmup": args.warmup, "decode_steps": args.decode_steps,
                "prompt_length": int(inputs["input_ids"].shape[1]),
                "environment": runner.environment(torch.device(args.device))}
        document = runner.result_document(entries, model, meta)
        stem = f"gpu_{args.shape}_b{batch}"
        (out / f"{stem}.json").write_text(json.dumps(document, indent=1, default=str))
        plot_png(entries, out / f"{stem}.png", title=f"{args.shape} b{batch}")
        table = markdown_table(entries)
        sections.append(f"## batch {batch} (prompt {meta['prompt_length']} tokens)\n\n{table}")
        print(f"## batch {batch}\n{table}", flush=True)
    sections.append(f"\ntotal wall time {(time.perf_counter() - started) / 60:.1f} min\n")
    (out / f"gpu_{args.shape}.md").write_text("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
