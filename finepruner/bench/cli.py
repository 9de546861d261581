"""``finepruner bench``: FLOPs, latency, memory and KV cache of every method, side by side.

Example (the CPU figures of ``docs/performance.md``)::

    finepruner bench --model medium --budgets 64 128 192 --rounds 7 --json bench.json --markdown bench.md
    finepruner bench --model next-medium --methods vanilla,fastv --tokens 320 --rounds 1 --decode-steps 1

Every argument is checked before the model is built (``check_args``); a bad one ends the command with
``finepruner bench: error: ...`` and exit code 2 (``docs/errors.md``, "finepruner bench").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from finepruner.bench import runner
from finepruner.bench.report import markdown_table, plot_png, ratio_table
from finepruner.bench.shapes import (
    INSTRUCTION,
    MODEL_NAMES,
    QWEN_SHAPES,
    SHAPES,
    clip_text_for,
    load_bench_model,
    synthetic_inputs,
    synthetic_visual_tokens,
    toy_available,
)
from finepruner.models.adapters import adapter_for

#: Attention implementations the bench accepts (the model's ``attn_implementation``).
ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _integer(low: int, meaning: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``; the error says what the value means."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({meaning})") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; allowed: {low} or more ({meaning})")
        return value

    return parse


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
                             "fastv:score_impl=eager), space- or comma-separated (vanilla,fastv); default: every "
                             "registered method. Plain transformers and vanilla always run.")
    parser.add_argument("--budgets", nargs="+", type=_integer(1, "visual tokens"), default=None,
                        help="visual-token budgets N, passed as tokens=N (per image on LLaVA-NeXT; default by "
                             "visual tokens per image: 64 128 192 for 576, 320 640 960 for NeXT's 2928, 16 32 64 "
                             "for the toy model's 144, 8 16 32 for the tiny shape's 64; otherwise 1/9, 2/9 and "
                             "1/3 of them)")
    parser.add_argument("--tokens", dest="budgets", nargs="+", type=_integer(1, "visual tokens"),
                        help="the same as --budgets")
    parser.add_argument("--eager-scoring", action="store_true",
                        help="also run the attention-scored methods with score_impl=eager")
    parser.add_argument("--batch", type=_integer(1, "samples per prefill"), default=1)
    parser.add_argument("--system-tokens", type=_integer(1, "prompt tokens before the image, BOS included"),
                        default=35, help="prompt tokens before the image, BOS included (default 35)")
    parser.add_argument("--text-tokens", type=_integer(1, "prompt tokens after the image; the last one is the "
                                                          "query of the attention-scored methods"),
                        default=40, help="prompt tokens after the image (default 40)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, "
                                                      "bfloat16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--attn", default="sdpa", choices=ATTN_CHOICES, help="attention implementation (default sdpa)")
    parser.add_argument("--rounds", type=_integer(1, "recorded rounds"), default=7, help="recorded rounds (default 7)")
    parser.add_argument("--warmup", type=_integer(0, "unrecorded warm-up rounds"), default=1,
                        help="unrecorded warm-up rounds (default 1)")
    parser.add_argument("--decode-steps", type=_integer(0, "decode steps per run; 0 measures no decode"), default=8,
                        help="decode steps per run (default 8; 0: none)")
    parser.add_argument("--threads", type=_integer(1, "torch CPU threads"), default=None, help="torch CPU threads")
    parser.add_argument("--clip-model", default=None,
                        help="local CLIP checkpoint for cdpruner (default: a random text tower of CLIP's size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the full results as JSON")
    parser.add_argument("--markdown", default=None, help="write the markdown table to this file")
    parser.add_argument("--plot", default=None, help="write a PNG plot (time ratio vs FLOPs ratio) to this .png file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=main)


def _check_model(name: str) -> None:
    if name in SHAPES or name in QWEN_SHAPES or name == "tiny":
        return
    if name == "toy":
        if not toy_available():
            raise ValueError("--model toy: the toy checkpoint is not installed (finepruner toy-train writes it)")
        return
    from finepruner.models.loading import check_checkpoint, resolve_checkpoint

    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"--model {name!r} is neither a named shape ({', '.join(MODEL_NAMES)}) nor an existing "
                         "local checkpoint directory")
    try:
        check_checkpoint(resolve_checkpoint(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {name!r}: {err}") from None


def _check_output(path: str | None, option: str, suffix: str | None = None) -> None:
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{option} {path!r} is a directory; give a file name")
    if suffix is not None and target.suffix.lower() != suffix:
        raise ValueError(f"{option} {path!r}: the file name must end in {suffix}")
    parent = target.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path!r}: directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{option} {path!r}: not writable")


def split_method_list(texts: list[str]) -> list[str]:
    """``--methods`` values as method specs: each value may list several specs separated by commas
    (``vanilla,fastv``); a comma-separated item of the form ``key=value`` continues the previous spec's
    parameters (``fastv:K=3,score_impl=eager,pdrop`` is ``fastv:K=3,score_impl=eager`` and ``pdrop``).
    Commas inside ``[...]``/``{...}`` (list values) do not split."""
    from finepruner.methods.spec import split_top_level

    specs: list[str] = []
    for text in texts:
        start = len(specs)
        for item in split_top_level(text):
            equals, colon = item.find("="), item.find(":")
            if len(specs) > start and equals > 0 and (colon < 0 or equals < colon):
                specs[-1] += "," + item  # key=value of the previous spec
            else:
                specs.append(item)
    return specs


def _check_specs(specs: list[str]) -> None:
    from finepruner import methods

    seen: set[str] = set()
    for spec in specs:
        if spec in seen:
            raise ValueError(f"--methods: {spec!r} is given twice")
        seen.add(spec)
        try:
            name, params = runner.parse_method(spec)
        except ValueError as err:
            raise ValueError(f"--methods {spec!r}: {err}") from None
        if name == "vanilla":
            continue
        if "tokens" in params:
            raise ValueError(f"--methods {spec!r}: the budget comes from --budgets (tokens=N); drop tokens=")
        if "clip_model" in params:
            raise ValueError(f"--methods {spec!r}: give the CLIP checkpoint with --clip-model")
        try:  # the constructor's own validation of parameter names and values (budgets are checked per model)
            methods.create(name, **params)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--methods {spec!r}: {err}") from None


def check_args(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str]]:
    """Validate every argument before anything is built; returns ``(device, dtype, method specs)``.
    Raises ``ValueError`` naming the option and what is allowed."""
    from finepruner.models.loading import check_device, parse_dtype

    try:
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as err:
        raise ValueError(f"--device: {err}") from None
    try:
        dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    except ValueError:
        raise ValueError(f"--dtype {args.dtype!r}: allowed: float32, bfloat16, float16") from None
    _check_model(args.model)
    if args.budgets is not None and len(set(args.budgets)) != len(args.budgets):
        raise ValueError(f"--budgets {' '.join(map(str, args.budgets))}: each budget once")
    specs = split_method_list(args.methods) if args.methods else runner.default_methods()
    _check_specs(specs)
    if args.clip_model is not None and not Path(args.clip_model).expanduser().is_dir():
        raise ValueError(f"--clip-model {args.clip_model!r} is not a directory (a local CLIP checkpoint)")
    outputs = {"--json": args.json_path, "--markdown": args.markdown, "--plot": args.plot}
    for option, path in outputs.items():
        _check_output(path, option, ".png" if option == "--plot" else None)
    given = [Path(p).expanduser().resolve() for p in outputs.values() if p is not None]
    if len(set(given)) != len(given):
        raise ValueError("--json, --markdown and --plot must name different files")
    return device, dtype, specs


def main(args: argparse.Namespace) -> int:
    try:
        device, dtype, specs = check_args(args)
    except ValueError as err:
        print(f"finepruner bench: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        model, _, description = load_bench_model(args.model, dtype, str(device), args.attn, args.seed)
    except (ValueError, OSError, ImportError) as err:  # e.g. an attention implementation this machine lacks
        print(f"finepruner bench: error: --model {args.model!r} could not be built: {err}", file=sys.stderr)
        return 2
    inputs = synthetic_inputs(model, args.batch, args.system_tokens, args.text_tokens, str(device), dtype, args.seed)
    num_visual = synthetic_visual_tokens(model, inputs)  # one image per sample (NeXT: base + tiles + newlines)
    budgets = list(args.budgets) if args.budgets else list(runner.default_budgets(num_visual))
    length = args.system_tokens + num_visual + args.text_tokens
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        print(f"finepruner bench: error: --system-tokens {args.system_tokens} + {num_visual} visual tokens + "
              f"--text-tokens {args.text_tokens} = {length} tokens, more than the model's {limit} positions",
              file=sys.stderr)
        return 2
    if args.eager_scoring:
        from finepruner import methods

        specs += [s + ("," if ":" in s else ":") + "score_impl=eager" for s in specs
                  if methods.get(s.split(":")[0]).scores_attention and "score_impl" not in s]
    notes: list[str] = []
    clip_text = None
    clip_relevance = adapter_for(model).has_cls(model.config)  # else CDPruner's LLM-embedding relevance
    if any(s.split(":")[0] == "cdpruner" for s in specs) and not args.clip_model and clip_relevance:
        clip_text = clip_text_for(model, args.model)
        if clip_text is None:
            specs = [s for s in specs if s.split(":")[0] != "cdpruner"]
            notes.append("cdpruner skipped: finepruner.models.clip_text (a CLIP text tower builder) is missing")
            log(notes[-1])
        else:
            clip_text.to(device)
            notes.append("cdpruner: a random CLIP text tower (sized like the real one for named shapes)")

    def extra(method: str) -> dict:
        if method == "cdpruner" and clip_relevance:
            return {"clip_model": args.clip_model} if args.clip_model else {"clip_text": clip_text}
        return {}

    variants = runner.build_variants(specs, budgets)
    log(f"bench: {description}, {len(variants)} variants (budgets {' '.join(map(str, budgets))}), batch "
        f"{args.batch}, prompt length {inputs['input_ids'].shape[1]}, {dtype}, {device}, "
        f"{args.warmup}+{args.rounds} rounds")
    entries = runner.run_bench(model, inputs, variants, rounds=args.rounds, warmup=args.warmup,
                               decode_steps=args.decode_steps, extra_params=extra, instruction=INSTRUCTION,
                               log=log)
    meta = {
        "command": "finepruner bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "model": args.model,
        "description": description,
        "batch": args.batch,
        "budgets": budgets,
        "visual_tokens_per_sample": num_visual,
        "prompt_length": int(inputs["input_ids"].shape[1]),
        "system_tokens": args.system_tokens,
        "text_tokens": args.text_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "attn": args.attn,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
        "notes": notes,
        "environment": runner.environment(device),
    }
    table = markdown_table(entries) + "\n" + ratio_table(entries)
    print(table)
    document = runner.result_document(entries, model, meta)
    if args.json_path:
        Path(args.json_path).expanduser().write_text(json.dumps(document, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).expanduser().write_text(table)
    if args.plot:
        plot_png(entries, Path(args.plot).expanduser(), title=f"{args.model} b{args.batch}")
    return 0
