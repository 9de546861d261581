"""``finepruner sweep CONFIG --model PATH --data-root DIR`` (docs/sweeps.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of methods x budgets x heads x strategies x benchmarks (resumable)",
        description="Run every pending cell of a sweep config through the eval runner and record it in the "
        "results store (<runs>/results.sqlite). Rerunning skips complete cells and resumes interrupted ones. "
        "See docs/sweeps.md.",
    )
    p.add_argument("config", help="sweep config (YAML), e.g. configs/eval.yaml")
    p.add_argument("--model", help="local llava-hf checkpoint directory (or 'toy'); required unless --dry-run")
    p.add_argument("--model-id", help="model name in the store and run folders (default: the model folder's name)")
    p.add_argument("--data-root", help="LLaVA's playground/data/eval folder; required unless --dry-run")
    p.add_argument("--runs", default="runs", help="runs folder: run directories and results.sqlite (default: runs)")
    p.add_argument("--store", help="results store file (default: <runs>/results.sqlite)")
    p.add_argument("--variant", help="a named variant of the config (e.g. 'original' in head_ablation.yaml)")
    p.add_argument("--only", action="append", metavar="KEY=V1[,V2]",
                   help="run only matching cells (method, benchmark, tokens, heads, strategy, run_id or any "
                   "parameter; repeatable, all must match)")
    p.add_argument("--exclude", action="append", metavar="KEY=V1[,V2]", help="skip matching cells (repeatable)")
    p.add_argument("--cell", action="append", metavar="RUN_ID", help="run only these cells (ids from --dry-run)")
    p.add_argument("--param", action="append", metavar="[METHOD.]KEY=VALUE",
                   help="set a method parameter for every method that accepts it, or for one method "
                   "(e.g. cdpruner.clip_model=PATH); changes the cells' identity")
    p.add_argument("--gpus", help="one worker per GPU: '0,1,2,3', a count ('4') or 'all'")
    p.add_argument("--batch-size", type=int, help="override the config's batch size (not part of a cell's identity)")
    p.add_argument("--limit", type=int, help="only the first N questions of each benchmark (a different cell)")
    p.add_argument("--dtype", help="model dtype, e.g. float16 (part of a cell's identity)")
    p.add_argument("--device", help="device (default: cuda when available, else cpu)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status; run nothing")
    p.add_argument("--force", action="store_true", help="rerun (and rescore) complete cells too")
    p.add_argument("--reclaim", action="store_true", help="take over cells marked running by other sessions")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="show each cell's question progress bar")
    p.add_argument("--worker-session", help=argparse.SUPPRESS)
    p.set_defaults(func=run_sweep_command)


def _options(args: argparse.Namespace) -> Any:
    from finepruner.methods.spec import parse_params
    from finepruner.sweep.config import parse_filters
    from finepruner.sweep.runner import SweepOptions

    only = parse_filters(args.only)
    if args.cell:
        only.append(("run_id", [c for item in args.cell for c in item.split(",")]))
    return SweepOptions(
        data_root=args.data_root or "", runs_dir=args.runs, model=args.model, model_id=args.model_id,
        store=args.store, only=only, exclude=parse_filters(args.exclude),
        overrides=parse_params(args.param, "--param"), batch_size=args.batch_size, limit=args.limit,
        dtype=args.dtype, device=args.device, force=args.force, reclaim=args.reclaim, fail_fast=args.fail_fast,
        progress=not args.no_progress, eval_progress=args.verbose,
        session=args.worker_session,
    )


def _dry_run(sweep: Any, opts: Any, cells: list[Any], named: bool) -> int:
    """List the cells; their run ids (which hash the model name) only when the model is named."""
    from finepruner.sweep.store import ResultsStore

    status: dict[str, str] = {}
    if named and opts.store_path.exists():
        with ResultsStore(opts.store_path, create=False) as store:
            status = {c.run_id: store.status(c.run_id) or "new" for c in cells}
    counts: dict[str, int] = {}
    for cell in cells:
        st = status.get(cell.run_id, "new") if named else "-"
        counts[st] = counts.get(st, 0) + 1
        rid = cell.run_id if named else "-" * 16
        print(f"{rid}  {st:8s}  {cell.benchmark:12s}  {cell.label}")
    if named:
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        print(f"{sweep.full_name}: {len(cells)} cells ({summary})")
    else:
        print(f"{sweep.full_name}: {len(cells)} cells (run ids and status hash the model name: pass --model "
              "or --model-id to list them)")
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    """Validate everything (config, --param, --gpus, every cell's parameters, data, the model's
    config.json) before loading a model or starting a worker, then run the sweep."""
    from finepruner.eval.errors import EvalError
    from finepruner.sweep.config import (
        SweepConfigError,
        check_device,
        check_dtype,
        check_filters,
        load_sweep,
        model_shape,
        validate_cells,
    )
    from finepruner.sweep.runner import check_data, parse_gpus, plan_cells, run_parallel, run_sweep
    from finepruner.sweep.store import StoreError

    try:
        for flag, value, low in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1)):
            if value is not None and value < low:
                raise SweepConfigError(f"{flag} {value}: must be an integer >= {low}")
        sweep = load_sweep(args.config, variant=args.variant)
        opts = _options(args)
        check_filters(sweep, opts.only, "--only")
        check_filters(sweep, opts.exclude, "--exclude")
        if args.dtype is not None:
            check_dtype(args.dtype, "--dtype")
        if args.device is not None:
            check_device(args.device)
        for flag, path in (("--runs", Path(args.runs)), ("--store", opts.store_path)):
            if path.exists() and (path.is_dir() if flag == "--store" else not path.is_dir()):
                raise SweepConfigError(f"{flag} {path}: is a {'folder' if path.is_dir() else 'file'}; "
                                       f"expected a {'file' if flag == '--store' else 'folder'}")
        gpus = parse_gpus(args.gpus) if args.gpus is not None and not args.worker_session else []
        cells = plan_cells(sweep, opts)
        if not cells:
            hint = (" (run ids hash the model name: take them from --dry-run with the same --model)"
                    if args.cell else "")
            raise SweepConfigError(f"no cell matches --only/--exclude/--cell{hint}")
        if args.dry_run:
            shape = model_shape(args.model) if args.model else None
            _dry_run(sweep, opts, cells, named=bool(args.model or args.model_id))
            validate_cells(cells, shape)  # after the listing, so that a bad cell does not hide the grid
            return 0
        missing = [flag for flag, value in (("--model", args.model), ("--data-root", args.data_root)) if not value]
        if missing:
            raise SweepConfigError(f"finepruner sweep needs {' and '.join(missing)} (or --dry-run)")
        check_data(cells, opts.data_root)
        validate_cells(cells, model_shape(args.model))
        if gpus:
            import os

            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise SweepConfigError("--gpus and torchrun do not mix: use one or the other")
            result = run_parallel(_reconstruct_argv(args), gpus, sweep, opts)
        else:
            result = run_sweep(sweep, opts)
    except (SweepConfigError, StoreError, EvalError, ValueError, OSError) as err:
        print(f"finepruner sweep: error: {err}", file=sys.stderr)
        return 2
    tail = "".join([f", {result.busy} held by other workers" if result.busy else "",
                    f", {result.undone} not run" if result.undone else ""])
    print(f"{sweep.full_name}: {result.cells} cells: {result.completed} run, {result.skipped} already complete, "
          f"{result.failed} failed{tail}")
    for run_id, error in result.errors.items():
        print(f"  failed {run_id}: {error}", file=sys.stderr)
    for gpu, why in result.workers.items():
        print(f"  GPU {gpu}: {why}", file=sys.stderr)
    if result.undone:
        print(f"  {result.undone} cell(s) neither complete nor failed: rerun the same command to finish them",
              file=sys.stderr)
    return 0 if result.ok else 1


def _reconstruct_argv(args: argparse.Namespace) -> list[str]:
    """The ``sweep`` arguments as a list (when the CLI was called from Python, not a shell)."""
    out = ["sweep", args.config]
    for flag, value in (("--model", args.model), ("--model-id", args.model_id), ("--data-root", args.data_root),
                        ("--runs", args.runs), ("--store", args.store), ("--variant", args.variant),
                        ("--batch-size", args.batch_size), ("--limit", args.limit), ("--dtype", args.dtype),
                        ("--device", args.device)):
        if value is not None:
            out += [flag, str(value)]
    for flag, values in (("--only", args.only), ("--exclude", args.exclude), ("--cell", args.cell),
                         ("--param", args.param)):
        for v in values or []:
            out += [flag, v]
    for flag, on in (("--force", args.force), ("--reclaim", args.reclaim), ("--fail-fast", args.fail_fast),
                     ("--verbose", args.verbose)):
        if on:
            out.append(flag)
    return out
