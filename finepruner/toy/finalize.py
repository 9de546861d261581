"""Ship a trained toy checkpoint into the package and record its reference figures.

``python -m finepruner.toy.finalize RUN_DIR`` copies the model, tokenizer, processor and CLIP text tower
files of a ``toy-train`` output folder into ``finepruner/toy/checkpoint/`` and writes
``toy_reference.json`` there: the vanilla headline metrics on the fixed small suite (``n=20``,
``seed=1234``), which ``tests/test_toy_model.py`` checks the shipped model against.
``--family qwen2_5_vl`` ships a ``toy-train --family qwen2_5_vl`` folder into
``finepruner/toy/checkpoint_qwen2_5_vl/`` (model, tokenizer, ``preprocessor_config.json``, chat template;
no CLIP text tower) and records its reference the same way (``tests/test_toy_qwen.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
           "tokenizer.json", "tokenizer_config.json", "toy_training.json", "train_log.txt",
           "train_history.json")


#: The files of the toy Qwen2.5-VL's folder (the processor is ``finepruner.models.qwen_processor``'s).
QWEN_SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                "chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "toy_training.json",
                "train_log.txt", "train_history.json")


def _run_paths(run_dir: Path) -> dict[str, str]:
    """This machine's paths the logs may name (the run folder and the ``--init`` folder) -> placeholders."""
    paths = {str(run_dir): "RUN_DIR", str(run_dir.resolve()): "RUN_DIR"}
    tag = run_dir / "toy_training.json"
    init = json.loads(tag.read_text(encoding="utf-8")).get("config", {}).get("init") if tag.is_file() else None
    if init:  # a relative --init names no machine path; its absolute form may appear in the log
        paths[str(Path(init).resolve())] = "INIT_DIR"
    return dict(sorted(paths.items(), key=lambda kv: -len(kv[0])))  # longest first: no partial replaces


def ship(run_dir: Path, dest: Path, family: str = "llava") -> None:
    dest.mkdir(parents=True, exist_ok=True)
    paths = _run_paths(run_dir)
    for name in (QWEN_SHIPPED if family == "qwen2_5_vl" else SHIPPED):
        if not (run_dir / name).is_file():
            continue
        if name.endswith((".json", ".txt")) and name.startswith(("toy_", "train_")):
            # the logs name the run folder: keep this machine's paths out of the package
            text = (run_dir / name).read_text(encoding="utf-8")
            for form, placeholder in paths.items():
                text = text.replace(form, placeholder)
            (dest / name).write_text(text, encoding="utf-8")
        else:
            shutil.copy2(run_dir / name, dest / name)
    if family == "qwen2_5_vl":
        return
    if (dest / "clip_text").exists():
        shutil.rmtree(dest / "clip_text")
    shutil.copytree(run_dir / "clip_text", dest / "clip_text")


def reference(dest: Path, n: int, seed: int, threads: int) -> dict:
    import torch

    import finepruner
    from finepruner.toy.evaluate import evaluate_suite
    from finepruner.toy.suite import build_default_suite

    torch.set_num_threads(threads)
    model, processor = finepruner.load_model(dest)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_default_suite(Path(tmp), n=n, seed=seed)
        res = evaluate_suite(model, processor, root, batch_size=64, max_new_tokens=8)
    ref = {"n": n, "seed": seed, "max_new_tokens": 8,
           "headline": {b: round(res[b]["headline"], 2) for b in ("pope", "gqa", "mme", "mmbench")},
           "per_type": {b: {t: round(v, 1) for t, v in res[b]["per_type"].items()}
                        for b in ("pope", "gqa", "mme", "mmbench")},
           "seconds": round(res["seconds"], 1)}
    (dest / "toy_reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return ref


def main(argv: list[str] | None = None) -> int:
    from finepruner.toy.model import CHECKPOINT_DIR
    from finepruner.toy.qwen_model import QWEN_CHECKPOINT_DIR
    from finepruner.toy.suite import DEFAULT_N, DEFAULT_SEED

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a `finepruner toy-train --out` folder")
    parser.add_argument("--family", default="llava", choices=("llava", "qwen2_5_vl"),
                        help="which toy the folder holds (its --family at training)")
    parser.add_argument("--dest", default=None,
                        help="default: the package's folder of that toy (checkpoint/ or checkpoint_qwen2_5_vl/)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    tag = run_dir / "toy_training.json"
    trained = json.loads(tag.read_text(encoding="utf-8")).get("family", "llava") if tag.is_file() else None
    if trained is not None and trained != args.family:
        parser.error(f"{run_dir} holds a {trained!r} toy (toy_training.json), not --family {args.family!r}")
    default = QWEN_CHECKPOINT_DIR if args.family == "qwen2_5_vl" else CHECKPOINT_DIR
    dest = Path(args.dest) if args.dest else default
    ship(run_dir, dest, args.family)
    print(json.dumps(reference(dest, DEFAULT_N, DEFAULT_SEED, args.threads), indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
