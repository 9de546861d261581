"""Cost of every method's selection at 576 and 2,880 visual tokens relative to a vanilla prefill, on CPU.

The model is ``finepruner bench``'s ``medium`` shape (CLIP tower 336/14 with 4 layers x 256, projector
256 -> 1024, Llama decoder hidden 1024, 8 layers, 16 heads, MLP 2816, vocab 32064, random weights,
float32). Its prompts have LLaVA-1.5's layout: 35 system tokens, the image tokens, 40 text tokens, batch
1. One image gives 576 visual tokens (651 tokens); five images give 2,880 (2,955 tokens), the visual-token
count of LLaVA-NeXT's fixed 2 x 2 grid + base layout (5 x 576 crops). A third prompt is the same decoder
and tower as a LLaVA-NeXT model (``next-medium``): one 672-px image, 5 crops, base 576 + 2 x 2 tiles
2,304 + 48 newlines = 2,928 visual tokens (3,003 tokens), a per-image budget. The vanilla prefill is one
``model(**inputs, logits_to_keep=1)`` of that prompt with nothing applied (vision tower, projector,
decoder, LM head on the last token), as ``finepruner bench`` times it.

Two parts, each timed in interleaved rounds (the order rotates every round) with the vanilla prefills of
both prompts, and reported as ratios of medians measured in the same run:

* ``methods``: every registered method inside a real pruned prefill of the 576- or 2,880-token prompt,
  budgets 64/128/192 and five times those (320/640/960), with the parameters ``finepruner bench`` would
  use (``defaults_for``; CDPruner: a random CLIP text tower of the shape's size), and on the 2,928-token
  NeXT prompt at 320/640/960 per image (newline tokens kept on top); with ``budget_scope="crop"`` (the
  official per-crop rule) each of the five crops (images) keeps a fifth of that, 64/128/192, as in the
  papers' ``vtn_$((T*5))`` runs. The selection time is
  ``finepruner bench``'s: the engine's ``PruneStats.selection_seconds`` (vision signals taken, attention
  signals, ``select``, CDPruner's text tower) plus the method's vision-capture hooks
  (``finepruner.bench.runner.run_variant``). On the 2,880-token prompt the budget counts all five images
  together (LLaVA-1.5's per-sample budget); ``apply`` checks a budget against one image's 576 tokens, so
  the benchmark makes that check use the prompt's 2,880 (``_on_prompt``). Methods that select on one image's
  patch grid (``pool``, ``hiprune``, ``prumerge``, ``prumerge_plus``, ``visionzip``) refuse the five-image
  LLaVA-1.5 prompt and are reported as such there; on the NeXT prompt they select per image over its crops.
* ``functions``: the pre-LLM selection functions alone on synthetic signals of the same shapes (VisPruner
  ranking + de-duplication, CDPruner similarity + DPP (``dpp_select_projected``), DivPrune, SparseVLM's
  recycling at its three stages; the text tower and SparseVLM's rater attention excluded), with the
  feature widths of the bench model (``model``: CLIP 256, projected 1024, joint 256) and of LLaVA-1.5-7B
  (``llava7b``: 1024, 4096, 768; still divided by the ``medium`` prefill, so those ratios are upper
  bounds: a 7B prefill costs about 50 times more). ``--plain`` also times the plain implementations the
  fast ones replaced (``vispruner_select_plain``, ``dpp_greedy_plain`` on the full kernel,
  ``divprune_select_plain``): the same kept sets, the "before" figures.

Usage::

    python benchmarks/selection_overhead_prellm.py --rounds 5 --threads 2 --plain --json sel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from finepruner import methods
from finepruner.bench import runner
from finepruner.bench.shapes import INSTRUCTION, build_shape, clip_text_for, synthetic_inputs
from finepruner.engine.vision import cls_attention
from finepruner.methods.base import ModelShape
from finepruner.methods.cdpruner import (
    dpp_greedy_plain,
    dpp_select_projected,
    relevance_scores,
    similarity_kernel,
)
from finepruner.methods.divprune import divprune_select, divprune_select_plain
from finepruner.methods.sparsevlm import recycled_counts, sparsevlm_mapping, visual_counts
from finepruner.methods.sparsevlm_recycling import cluster_and_merge, density_noise
from finepruner.methods.spec import parse_method_spec
from finepruner.methods.vispruner import vispruner_select, vispruner_select_plain
from finepruner.models.adapters import adapter_for

SHAPE = "medium"
SYSTEM_TOKENS, TEXT_TOKENS = 35, 40
#: The prompt of each visual-token count: (named shape, images), 576 visual tokens per ``medium`` image;
#: ``next-medium``'s one 672-px image has 2,928 (base + 2 x 2 tiles + 48 newlines).
LAYOUTS = {576: ("medium", 1), 2880: ("medium", 5), 2928: ("next-medium", 1)}
#: Feature widths (CLIP features, projected tokens, CLIP joint space) of the synthetic signals.
WIDTHS = {"model": (256, 1024, 256), "llava7b": (1024, 4096, 768)}


def prompt_inputs(model, images: int, seed: int = 0) -> dict:
    """LLaVA-1.5's prompt layout with random ids: system tokens (BOS first), ``images`` x 576 image tokens,
    text tokens; random pixels for each image. A LLaVA-NeXT model gets ``finepruner bench``'s synthetic
    sample (one image, all its crops)."""
    config = model.config
    if config.model_type != "llava":
        return synthetic_inputs(model, 1, SYSTEM_TOKENS, TEXT_TOKENS, "cpu", torch.float32, seed)
    generator = torch.Generator().manual_seed(seed)
    per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    vocab, image_id = config.text_config.vocab_size, config.image_token_id

    def words(count: int) -> torch.Tensor:
        ids = torch.randint(5, vocab, (1, count), generator=generator)
        return torch.where(ids == image_id, torch.full_like(ids, 5), ids)

    ids = torch.cat([torch.full((1, 1), config.text_config.bos_token_id), words(SYSTEM_TOKENS - 1),
                     torch.full((1, images * per_image), image_id), words(TEXT_TOKENS)], dim=1)
    size = config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def budgets_at(num_visual: int, budgets: list[int]) -> list[int]:
    """The budgets of a 576-token image, five times each for the 2,880- and 2,928-token prompts."""
    return list(budgets) if num_visual <= 576 else [5 * b for b in budgets]


def _on_prompt(cls: type, num_visual: int, per_image: int) -> type:
    """``cls`` whose budget check at ``apply`` (made for one image's ``per_image`` tokens) uses the
    prompt's ``num_visual`` instead; the prefill plans for the prompt's tokens as it always does."""
    if num_visual <= per_image:
        return cls

    def plan(self, num_layers: int, count: int):
        return cls.plan(self, num_layers, num_visual if count == per_image else count)

    return type(cls.__name__, (cls,), {"plan": plan, "__doc__": cls.__doc__})


class _NoMemory:
    """``run_variant``'s memory probe, switched off (only times are compared here)."""

    method = "none"

    def start(self) -> None:
        pass

    def stop(self) -> int:
        return 0


def method_tasks(models, prompts, args) -> tuple[dict[str, Callable[[], float]], dict[str, str], dict[str, int]]:
    """``{label: run -> selection seconds}`` for every method x visual count x budget, the methods that
    cannot run (label -> reason), and each label's visual-token count."""
    tasks: dict[str, Callable[[], float]] = {}
    skipped: dict[str, str] = {}
    visual_of: dict[str, int] = {}
    specs = args.methods or [name for name in methods.available() if name != "vanilla"]
    parsed = [(spec, *parse_method_spec(spec)) for spec in specs]  # NAME or NAME:KEY=VALUE,...
    for num_visual in args.visual:
        model, inputs = models[LAYOUTS[num_visual][0]], prompts[num_visual]
        adapter = adapter_for(model)
        per_image = adapter.max_visual_tokens
        needs_text = any(name == "cdpruner" for _, name, _ in parsed)
        clip_text = clip_text_for(model, LAYOUTS[num_visual][0]) if needs_text else None
        shape = ModelShape(adapter.num_layers, adapter.num_heads, num_visual)
        for spec, name, extra in parsed:
            for budget in budgets_at(num_visual, args.budgets):
                label = f"{spec}/V={num_visual}/T={budget}"
                # ``budget_scope="crop"`` (the official per-crop rule): T / 5 per crop or image, T kept in all
                per_unit = budget // 5 if extra.get("budget_scope") == "crop" and num_visual > 576 else budget
                params = {"tokens": per_unit, **extra,
                          **({"clip_text": clip_text} if name == "cdpruner" else {})}
                try:
                    params = methods.get(name).defaults_for(shape, params)
                    method = _on_prompt(methods.get(name), num_visual, per_image)(**params)
                    variant = runner.Variant(label, method)
                    runner.run_variant(model, inputs, variant, {}, 0, _NoMemory(), INSTRUCTION)  # can it run?
                except (ValueError, RuntimeError, TypeError) as err:
                    skipped[label] = str(err).splitlines()[0]
                    continue

                def run(variant=variant, inputs=inputs, model=model) -> float:
                    return runner.run_variant(model, inputs, variant, {}, 0, _NoMemory(), INSTRUCTION)["selection_s"]

                tasks[label] = run
                visual_of[label] = num_visual
    return tasks, skipped, visual_of


def function_tasks(model, args) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """``{label: selection function call}`` on synthetic signals, and each label's visual-token count."""
    torch.manual_seed(0)
    tasks: dict[str, Callable[[], object]] = {}
    visual_of: dict[str, int] = {}
    layer = model.model.vision_tower.encoder.layers[-2].self_attn
    vision_hidden = model.config.vision_config.hidden_size
    for num_visual in [v for v in args.visual if LAYOUTS[v][0] == SHAPE]:
        images = LAYOUTS[num_visual][1]
        hidden = torch.randn(images, 577, vision_hidden)
        tasks[f"cls_attention/model/V={num_visual}"] = lambda h=hidden: cls_attention(layer, h)
        visual_of[f"cls_attention/model/V={num_visual}"] = num_visual
        for width in args.widths:
            clip, projected, joint = WIDTHS[width]
            s = {
                "attention": torch.distributions.StudentT(2.0).sample((1, num_visual)).abs(),
                "features": torch.randn(1, num_visual, clip),
                "projected": torch.randn(1, num_visual, projected),
                "image_embeds": torch.randn(1, num_visual, joint),
                "text": [torch.randn(1, joint)],
            }
            for budget in budgets_at(num_visual, args.budgets):
                calls = {
                    "vispruner": lambda s=s, b=budget: vispruner_select(s["attention"], s["features"], b, 0.5),
                    "cdpruner": lambda s=s, b=budget: dpp_select_projected(
                        s["projected"], relevance_scores(s["image_embeds"], s["text"]), b),
                    "divprune": lambda s=s, b=budget: divprune_select(s["projected"], b),
                    "sparsevlm": lambda s=s, b=budget: recycling_calls(s["projected"], b, model),
                }
                if args.plain:
                    calls["vispruner (plain)"] = lambda s=s, b=budget: vispruner_select_plain(
                        s["attention"], s["features"], b, 0.5)
                    calls["cdpruner (plain)"] = lambda s=s, b=budget: dpp_greedy_plain(
                        similarity_kernel(s["projected"], relevance_scores(s["image_embeds"], s["text"])), b)
                    calls["divprune (plain)"] = lambda s=s, b=budget: divprune_select_plain(s["projected"], b)
                for name, call in calls.items():
                    label = f"{name}/{width}/V={num_visual}/T={budget}"
                    tasks[label] = call
                    visual_of[label] = num_visual
    return tasks, visual_of


def recycling_calls(hidden: torch.Tensor, budget: int, model) -> None:
    """SparseVLM's token recycling at its three stages for ``budget`` (``sparsevlm_mapping`` on the bench
    model): DPC-kNN clustering of the recycled tokens, taken from ``hidden`` [1, V, D] (synthetic hidden
    states; the rater attention is excluded)."""
    num_visual = hidden.shape[1]
    mapping = sparsevlm_mapping(budget, adapter_for(model).num_layers, num_visual)
    current = num_visual
    for stage, (keep, _) in enumerate(visual_counts(mapping["keeps"], num_visual)):
        candidates, clusters = recycled_counts(current - keep)
        noise = density_noise(0, 0, stage, candidates)[None]
        cluster_and_merge(hidden[:, :candidates], clusters, noise)
        current = keep + clusters


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192],
                        help="budgets at 576 visual tokens; at 2,880 each is multiplied by 5")
    parser.add_argument("--visual", type=int, nargs="+", choices=sorted(LAYOUTS), default=sorted(LAYOUTS),
                        help="prompts: 576 (medium, 1 image), 2880 (medium, 5 images), 2928 (next-medium)")
    parser.add_argument("--parts", nargs="+", choices=["methods", "functions"], default=["methods", "functions"])
    parser.add_argument("--methods", nargs="+", help="registered method names, each optionally with parameters "
                        "(NAME:KEY=VALUE,..., e.g. cdpruner:budget_scope=crop; default: every method)")
    parser.add_argument("--widths", nargs="+", choices=sorted(WIDTHS), default=sorted(WIDTHS))
    parser.add_argument("--plain", action="store_true", help="also time the plain (pre-speed-up) functions")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {name: build_shape(name, torch.float32, "cpu") for name in {LAYOUTS[v][0] for v in args.visual}}
    models.setdefault(SHAPE, build_shape(SHAPE, torch.float32, "cpu"))  # the functions' vision layer
    prompts = {v: prompt_inputs(models[LAYOUTS[v][0]], LAYOUTS[v][1]) for v in args.visual}
    tasks: dict[str, Callable[[], object]] = {}
    for v, inputs in prompts.items():
        model = models[LAYOUTS[v][0]]
        tasks[f"prefill/V={v}"] = lambda inputs=inputs, model=model: model(**inputs, logits_to_keep=1)
    skipped: dict[str, str] = {}
    visual_of: dict[str, int] = {}
    measured: set[str] = set()  # tasks that report their own selection time
    with torch.inference_mode():
        if "methods" in args.parts:
            found, skipped, of = method_tasks(models, prompts, args)
            tasks.update(found)
            visual_of.update(of)
            measured.update(found)
        if "functions" in args.parts:
            found, of = function_tasks(models[SHAPE], args)
            tasks.update({f"fn:{k}": v for k, v in found.items()})
            visual_of.update({f"fn:{k}": v for k, v in of.items()})

        names = list(tasks)
        times: dict[str, list[float]] = {name: [] for name in names}
        for name, fn in tasks.items():  # warm-up (a method's check run at creation was its own)
            if name not in measured:
                fn()
        for index in range(args.rounds):
            shift = index * max(1, len(names) // max(1, args.rounds))
            for name in names[shift:] + names[:shift]:
                elapsed = timed(tasks[name]) if name not in measured else None
                times[name].append(tasks[name]() if elapsed is None else elapsed)
            print(f"round {index + 1}/{args.rounds} done", flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    prefill = {v: median[f"prefill/V={v}"] for v in prompts}
    ratio = {name: median[name] / prefill[visual_of[name]] for name in names if name in visual_of}
    print(f"threads {args.threads}; rounds {args.rounds}; vanilla prefill: "
          + ", ".join(f"{prompts[v]['input_ids'].shape[1]} tokens ({v} visual) {prefill[v] * 1e3:.0f} ms"
                      for v in prompts))
    print(f"{'selection':44s} {'median ms':>10s} {'/ prefill':>10s}")
    for name in names:
        if name in ratio:
            print(f"{name:44s} {median[name] * 1e3:10.2f} {ratio[name]:10.2%}")
    for name, reason in skipped.items():
        print(f"{name:44s} not run: {reason}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"median_s": median, "ratio": ratio, "prefill_s": {str(v): p for v, p in prefill.items()},
                       "skipped": skipped, "times_s": times, "args": vars(args),
                       "torch": torch.__version__}, handle, indent=2)


if __name__ == "__main__":
    main()
