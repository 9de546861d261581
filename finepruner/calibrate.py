"""``finepruner calibrate``: rank a model's "visual heads" over a calibration set (``docs/heads.md``).

For each calibration sample the last prompt token's attention to the visual tokens is read at decoder
layer ``K-1`` (where the ``finepruner`` method with the same ``K`` scores), every head is scored with a
ranking strategy, and the mean scores over the set rank the heads. The result, ``heads.json``, is used
with ``finepruner.apply(model, "finepruner", heads=H, heads_from="heads.json", K=K)``: a fixed head set
with no per-sample selection cost.

``--weights`` also writes per-head weights for HAWK-style soft selection (spec methods_more.md §7): the
mean scores L1-normalised (with ``--strategy sum``, each head's share of the mean visual-attention mass; HAWK's
own head-ablation procedure is not public), used as ``weighting="hawk", heads_from="heads.json"``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

import finepruner
from finepruner.eval import benchmarks
from finepruner.eval.errors import EvalError
from finepruner.eval.runner import Generator
from finepruner.heads import HeadSet, HeadStatsAccumulator, strategies, strategy_info
from finepruner.models.adapters import adapter_for


@torch.inference_mode()
def calibrate(
    model,
    processor,
    samples: list,
    K: int = 2,
    strategy: str = "sum",
    batch_size: int = 8,
    progress: bool = True,
    weights: bool = False,
    data: str | None = None,
    **options,
) -> HeadSet:
    """Per-head statistics of ``strategy`` at decoder layer ``K-1`` over ``samples`` (eval ``Sample``s);
    ``weights=True`` adds the HAWK-style weights (``HeadSet.with_weights``), ``data`` says what data it saw."""
    adapter = adapter_for(model)
    if not 1 <= K <= adapter.num_layers - 1:
        raise ValueError(f"K={K} is out of range; allowed: 1..{adapter.num_layers - 1}")
    samples = [s for s in samples if s.has_image]
    if not samples:
        raise ValueError("the calibration set has no sample with an image")
    # families whose images have their own token counts (LLaVA-NeXT, OneVision, Qwen) store no count in
    # heads.json (null matches any image) and score each sample's own row: one sample per forward
    variable = adapter.per_image_budget
    accumulator = HeadStatsAccumulator(
        adapter.num_heads, strategy, num_visual=None if variable else adapter.num_visual_tokens,
        num_layers=adapter.num_layers, layer=K - 1, variable_visual=variable, **options,
    )
    generator = Generator(model, processor)  # the family's prompt and image preprocessing (eval's)
    # FastV's scoring at layer K-1 records the attention rows; what it keeps after layer K is never read.
    with finepruner.apply(model, "fastv", tokens=1, K=K, processor=processor) as handle:
        bar = tqdm(range(0, len(samples), batch_size), desc="calibrate", unit="batch", disable=not progress)
        for start in bar:
            batch = samples[start : start + batch_size]
            for group in ([[s] for s in batch] if variable else [batch]):
                images = [generator.prepare_image(s) for s in group]
                texts = [generator.build_prompt(s.text, True) for s in group]
                model(**generator.model_inputs(texts, images), use_cache=False)
                accumulator.update(handle.attention[0])
    head_set = accumulator.result()
    if data is not None:
        head_set = replace(head_set, data=data)
    return head_set.with_weights() if weights else head_set


def _check_args(args: argparse.Namespace) -> None:
    """Every argument that can be checked without the model's weights (its config.json included);
    raises ``ValueError`` naming the argument and what is allowed."""
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--layer", args.layer)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be an integer >= 1")
    if args.weights and strategy_info(args.strategy).best != "largest":
        raise ValueError(f"--weights needs a --strategy whose largest scores are best; {args.strategy!r} ranks the "
                         "smallest first (the default 'sum' weighs each head by its visual-attention mass)")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; pass the heads.json file to write")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    from finepruner.sweep.config import check_device, check_dtype, model_shape

    if args.dtype is not None:
        check_dtype(args.dtype, "--dtype")
    if args.device is not None:
        check_device(args.device)
    shape = model_shape(args.model)  # a ValueError naming a missing checkpoint or a bad config.json
    if args.layer > shape.num_layers - 1:
        raise ValueError(f"--layer {args.layer}: out of range for {args.model} ({shape.num_layers} decoder "
                         f"layers); allowed: 1..{shape.num_layers - 1}")


def run(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
        bench = benchmarks.get(args.bench)
        bench.check(args.data_root, inference=True, scoring=False)
        samples = bench.load(args.data_root)
        samples = [s for s in samples if s.has_image][: args.n]
        if not samples:
            raise ValueError(f"--bench {args.bench}: no question with an image under {args.data_root}")
        model, processor = finepruner.load_model(args.model, dtype=args.dtype, device=args.device)
    except (EvalError, ValueError, OSError, RuntimeError) as err:  # DataError names every missing path
        print(f"finepruner calibrate: error: {err}", file=sys.stderr)
        return 2
    data = f"{args.bench}: the first {len(samples)} questions with an image"
    try:
        head_set = calibrate(model, processor, samples, K=args.layer, strategy=args.strategy,
                             batch_size=args.batch_size, progress=not args.no_progress, weights=args.weights,
                             data=data)
    except ValueError as err:  # e.g. --weights on negative mean scores
        print(f"finepruner calibrate: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head_set.save(out)
    print(f"wrote {out}: {head_set.n_samples} samples, best heads {list(head_set.ranked_heads[:8])} ..."
          + (" (with per-head weights)" if head_set.weights is not None else ""))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="rank a model's visual heads over a calibration set")
    parser.add_argument("--model", required=True, help="local llava-hf checkpoint directory, or 'toy'")
    parser.add_argument(
        "--bench", required=True, help=f"benchmark to draw samples from ({', '.join(benchmarks.available())})"
    )
    parser.add_argument("--data-root", required=True, help="LLaVA playground/data/eval directory")
    parser.add_argument("--n", type=int, default=200, help="number of calibration samples (first N with images)")
    parser.add_argument("--layer", type=int, default=2,
                        help="the K the head set will be used with: statistics from decoder layer K-1")
    parser.add_argument("--strategy", default="sum", choices=strategies("ranking"), help="per-head statistic")
    parser.add_argument("--weights", action="store_true",
                        help="also write per-head weights (the L1-normalised mean scores) for weighting=hawk")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="e.g. float16, bfloat16 (default: checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1 (default: cpu)")
    parser.add_argument("--out", required=True, help="output heads.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)
