"""Cost of SparseVLM's selection step relative to a vanilla prefill, on CPU.

The prefill is one ``model(**inputs)`` of a ~100M-parameter tiny LLaVA with LLaVA-1.5's 24 x 24 = 576
visual tokens (batch 1, no pruning). The selection step is everything ``SparseVLM.select`` does during a
pruned prefill: the text raters (once per prompt, from the input embeddings), the rater-to-visual attention
rows of each pruning layer (rater queries only, keys captured while the layer ran), the scores, the top-k
and the recycling (DPC-kNN clustering and merging). It is timed inside a real pruned prefill by wrapping
``select``; the vanilla prefill is timed in the same rounds, interleaved. Medians and minima are reported
(on a shared, loaded machine the minima are the steadier estimate).

The model has 8 decoder layers, so the pruning layers are [2, 4, 6] instead of [2, 6, 15]; the official
schedules of each budget are used as they are (576 -> k1 + c1 -> k2 + c2 -> k3 + c3).

Usage::

    python benchmarks/selection_overhead_sparsevlm.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import finepruner
from finepruner.models.tiny import build_tiny_llava
from tests.conftest import noise_images

SHAPE = {"grid": 24, "patch": 14, "text_hidden": 1024, "text_layers": 8, "text_heads": 16,
         "text_intermediate": 2816}
PROMPT = "USER: <image> how many red objects are there in this image ? answer using a single word . ASSISTANT:"
LAYERS = [2, 4, 6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--versions", nargs="+", default=["1.5", "2.0"])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, processor = build_tiny_llava(seed=0, **SHAPE)
    inputs = processor(images=noise_images(1, size=336), text=[PROMPT], return_tensors="pt")

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        return time.perf_counter() - start

    configs = [(v, b) for v in args.versions for b in args.budgets]
    prefill_times: list[float] = []
    select_times: dict[str, list[float]] = {f"v{v}-{b}": [] for v, b in configs}
    pruned_times: dict[str, list[float]] = {f"v{v}-{b}": [] for v, b in configs}
    prefill()  # warm-up
    for _ in range(args.rounds):
        prefill_times.append(prefill())
        for version, budget in configs:
            name = f"v{version}-{budget}"
            method = finepruner.methods.create("sparsevlm", tokens=budget, version=version, layers=LAYERS)
            spent = []
            original = method.select

            def select(*a, _original=original, _spent=spent, **k):
                start = time.perf_counter()
                result = _original(*a, **k)
                _spent.append(time.perf_counter() - start)
                return result

            method.select = select
            with finepruner.apply(model, method):
                pruned_times[name].append(prefill())
            select_times[name].append(sum(spent))

    base, fastest = statistics.median(prefill_times), min(prefill_times)
    results = {"prefill_s": base, "prefill_min_s": fastest, "threads": args.threads, "layers": LAYERS,
               "selection": {}}
    print(f"vanilla prefill (576 visual tokens, 8 layers, width 1024): median {base * 1e3:.1f} ms, "
          f"min {fastest * 1e3:.1f} ms")
    for name in select_times:
        spent, least = statistics.median(select_times[name]), min(select_times[name])
        pruned = statistics.median(pruned_times[name])
        results["selection"][name] = {"select_s": spent, "ratio": spent / base, "select_min_s": least,
                                      "ratio_min": least / fastest, "pruned_prefill_s": pruned}
        print(f"{name:>9}: selection median {spent * 1e3:7.2f} ms = {100 * spent / base:5.2f}%, "
              f"min {least * 1e3:7.2f} ms = {100 * least / fastest:5.2f}% of the vanilla prefill; "
              f"pruned prefill {pruned * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
