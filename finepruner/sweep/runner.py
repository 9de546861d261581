"""Run a sweep: every pending cell through the eval runner, recorded in the results store.

* Cells already ``complete`` in the store are skipped; a cell that was interrupted is rerun and the eval
  runner resumes its answers file (``finepruner/eval/runner.py``), so nothing finished is regenerated.
* The model is loaded once per process and reused for every cell (methods are applied and removed).
* ``--gpus 0,1,...``: one worker process per GPU (``CUDA_VISIBLE_DEVICES`` pinned), each claiming the next
  pending cell from the store; a crash in one cell marks it ``failed`` and the worker goes on.
* Under ``torchrun`` every rank walks the same cells and each cell's questions are sharded across ranks
  (rank 0 scores and writes the store).
* What a cell stores is what ``evaluate`` returned (``finepruner.eval.runner.EvalResult``): its metrics,
  per-question results, efficiency (means of the per-sample figures the eval recorded), timing and
  resolved configuration; nothing is read back from the run folder and no sample is generated again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finepruner.sweep.config import Cell, Sweep, cell_matches
from finepruner.sweep.store import DEFAULT_NAME, ResultsStore, code_version


@dataclass
class SweepOptions:
    data_root: str
    runs_dir: str = "runs"
    model: str | None = None
    model_id: str | None = None
    store: str | None = None
    only: list[tuple[str, list[str]]] = field(default_factory=list)
    exclude: list[tuple[str, list[str]]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    limit: int | None = None
    dtype: str | None = None
    device: str | None = None
    force: bool = False
    reclaim: bool = False
    fail_fast: bool = False
    progress: bool = True
    eval_progress: bool = False
    session: str | None = None

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path(self.runs_dir) / DEFAULT_NAME

    def resolved_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        if self.model:
            return Path(str(self.model).rstrip("/")).name or str(self.model)
        return "model"


@dataclass
class SweepResult:
    cells: int = 0
    skipped: int = 0
    completed: int = 0
    failed: int = 0
    busy: int = 0  # claimed by another live worker
    errors: dict[str, str] = field(default_factory=dict)
    undone: int = 0  # neither complete nor failed when the sweep ended (e.g. a worker died)
    workers: dict[str, str] = field(default_factory=dict)  # GPU -> why its worker failed

    @property
    def ok(self) -> bool:
        """Every cell complete (or held by another live sweep) and every worker exited cleanly."""
        return not (self.failed or self.undone or self.workers)


def plan_cells(sweep: Sweep, opts: SweepOptions) -> list[Cell]:
    """The sweep's cells after ``--only``/``--exclude`` filters, settings overrides applied."""
    settings_override = {k: v for k, v in (("limit", opts.limit), ("dtype", opts.dtype)) if v is not None}
    if settings_override:
        sweep = Sweep(**{**sweep.__dict__, "settings": {**sweep.settings, **settings_override}})
    cells = sweep.cells(model_id=opts.resolved_model_id(), overrides=opts.overrides)
    cells = [c for c in cells if cell_matches(c, opts.only)]
    if opts.exclude:
        cells = [c for c in cells if not any(cell_matches(c, [f]) for f in opts.exclude)]
    return cells


def check_data(cells: Sequence[Cell], data_root: str | Path) -> None:
    """Every benchmark's files exist (before any model is loaded); raises ``DataError`` naming them."""
    from finepruner.eval import benchmarks
    from finepruner.eval.errors import DataError

    problems, seen = [], set()
    for cell in cells:
        files = (cell.settings.get("files") or {}).get(benchmarks.parse_spec(cell.benchmark)[0])
        key = (cell.benchmark, json.dumps(files, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        try:
            benchmarks.get(cell.benchmark, files=files).check(data_root)
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError("; ".join(dict.fromkeys(problems)))


class IncompleteCell(RuntimeError):
    """A cell whose run ended without an answer for every question (or with error records)."""


def cell_efficiency(run: Any) -> dict[str, Any]:
    """A cell's stored efficiency figures from its ``BenchmarkRun``: the means of the per-sample figures
    (``metrics["efficiency"]``), under the report's names as well (``tflops``: language-model prefill
    TFLOPs per sample, multiply-add = 2; ``paper_tflops``: the papers' count; ``visual_tokens``: tokens
    entering each decoder layer), and the generation throughput."""
    summary = dict(run.efficiency_summary or {})
    out: dict[str, Any] = dict(summary)
    for name, key in (("tflops", "mean_prefill_tflops"), ("paper_tflops", "mean_paper_tflops"),
                      ("visual_tokens", "mean_visual_tokens"), ("average_visual_tokens", "mean_average_visual_tokens"),
                      ("selection_seconds", "mean_selection_seconds")):
        if summary.get(key) is not None:
            out[name] = summary[key]
    if run.timing.get("questions_per_second") is not None:
        out["questions_per_second"] = run.timing["questions_per_second"]
    return out


def _distributed_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_sweep(
    sweep: Sweep,
    opts: SweepOptions,
    *,
    model: Any = None,
    processor: Any = None,
    cells: list[Cell] | None = None,
    on_batch: Callable[[Cell, int], None] | None = None,
) -> SweepResult:
    """Run the pending cells of ``sweep`` in this process (see the module docstring)."""
    from tqdm import tqdm

    from finepruner.eval.runner import EvalConfig, evaluate

    cells = plan_cells(sweep, opts) if cells is None else cells
    check_data(cells, opts.data_root)
    rank, world = _distributed_rank()
    runs_dir = Path(opts.runs_dir)
    store = ResultsStore(opts.store_path)
    result = SweepResult(cells=len(cells))
    session = opts.session or uuid.uuid4().hex[:12]
    version = code_version()
    try:
        if rank == 0:
            store.register(cells, sweep.full_name)
        todo = [c for c in cells if opts.force or store.status(c.run_id) != "complete"]
        result.skipped = len(cells) - len(todo)
        bar = tqdm(total=len(cells), initial=result.skipped, desc=f"sweep {sweep.full_name}", unit="cell",
                   disable=not opts.progress or rank != 0, dynamic_ncols=True)
        for cell in todo:
            if world == 1 and not store.claim(cell.run_id, session, force=opts.force, reclaim=opts.reclaim):
                if store.status(cell.run_id) == "complete":
                    result.skipped += 1
                else:
                    result.busy += 1
                bar.update(1)
                continue
            if world > 1 and rank == 0:
                store.claim(cell.run_id, session, force=True, reclaim=True)
            bar.set_postfix_str(f"{cell.benchmark} {cell.label}"[:60])
            if model is None:
                from finepruner.eval.distributed import init_distributed
                from finepruner.models.loading import load_model

                if not opts.model:
                    raise ValueError("no model: pass --model PATH")
                device = opts.device or init_distributed().default_device()
                extra = cell.settings.get("processor_kwargs")
                model, processor = load_model(opts.model, dtype=opts.dtype or cell.settings.get("dtype"),
                                              device=device, **({"processor_kwargs": dict(extra)} if extra else {}))
            run_dir = runs_dir / cell.relative_dir()
            s = cell.settings
            config = EvalConfig(
                benches=[cell.benchmark], data_root=str(opts.data_root), out=str(run_dir), model=opts.model,
                model_id=cell.model_id, method=cell.method, method_params=dict(cell.params),
                batch_size=opts.batch_size or int(s.get("batch_size") or 1), limit=s.get("limit"),
                max_new_tokens=s.get("max_new_tokens"), image_aspect_ratio=s.get("image_aspect_ratio"),
                files=dict(s.get("files") or {}), processor_kwargs=dict(s.get("processor_kwargs") or {}),
                dtype=s.get("dtype"), device=opts.device,
                progress=opts.eval_progress,
            )
            try:
                evaluated = evaluate(
                    config, model=model, processor=processor,
                    on_batch=(lambda _spec, b, _c=cell: on_batch(_c, b)) if on_batch else None,
                )
                if rank == 0:
                    spec = next(iter(evaluated))
                    metrics = evaluated[spec]
                    if not metrics.get("complete"):  # evaluate's own count (limit applied)
                        raise IncompleteCell(
                            f"incomplete: {metrics.get('missing')} of {metrics.get('expected')} questions without "
                            f"an answer, {metrics.get('errors')} answers recorded as errors; not stored as "
                            "complete (the next sweep reruns the cell)"
                        )
                    run = evaluated.runs[spec]
                    timing = {**run.timing, "model_load_seconds": evaluated.timing["model_load_seconds"]}
                    store.complete(
                        cell.run_id, metrics=metrics, run_dir=run_dir, answers_path=run.answers_file,
                        efficiency=cell_efficiency(run), timing=timing, config=evaluated.record,
                        version=version, results=run.results.to_json(),
                    )
                result.completed += 1
            except KeyboardInterrupt:
                if rank == 0:
                    store.release(cell.run_id)
                raise
            except Exception as err:
                message = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
                result.failed += 1
                result.errors[cell.run_id] = f"{type(err).__name__}: {err}"
                if rank == 0:
                    store.fail(cell.run_id, message)
                    tqdm.write(f"cell failed: {cell.benchmark} {cell.label} ({cell.run_id}): "
                               f"{type(err).__name__}: {err}")
                if opts.fail_fast or world > 1:
                    raise
            bar.update(1)
        bar.close()
    finally:
        store.close()
    return result


# -- one worker per GPU -------------------------------------------------------------------------------
def parse_gpus(text: str | None, available: int | None = None) -> list[str]:
    """``"0,1,3"`` -> ["0", "1", "3"]; ``"4"`` alone means GPUs 0..3; ``"all"`` every visible GPU.

    Every index is checked against the ``available`` CUDA devices (default: ``torch.cuda.device_count()``)
    before anything starts; raises ``ValueError`` naming the bad item and what is allowed."""
    if text is None:
        return []
    text = text.strip()
    if not text:
        raise ValueError("--gpus is empty; allowed: a comma-separated list of GPU indices ('0,1'), a count "
                         "('4') or 'all'")
    if available is None:
        import torch

        available = torch.cuda.device_count()
    have = (f"this machine has {available} CUDA device(s) (indices 0..{available - 1})" if available
            else "no CUDA device is visible here (torch.cuda.device_count() is 0); run without --gpus")
    if text == "all":
        if not available:
            raise ValueError(f"--gpus all: {have}")
        return [str(i) for i in range(available)]
    if text.isdigit() and "," not in text:
        count = int(text)
        if count < 1 or count > available:
            raise ValueError(f"--gpus {text}: a count of GPUs must be 1..{available}; {have}" if available
                             else f"--gpus {text}: {have}")
        return [str(i) for i in range(count)]
    gpus = [g.strip() for g in text.split(",")]
    for g in gpus:
        if not g.isdigit():
            raise ValueError(f"--gpus {text}: {g!r} is not a GPU index; allowed: a comma-separated list of "
                             "non-negative integers ('0,1'), a count ('4') or 'all'")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus lists a GPU twice: {text}")
    beyond = [g for g in gpus if int(g) >= available]
    if beyond:
        raise ValueError(f"--gpus {text}: GPU {', '.join(beyond)} not present; {have}")
    return gpus


def worker_commands(argv: Sequence[str], gpus: Sequence[str], session: str,
                    env: dict[str, str] | None = None) -> list[tuple[list[str], dict[str, str]]]:
    """The command line and environment of each GPU worker: the same ``sweep`` arguments without
    ``--gpus``, plus ``--worker-session``, with ``CUDA_VISIBLE_DEVICES`` pinned to one GPU."""
    clean: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus="):
            continue
        clean.append(arg)
    base = env if env is not None else dict(os.environ)
    # GPU indices count the devices visible to this process: map them through CUDA_VISIBLE_DEVICES
    visible = [v.strip() for v in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    out = []
    for gpu in gpus:
        device = visible[int(gpu)] if visible and str(gpu).isdigit() and int(gpu) < len(visible) else str(gpu)
        worker_env = {**base, "CUDA_VISIBLE_DEVICES": device}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            worker_env.pop(var, None)
        cmd = [sys.executable, "-m", "finepruner", *clean, "--worker-session", session, "--no-progress"]
        out.append((cmd, worker_env))
    return out


def run_parallel(argv: Sequence[str], gpus: Sequence[str], sweep: Sweep, opts: SweepOptions,
                 poll_seconds: float = 5.0) -> SweepResult:
    """Spawn one worker per GPU (logs in ``<runs>/logs/``) and follow the store until they exit."""
    from tqdm import tqdm

    cells = plan_cells(sweep, opts)
    check_data(cells, opts.data_root)
    session = uuid.uuid4().hex[:12]
    with ResultsStore(opts.store_path) as store:
        store.register(cells, sweep.full_name)
        ids = [c.run_id for c in cells]
        done0 = store.counts(ids)["complete"]
    log_dir = Path(opts.runs_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for (cmd, env), gpu in zip(worker_commands(argv, gpus, session), gpus):
        log = (log_dir / f"sweep-{session}-gpu{gpu}.log").open("w")
        log.write("$ CUDA_VISIBLE_DEVICES=" + str(gpu) + " " + shlex.join(cmd) + "\n")
        log.flush()
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    bar = tqdm(total=len(cells), initial=done0, desc=f"sweep {sweep.full_name} ({len(gpus)} GPUs)", unit="cell",
               disable=not opts.progress)
    last = done0
    try:
        while any(p.poll() is None for p, _ in procs):
            try:  # wake up when a worker exits, or every poll_seconds to update the bar
                next(p for p, _ in procs if p.poll() is None).wait(timeout=poll_seconds)
            except (StopIteration, subprocess.TimeoutExpired):
                pass
            with ResultsStore(opts.store_path) as store:
                now = store.counts(ids)
            done = now["complete"] + now["failed"]
            bar.update(max(0, done - last))
            last = max(last, done)
    except KeyboardInterrupt:
        for p, _ in procs:
            p.terminate()
        raise
    finally:
        bar.close()
        for _, log in procs:
            log.close()
    workers = {}
    for (proc, log), gpu in zip(procs, gpus):
        if proc.returncode != 0:
            workers[str(gpu)] = f"worker exited with code {proc.returncode} (log: {log.name})"
    with ResultsStore(opts.store_path) as store:
        final = store.counts(ids)
        errors = {r.run_id: ((r.error or "").splitlines() or [""])[0]
                  for r in store.runs(status="failed") if r.run_id in ids}
    undone = len(ids) - final["complete"] - final["failed"]
    return SweepResult(cells=len(cells), skipped=done0, completed=final["complete"] - done0,
                       failed=final["failed"], errors=errors, undone=undone, workers=workers)
