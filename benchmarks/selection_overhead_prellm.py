"""Cost of the pre-LLM selections (VisPruner, CDPruner, DivPrune) relative to a vanilla prefill, on CPU.

The prefill is one ``model(**inputs)`` of a ~100M-parameter tiny LLaVA with LLaVA-1.5's 24 x 24 = 576
visual tokens (batch 1, no pruning). The selections run on signals of the same shapes:

* ``vispruner``: [CLS]-attention ranking + ToMe-style de-duplication (``vispruner_select``);
* ``cdpruner``: cosine kernel of the projected tokens + relevance + fast greedy DPP (576 candidates);
* ``divprune``: greedy max-min diversity over the projected tokens (``divprune_select``), also over
  2,880 tokens (``V=2880``: LLaVA-NeXT's 5 x 576 fixed-grid layout), still divided by the 576-token
  prefill (a 2,880-token prefill costs at least five times more, so that ratio is an upper bound);
* ``cls_attention``: the hook's one-query attention recomputation (VisPruner's signal).

Each is timed with the feature widths of the benchmark model (``model``) and of LLaVA-1.5-7B (``llava7b``:
CLIP width 1024, projected width 4096, joint width 768). Timings are interleaved with the prefill over
several rounds, and medians are reported as ratios measured in the same run. The CLIP text tower (CDPruner)
is a separate ~123M-parameter model and is not included (one 77-token segment per question).

Usage::

    python benchmarks/selection_overhead_prellm.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from PIL import Image

from finepruner.engine.vision import cls_attention
from finepruner.methods.cdpruner import dpp_greedy, relevance_scores, similarity_kernel
from finepruner.methods.divprune import divprune_select
from finepruner.methods.vispruner import vispruner_select
from finepruner.models.tiny import build_tiny_llava

SHAPE = {"grid": 24, "patch": 14, "text_hidden": 1024, "text_layers": 8, "text_heads": 16,
         "text_intermediate": 2816}
PROMPT = "USER: <image> how many red objects are there in this image ? answer using a single word . ASSISTANT:"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, processor = build_tiny_llava(seed=0, **SHAPE)
    image = Image.fromarray((torch.rand(336, 336, 3) * 255).to(torch.uint8).numpy())
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    decoder_params = sum(p.numel() for p in model.model.language_model.parameters())
    num_visual = 576
    attention_layer = model.model.vision_tower.encoder.layers[-2].self_attn
    vision_hidden = model.config.vision_config.hidden_size

    widths = {"model": (vision_hidden, SHAPE["text_hidden"], vision_hidden), "llava7b": (1024, 4096, 768)}
    signals = {}
    for name, (dv, d, p) in widths.items():
        signals[name] = {
            "attention": torch.distributions.StudentT(2.0).sample((1, num_visual)).abs(),
            "features": torch.randn(1, num_visual, dv),
            "projected": torch.randn(1, num_visual, d),
            "image_embeds": torch.randn(1, num_visual, p),
            "text": [torch.randn(1, p)],
            "projected_next": torch.randn(1, 5 * num_visual, d),
        }
    hidden = torch.randn(1, num_visual + 1, vision_hidden)

    def cdpruner(s, budget):
        relevance = relevance_scores(s["image_embeds"], s["text"])
        return dpp_greedy(similarity_kernel(s["projected"], relevance), budget)

    tasks = {"prefill": lambda: model(**inputs)}
    for name, s in signals.items():
        for budget in args.budgets:
            tasks[f"vispruner/{name}/T={budget}"] = lambda s=s, b=budget: vispruner_select(
                s["attention"], s["features"], b, 0.5)
            tasks[f"cdpruner/{name}/T={budget}"] = lambda s=s, b=budget: cdpruner(s, b)
            tasks[f"divprune/{name}/T={budget}"] = lambda s=s, b=budget: divprune_select(s["projected"], b)
            tasks[f"divprune/{name}/V=2880/T={5 * budget}"] = lambda s=s, b=budget: divprune_select(
                s["projected_next"], 5 * b)
    tasks["cls_attention/model"] = lambda: cls_attention(attention_layer, hidden)

    times: dict[str, list[float]] = {name: [] for name in tasks}
    with torch.no_grad():
        for fn in tasks.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in tasks.items():
                times[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    prefill = median["prefill"]
    print(f"decoder parameters: {decoder_params / 1e6:.1f}M; prompt tokens: {inputs['input_ids'].shape[1]}; "
          f"threads: {args.threads}; rounds: {args.rounds}")
    print(f"{'task':36s} {'median ms':>10s} {'/ prefill':>10s}")
    for name, value in median.items():
        print(f"{name:36s} {value * 1e3:10.2f} {value / prefill:10.2%}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"median_s": median, "ratio": {k: v / prefill for k, v in median.items()},
                       "args": vars(args), "decoder_params": decoder_params}, handle, indent=2)


if __name__ == "__main__":
    main()
