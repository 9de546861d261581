"""``finepruner toy-data`` (write the toy benchmark suite) and ``finepruner toy-train`` (retrain the toy model)."""

from __future__ import annotations

import argparse


def _toy_data_problem(args: argparse.Namespace) -> str | None:
    """The first invalid ``toy-data`` argument, as a message, or None."""
    from pathlib import Path

    if args.n < 1:
        return f"--n {args.n}: must be an integer >= 1 (images per benchmark)"
    if args.seed < 0:
        return f"--seed {args.seed}: must be a non-negative integer"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out}: is a file; pass a folder (it becomes playground/data/eval)"
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"--out {out}: {blocker} is a file, not a folder"
    return None


def _toy_data(args: argparse.Namespace) -> int:
    import sys

    from finepruner.toy.suite import write_suite

    problem = _toy_data_problem(args)
    if problem:
        print(f"finepruner toy-data: error: {problem}", file=sys.stderr)
        return 2
    summary = write_suite(args.out, n=args.n, seed=args.seed)
    for bench, info in summary["benchmarks"].items():
        print(f"{bench}: {info['questions']} questions, {info['images']} images -> {info['path']}")
    return 0


#: ``toy-train --family``: the module of each toy family's trainer (``TrainConfig``-like dataclass + ``train``).
FAMILIES: dict[str, tuple[str, str]] = {
    "llava": ("finepruner.toy.train", "TrainConfig"),
    "qwen2_5_vl": ("finepruner.toy.qwen_train", "QwenTrainConfig"),
}


def _family(name: str):
    """(config class, train function) of a toy family."""
    import importlib

    if name not in FAMILIES:
        raise SystemExit(f"--family {name!r}: use one of {', '.join(FAMILIES)}")
    module_name, config_name = FAMILIES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), module.train


def parse_overrides(items: list[str], family: str = "llava") -> dict[str, object]:
    """``["lr=1e-3", "lookup_at=answer"]`` -> the family's training-config fields, each converted to its
    default's type."""
    from dataclasses import fields

    config_class, _ = _family(family)
    known = {f.name: f for f in fields(config_class)}
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        default = known[key].default  # a None default: the first type of the annotation ("float | None")
        kind = {"float": float, "int": int}.get(str(known[key].type).split("|")[0].strip(), str) \
            if default is None else type(default)
        try:
            out[key] = kind(value)
        except ValueError as err:
            raise SystemExit(f"--set {item!r}: {err}") from None
    return out


def _toy_train_problem(args: argparse.Namespace) -> str | None:
    """The first invalid ``toy-train`` argument, as a message, or None."""
    from pathlib import Path

    for flag, value in (("--minutes", args.minutes), ("--eval-every", args.eval_every)):
        if not value > 0:
            return f"{flag} {value}: must be a positive number"
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            return f"{flag} {value}: must be an integer >= 1"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out}: is a file; pass a folder for the checkpoint"
    if args.init is not None and not (Path(args.init) / "config.json").is_file():
        return f"--init {args.init}: not a toy checkpoint folder (no config.json)"
    return None


def _toy_train(args: argparse.Namespace) -> int:
    import sys

    problem = _toy_train_problem(args)
    try:
        config_class, train = _family(args.family)
        overrides = parse_overrides(args.set, args.family)
    except SystemExit as err:  # parse_overrides names the bad --set item
        problem = problem or str(err)
    if problem:
        print(f"finepruner toy-train: error: {problem}", file=sys.stderr)
        return 2
    cfg = config_class(out=args.out, minutes=args.minutes, steps=args.steps, seed=args.seed,
                      batch_size=args.batch_size, threads=args.threads, eval_every=args.eval_every,
                      init=args.init, **overrides)
    final = train(cfg)
    print(f"final held-out accuracy (mean over question types): {final['mean']:.3f}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "toy-data", help="write the toy benchmark suite (POPE/GQA/MME/MMBench layouts)",
        description="Write the toy benchmark suite in LLaVA's playground/data/eval layout.")
    data.add_argument("--out", required=True, help="output folder (becomes playground/data/eval)")
    data.add_argument("--n", type=int, default=100, help="images per benchmark (default 100)")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=_toy_data)

    tr = subparsers.add_parser(
        "toy-train", help="train a toy model (LLaVA or Qwen2.5-VL) on synthetic scenes",
        description="Train a toy model on the synthetic scenes (CPU; see docs/toy.md).")
    tr.add_argument("--family", default="llava", choices=sorted(FAMILIES),
                    help="which toy to train: the LLaVA (default) or the Qwen2.5-VL (its language model "
                         "starts from the toy LLaVA's; see docs/toy.md)")
    tr.add_argument("--out", required=True, help="checkpoint folder (saved at every evaluation)")
    tr.add_argument("--minutes", type=float, default=60.0, help="time budget; sets the schedule length")
    tr.add_argument("--steps", type=int, default=None,
                    help="fixed number of steps (overrides --minutes; reproducible schedule)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    tr.add_argument("--eval-every", type=float, default=300.0, help="seconds between held-out evaluations")
    tr.add_argument("--init", default=None,
                    help="start from this toy checkpoint folder (continue training with a new schedule)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other TrainConfig field, e.g. --set lookup_at=answer (repeatable)")
    tr.set_defaults(func=_toy_train)
