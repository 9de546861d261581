"""``finepruner bench``: FLOPs, latency, memory and KV cache of every method, side by side.

Example (the CPU figures of ``docs/performance.md``)::

    finepruner bench --model medium --budgets 64 128 192 --rounds 7 --json bench.json --markdown bench.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from finepruner.bench import runner
from finepruner.bench.report import markdown_table, plot_png, ratio_table
from finepruner.bench.shapes import INSTRUCTION, MODEL_NAMES, clip_text_for, load_bench_model, synthetic_inputs


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure FLOPs, latency, memory and KV cache of methods side by side",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--model", default="medium",
                        help=f"a named shape with random weights ({', '.join(MODEL_NAMES)}) or a local checkpoint "
                             "directory (default: medium)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method specs 'name' or 'name:key=value,...' (e.g. finepruner:strategy=dynamic, "
                             "fastv:score_impl=eager); default: every registered method. Vanilla always runs.")
    parser.add_argument("--budgets", nargs="+", type=int, default=list(runner.DEFAULT_BUDGETS),
                        help="visual-token budgets N, passed as tokens=N (default: 64 128 192)")
    parser.add_argument("--eager-scoring", action="store_true",
                        help="also run the attention-scored methods with score_impl=eager")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--system-tokens", type=int, default=35, help="prompt tokens before the image (default 35)")
    parser.add_argument("--text-tokens", type=int, default=40, help="prompt tokens after the image (default 40)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, "
                                                      "bfloat16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    parser.add_argument("--rounds", type=int, default=7, help="recorded rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up rounds (default 1)")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per run (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clip-model", default=None,
                        help="local CLIP checkpoint for cdpruner (default: a random text tower of CLIP's size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the full results as JSON")
    parser.add_argument("--markdown", default=None, help="write the markdown table to this file")
    parser.add_argument("--plot", default=None, help="write a PNG plot (time ratio vs FLOPs ratio)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=main)


def _dtype(name: str | None, device: str) -> torch.dtype:
    name = name or ("bfloat16" if device.startswith("cuda") else "float32")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"--dtype {name!r} is not a torch dtype")
    return value


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    model, tokenizer, description = load_bench_model(args.model, dtype, device, args.attn, args.seed)
    specs = list(args.methods) if args.methods else runner.default_methods()
    if args.eager_scoring:
        specs += [s + ("," if ":" in s else ":") + "score_impl=eager" for s in specs
                  if s.split(":")[0] in runner.ATTENTION_SCORED]
    notes: list[str] = []
    clip_text = None
    if any(s.split(":")[0] == "cdpruner" for s in specs) and not args.clip_model:
        clip_text = clip_text_for(model, args.model)
        if clip_text is None:
            specs = [s for s in specs if s.split(":")[0] != "cdpruner"]
            notes.append("cdpruner skipped: finepruner.models.clip_text (a CLIP text tower builder) is missing")
            log(notes[-1])
        else:
            clip_text.to(device)
            notes.append("cdpruner: a random CLIP text tower (sized like the real one for named shapes)")

    def extra(method: str) -> dict:
        if method == "cdpruner":
            return {"clip_model": args.clip_model} if args.clip_model else {"clip_text": clip_text}
        return {}

    variants = runner.build_variants(specs, args.budgets)
    inputs = synthetic_inputs(model, args.batch, args.system_tokens, args.text_tokens, device, dtype, args.seed)
    log(f"bench: {description}, {len(variants)} variants, batch {args.batch}, prompt length "
        f"{inputs['input_ids'].shape[1]}, {dtype}, {device}, {args.warmup}+{args.rounds} rounds")
    entries = runner.run_bench(model, inputs, variants, rounds=args.rounds, warmup=args.warmup,
                               decode_steps=args.decode_steps, extra_params=extra, instruction=INSTRUCTION,
                               log=log)
    meta = {
        "command": "finepruner bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "model": args.model,
        "description": description,
        "batch": args.batch,
        "prompt_length": int(inputs["input_ids"].shape[1]),
        "system_tokens": args.system_tokens,
        "text_tokens": args.text_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "attn": args.attn,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
        "notes": notes,
        "environment": runner.environment(torch.device(device)),
    }
    table = markdown_table(entries) + "\n" + ratio_table(entries)
    print(table)
    document = runner.result_document(entries, model, meta)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(document, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot_png(entries, args.plot, title=f"{args.model} b{args.batch}")
    return 0
