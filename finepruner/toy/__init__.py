"""The embedded default toy world: synthetic scenes, a toy benchmark suite, a tiny trained LLaVA and a tiny
trained Qwen2.5-VL.

Public API::

    from finepruner import toy
    root = toy.build_default_suite()            # fixed small suite (POPE/GQA/MME/MMBench layouts) in a temp dir
    toy.write_suite(out, n=100, seed=0)         # what `finepruner toy-data` writes
    toy.chance_levels()                         # per question type: majority / uniform chance
    toy.benchmark_chance()                      # headline metric of trivial answerers per benchmark
    toy.BUDGETS                                 # (16, 32, 48) of 144 tokens = 64/128/192 of 576
    model, processor = finepruner.load_model("toy")
    model, processor = finepruner.load_model(toy.qwen_checkpoint_dir())   # the toy Qwen2.5-VL
    toy.clip_text_dir()                         # CDPruner's clip_model= for the toy model
    toy.evaluate_suite(model, processor, root, method="fastv", method_params={"tokens": 16})

See ``docs/toy.md``.
"""

from finepruner.toy.model import checkpoint_dir, clip_text_dir, load_clip_text
from finepruner.toy.qwen_model import qwen_checkpoint_dir
from finepruner.toy.scenes import generate_scene, generate_scenes
from finepruner.toy.suite import (
    BENCHMARKS,
    DEFAULT_N,
    DEFAULT_SEED,
    benchmark_chance,
    build_default_suite,
    chance_levels,
    load_suite_meta,
    write_suite,
)


def __getattr__(name: str):
    # Imported on first use, so that ``python -m finepruner.toy.evaluate`` runs a module not yet imported.
    if name in ("BUDGETS", "evaluate_suite"):
        from finepruner.toy import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'finepruner.toy' has no attribute {name!r}")


__all__ = [
    "BENCHMARKS",
    "BUDGETS",
    "DEFAULT_N",
    "DEFAULT_SEED",
    "benchmark_chance",
    "build_default_suite",
    "chance_levels",
    "checkpoint_dir",
    "clip_text_dir",
    "evaluate_suite",
    "generate_scene",
    "generate_scenes",
    "load_clip_text",
    "load_suite_meta",
    "qwen_checkpoint_dir",
    "write_suite",
]
