"""Which heads each head-selection strategy picks on the toy model, and what the ranking query can see.

Part of the toy head-selection study (docs/head_study.md). Two measurements:

1. ``--part heads``: for every strategy that takes a head count, H in {1, 2, 4, 6}, both definitions
   (and every budget for the budget-aware selectors), one prefill of the fixed toy suite through the
   ``finepruner`` method (FastV after layer K = 2, heads ranked on layer 1), reading ``handle.heads``: how
   often the chosen heads are the planted visual heads (layer 1, heads 0-3; chance is 4/8 of a random
   head), and how often each of the 8 heads is chosen.
2. ``--part query``: for scenes whose question names an object, where layer 1's attention goes from the
   last prompt token (the query every strategy ranks from) and from the question's naming word (the token
   the planted heads were supervised at): the share of each head's image attention on the named object,
   and the recall of the named object's patches among the top-B tokens ranked by (a) every head, (b) the
   planted heads, (c) the other heads, from either query.

    python benchmarks/head_study_heads.py --suite SUITE --part heads --out heads.json [--resume]
    python benchmarks/head_study_heads.py --part query --n 200 --out query.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

PLANTED = (0, 1, 2, 3)
HEAD_COUNTS = (1, 2, 4, 6)
BUDGETS = (4, 8, 16, 32)
#: Selectors whose choice depends on the token budget (the others rank heads the same at every budget).
BUDGET_AWARE = ("dynamic", "consensus")
STRATEGIES = ("sum", "variance", "entropy", "max_attention", "attention_range", "sparsity", "top_k_sum",
              "weighted_quality", "gini_coefficient", "multi_objective", "graph_based", "hierarchical",
              "dynamic", "consensus", "sparsevlm_priority")
#: The parameters that identify a row of ``--part heads`` (``--resume`` skips rows already measured).
ROW_KEY = ("definitions", "strategy", "heads", "tokens")


def chosen_heads(model, processor, root: Path, params: dict[str, Any], batch_size: int = 32) -> list[list[int]]:
    """The heads the ``finepruner`` method chooses for every image question of the toy suite at ``root``."""
    import finepruner
    from finepruner.eval import benchmarks
    from finepruner.eval.runner import Generator
    from finepruner.toy.suite import BENCHMARKS

    generator = Generator(model, processor)
    out: list[list[int]] = []
    with finepruner.apply(model, "finepruner", processor=processor, **params) as handle:
        generator.handle = handle
        for name in BENCHMARKS:
            samples = [s for s in benchmarks.get(name).load(root) if s.has_image]
            for i in range(0, len(samples), batch_size):
                batch = samples[i:i + batch_size]
                generator.generate([s.text for s in batch], [generator.prepare_image(s) for s in batch], 1)
                out.extend(h.tolist() for h in handle.heads[0])
    return out


def head_summary(heads: list[list[int]], num_heads: int) -> dict[str, Any]:
    """Share of chosen heads that are planted, share of samples whose heads are all planted, per-head
    frequency (fraction of samples that choose it), mean number of heads chosen."""
    counts = Counter(h for row in heads for h in row)
    total = sum(len(r) for r in heads)
    return {
        "planted_share": sum(counts[h] for h in PLANTED) / max(total, 1),
        "all_planted": sum(all(h in PLANTED for h in r) for r in heads) / max(len(heads), 1),
        "frequency": [counts[h] / max(len(heads), 1) for h in range(num_heads)],
        "mean_heads": total / max(len(heads), 1),
        "samples": len(heads),
    }


def part_heads(args, model, processor) -> dict[str, Any]:
    """Rows of head choices; ``--out`` is rewritten after every row, so an interrupted run keeps them, and
    ``--resume`` keeps the rows an earlier run wrote there and measures only the missing ones."""
    num_heads = int(model.config.text_config.num_attention_heads)
    rows: list[dict[str, Any]] = []
    if args.resume and Path(args.out).exists():
        rows = json.loads(Path(args.out).read_text())["rows"]
    done = {tuple(row[k] for k in ROW_KEY) for row in rows}
    result = {"planted": list(PLANTED), "chance_planted_share": len(PLANTED) / num_heads, "rows": rows}
    t0 = time.time()
    for definitions in ("renormalised", "original"):
        for strategy in STRATEGIES:
            for heads in HEAD_COUNTS:
                for tokens in (BUDGETS if strategy in BUDGET_AWARE else (BUDGETS[0],)):
                    params = {"tokens": tokens, "heads": heads, "strategy": strategy, "K": 2,
                              "definitions": definitions}
                    if tuple(params[k] for k in ROW_KEY) in done:
                        continue
                    summary = head_summary(chosen_heads(model, processor, Path(args.suite), params), num_heads)
                    rows.append({**params, **summary})
                    Path(args.out).write_text(json.dumps(result, indent=1))
                    print(f"{definitions:12s} {strategy:18s} H={heads} t={tokens:2d}: planted share "
                          f"{summary['planted_share']:.2f}, all planted {summary['all_planted']:.2f}, "
                          f"mean heads {summary['mean_heads']:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return result


def part_query(args, model, processor) -> dict[str, Any]:
    """Layer 1 attention from the last prompt token and from the naming word (eager attention)."""
    from finepruner.toy.questions import make_question
    from finepruner.toy.scenes import generate_scene
    from finepruner.toy.text import eval_prompt, user_text
    from finepruner.toy.train import naming_words, relevant_patches

    layer = 1
    rng = random.Random(args.seed)
    qtypes = ("color", "exist", "count", "position")
    items = []
    while len(items) < args.n:
        scene = generate_scene(rng)
        q = make_question(qtypes[len(items) % len(qtypes)], scene, rng)
        if q is not None and relevant_patches(scene, q):
            items.append((scene, q))
    model.set_attn_implementation("eager")
    num_heads = int(model.config.text_config.num_attention_heads)
    groups = {"all": list(range(num_heads)), "planted": list(PLANTED),
              "other": [h for h in range(num_heads) if h not in PLANTED]}
    share = {q: torch.zeros(num_heads) for q in ("last", "word")}
    recall = {(q, g, b): 0.0 for q in ("last", "word") for g in groups for b in BUDGETS}
    for scene, q in items:
        inputs = processor(images=[scene.render()], text=[eval_prompt(user_text(q.text, q.options))],
                           return_tensors="pt")
        with torch.no_grad():
            attn = model(**inputs, output_attentions=True).attentions[layer][0].float()
        ids = inputs["input_ids"][0]
        image = (ids == model.config.image_token_index).nonzero().flatten()
        tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        word = max(i for i, t in enumerate(tokens) if t in naming_words(q))
        named = torch.tensor(relevant_patches(scene, q))
        for query, pos in (("last", len(ids) - 1), ("word", word)):
            a = attn[:, pos, image]
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
            share[query] += a[:, named].sum(-1)
            for g, hs in groups.items():
                ranked = a[hs].mean(0).argsort(descending=True)
                for b in BUDGETS:
                    top = set(ranked[:b].tolist())
                    recall[(query, g, b)] += sum(int(p) in top for p in named) / len(named)
    n = len(items)
    return {
        "layer": layer, "questions": n, "qtypes": list(qtypes),
        "named_share": {q: (v / n).tolist() for q, v in share.items()},
        "recall": [{"query": q, "heads": g, "tokens": b, "recall": v / n} for (q, g, b), v in recall.items()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("heads", "query"), required=True)
    parser.add_argument("--suite", help="toy suite root (--part heads)")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--n", type=int, default=200, help="questions (--part query)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out (--part heads)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import finepruner

    model, processor = finepruner.load_model(args.model)
    if args.part == "heads" and not args.suite:
        parser.error("--part heads needs --suite")
    result = part_heads(args, model, processor) if args.part == "heads" else part_query(args, model, processor)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
