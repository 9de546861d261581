"""``finepruner demo``: every registered method at three budgets on a CPU-sized model.

Until the toy model is shipped this runs on a tiny random LLaVA with LLaVA-1.5's 24 x 24 = 576
visual-token grid, and prints the tokens entering every decoder layer and the prefill time per method.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from tqdm import tqdm

import finepruner
from finepruner.models.tiny import build_tiny_llava

#: Budgets of the papers (visual tokens out of 576); scaled to the model's own visual-token count.
BUDGETS = (192, 128, 64)
PROMPT = "USER: <image> what color is the circle ? ASSISTANT:"


def method_grid(num_visual: int, num_layers: int) -> list[tuple[str, dict]]:
    """(method, params) for vanilla and every budget of every method (budgets scaled to ``num_visual``)."""
    grid: list[tuple[str, dict]] = [("vanilla", {})]
    for budget in BUDGETS:
        tokens = max(1, round(budget * num_visual / 576))
        for name in finepruner.methods.available():
            if name == "vanilla":
                continue
            grid.append((name, {"tokens": tokens}))
    return grid


def prefill_seconds(model, inputs, rounds: int) -> float:
    """Median wall time of a prefill (one forward) over ``rounds`` runs."""
    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up
    for _ in range(rounds):
        start = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model, processor = build_tiny_llava(grid=24, patch=14, text_layers=8, text_hidden=128, text_intermediate=256)
    image = Image.effect_noise((336, 336), 64).convert("RGB")
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    num_layers = model.config.text_config.num_hidden_layers
    rows = []
    for name, params in tqdm(method_grid(num_visual, num_layers), desc="methods", unit="config"):
        try:
            handle = finepruner.apply(model, name, **params)
        except ValueError as err:  # a budget a method cannot reach on this shape
            rows.append((name, params, None, str(err)))
            continue
        with handle:
            seconds = prefill_seconds(model, inputs, args.rounds)
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=4, do_sample=False)
        rows.append((name, params, handle.stats, seconds))
    print(f"\nmodel: tiny random LLaVA, {num_visual} visual tokens, {num_layers} decoder layers (CPU)")
    print(f"{'method':<10} {'params':<16} {'avg visual':>10} {'prefill ms':>10}  visual tokens per layer")
    for name, params, stats, seconds in rows:
        label = ",".join(f"{k}={v}" for k, v in params.items())
        if stats is None:
            print(f"{name:<10} {label:<16} {'-':>10} {'-':>10}  not reachable: {seconds}")
            continue
        print(f"{name:<10} {label:<16} {stats.average_visual_tokens:>10.1f} {seconds * 1e3:>10.1f}  "
              f"{stats.visual_tokens}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run every method at three budgets on the embedded model")
    parser.add_argument("--rounds", type=int, default=3, help="prefill timings per configuration (median)")
    parser.set_defaults(func=run)
