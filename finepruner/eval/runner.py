"""The benchmark-agnostic runner (issue 3, items 3-4): batched greedy generation, resumable answer files,
sharding across torchrun ranks, scoring and the run directory.

Run directory layout (``--out DIR``)::

    DIR/config.json              resolved configuration (model, method + params, benchmarks, files, ...)
    DIR/metrics.json             {benchmark: metrics} of every benchmark of the run
    DIR/timing.json              model load and per-benchmark generation time, questions/s
    DIR/<bench>/answers.jsonl    LLaVA-format answers, in question order (rank 0 merges shards into it)
    DIR/<bench>/answers.rank<R>.jsonl   per-rank shards while a torchrun run is in progress
    DIR/<bench>/metrics.json     the benchmark's metrics; ``expected`` (questions of this run, after
                                 --limit), ``missing`` (of those, without an answer), ``errors`` (answers
                                 recorded as errors, retried on resume) and ``complete`` (both are 0)
    DIR/<bench>/submission/      official upload/result files where a server or a judge is needed

``evaluate`` returns an :class:`EvalResult`: the resolved configuration (what ``config.json`` holds), and
per benchmark its metrics, its per-question results (``Benchmark.question_results``), the per-sample
efficiency figures of the pruning handle and its timing. Callers (the sweep) use it directly; the
files above are for users and for resuming, never read back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from finepruner.eval import benchmarks
from finepruner.eval.aggregation import QuestionResults
from finepruner.eval.benchmarks.base import Benchmark, Sample
from finepruner.eval.distributed import DistContext, contiguous_chunk, init_distributed
from finepruner.eval.errors import DataError, EvalError
from finepruner.eval.io import (
    AnswerWriter,
    is_error_record,
    iter_existing_answers,
    new_answer_id,
    read_answers,
    validate_answers,
    write_json,
)
from finepruner.eval.prompting import IMAGE_ASPECT_RATIOS, expand2square, image_background

#: ``--method`` values that apply nothing (plain transformers). ``vanilla`` goes through the engine, which
#: then prunes nothing and records the prefill's tokens and FLOPs.
NO_METHOD = (None, "", "none")
#: Methods that take no parameter.
PARAMETERLESS = (*NO_METHOD, "vanilla")


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (saved as ``config.json``)."""

    benches: list[str]
    data_root: str
    out: str
    model: str | None = None
    model_id: str | None = None
    method: str | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    limit: int | None = None
    max_new_tokens: int | None = None
    #: ``"pad"`` (LLaVA-1.5's expand2square) or ``"original"``; None: the model family's default
    #: (``ModelAdapter.default_image_aspect_ratio``: pad on LLaVA-1.5, original on NeXT and OneVision).
    image_aspect_ratio: str | None = None
    #: image-token layout of the model family (``ModelAdapter.layouts``): ``"hf"`` (the model's own) or, on
    #: LLaVA-NeXT, ``"paper2880"`` (the papers' fixed 5 x 576 tokens, ``docs/models.md``).
    layout: str = "hf"
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    #: extra keyword arguments of the model's processor (``--processor-arg``, e.g. Qwen's ``min_pixels``),
    #: passed to ``load_model(..., processor_kwargs=...)``.
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    device: str | None = None
    judge_model: str | None = None
    judge_base_url: str | None = None
    progress: bool = True

    def check(self) -> None:
        """Raise :class:`EvalError` naming the option for a value that is out of range or inconsistent.

        Cheap checks only (no file is read except ``out``'s type, no model or method is built).
        """
        if not self.benches:
            raise EvalError("no benchmark: pass --bench NAME")
        names = [benchmarks.parse_spec(spec) for spec in self.benches]
        repeated = sorted({f"{n}:{sp}" if sp else n for n, sp in names if names.count((n, sp)) > 1})
        if repeated:
            raise EvalError(f"--bench {', '.join(repeated)} given more than once")
        for flag, value, minimum in (
            ("--batch-size", self.batch_size, 1),
            ("--limit", self.limit, 1),
            ("--max-new-tokens", self.max_new_tokens, 1),
        ):
            if value is None and flag != "--batch-size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise EvalError(f"{flag} must be an integer >= {minimum}, got {value!r}")
        if self.method in PARAMETERLESS and self.method_params:
            from finepruner import methods

            raise EvalError(
                f"method parameter(s) {', '.join(sorted(self.method_params))} given without a pruning method "
                f"(--method is {self.method or 'not set'}, which takes none): add --method, one of "
                f"{', '.join(m for m in methods.available() if m != 'vanilla')}"
            )
        unknown = sorted(set(self.files) - {n for n, _ in names})
        if unknown:
            raise EvalError(
                f"--file names benchmark(s) {', '.join(unknown)} that are not in --bench "
                f"({', '.join(self.benches)})"
            )
        if self.image_aspect_ratio is not None and self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise EvalError(
                f"--image-aspect-ratio must be one of {', '.join(IMAGE_ASPECT_RATIOS)}, got {self.image_aspect_ratio!r}"
            )
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise EvalError(f"--out {out} is a file; pass a directory (the run directory, created if missing)")
        from finepruner.models.loading import check_device, parse_dtype

        for flag, check, value in (("--dtype", parse_dtype, self.dtype), ("--device", check_device, self.device)):
            try:
                check(value)
            except ValueError as err:
                raise EvalError(f"{flag}: {err}") from err
        if self.processor_kwargs and not isinstance(self.processor_kwargs, Mapping):
            raise EvalError(f"--processor-arg: expected KEY=VALUE items, got {self.processor_kwargs!r}")

    def resolved_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        if self.model:
            return Path(str(self.model)).name or str(self.model)
        return "model"


def prune_summary(handle: Any) -> dict[str, Any] | None:
    """Per-sample efficiency figures of the handle's last prefill (``finepruner.bench.flops``), or None."""
    stats = getattr(handle, "stats", None)
    if stats is None:
        return None
    flops = stats.flops or {}
    per_sample = {
        key: flops[key] / stats.batch / 1e12
        for key in ("language_model", "total")
        if flops.get(key) is not None
    }
    return {
        "average_visual_tokens": stats.average_visual_tokens,
        "visual_tokens": list(stats.visual_tokens),
        "prefill_tflops": per_sample.get("language_model"),
        "prefill_tflops_with_vision": per_sample.get("total"),
        "paper_tflops": flops.get("paper_tflops_per_sample"),
        "selection_seconds": stats.selection_seconds / stats.batch,
    }


def sample_efficiency(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-sample ``prune`` figures of the answers that carry them (samples with an image)."""
    rows = [(a.get("metadata") or {}).get("prune") for a in answers]
    return [r for r in rows if r]


def efficiency_summary(answers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Means of the per-sample ``prune`` figures over the answers that carry them (None if none do);
    per-layer lists (``visual_tokens``) are averaged layer by layer when every sample has the same depth."""
    rows = sample_efficiency(answers)
    if not rows:
        return None
    summary: dict[str, Any] = {"samples": len(rows)}
    for key in rows[0]:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values and all(isinstance(v, list) for v in values):
            depth = {len(v) for v in values}
            summary[f"mean_{key}"] = [sum(col) / len(col) for col in zip(*values)] if len(depth) == 1 else None
        else:
            summary[f"mean_{key}"] = sum(values) / len(values) if values else None
    return summary


def answer_record(sample: Sample, text: str, model_id: str, error: str | None = None) -> dict[str, Any]:
    """One answers-file line in LLaVA's format (plus ``metadata.error`` for a failed sample)."""
    record: dict[str, Any] = {"question_id": sample.question_id}
    if "round_id" in sample.extra:
        record["round_id"] = sample.extra["round_id"]
    record["prompt"] = sample.prompt
    record["text"] = text
    record.update({k: v for k, v in sample.extra.items() if k != "round_id"})
    record["answer_id"] = new_answer_id()
    record["model_id"] = model_id
    record["metadata"] = {"error": error} if error else {}
    return record


class Generator:
    """Greedy batched generation with left padding for one (possibly pruned) model of any registered
    family: the prompt is the family's (``ModelAdapter.build_prompt``: LLaVA-1.5's ``vicuna_v1`` string,
    otherwise the processor's chat template) and every tensor the processor returns is passed to the
    model (``image_sizes`` of the anyres families included).

    ``image_aspect_ratio`` None takes the family's default (``ModelAdapter.default_image_aspect_ratio``):
    ``"pad"`` (expand2square with the mean colour) on LLaVA-1.5, ``"original"`` on LLaVA-NeXT/OneVision,
    whose processors tile the image themselves (anyres).
    """

    def __init__(self, model: Any, processor: Any, image_aspect_ratio: str | None = None) -> None:
        from finepruner.models.adapters import adapter_for

        self.adapter = adapter_for(model)
        if image_aspect_ratio is None:
            image_aspect_ratio = self.adapter.default_image_aspect_ratio
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}"
            )
        self.model = model
        self.processor = processor
        self.image_aspect_ratio = image_aspect_ratio
        self.background = image_background(processor)
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        #: The pruning ``Handle`` applied to ``model``, if any: its per-prefill statistics are recorded.
        self.handle: Any = None
        self._last_prune: dict[str, Any] | None = None

    def prepare_image(self, sample: Sample) -> Any:
        image = sample.open_image()
        if self.image_aspect_ratio == "pad":
            image = expand2square(image, self.background)
        return image

    def build_prompt(self, text: str, has_image: bool) -> str:
        """The prompt of one question (USER message): the family's (``ModelAdapter.build_prompt``)."""
        return self.adapter.build_prompt(text, has_image, self.processor)

    def model_inputs(self, prompts: list[str], images: list[Any] | None) -> dict[str, Any]:
        """The processor's output for ``prompts`` (and ``images``), every tensor on the model's device and
        ``pixel_values`` in its dtype (``image_sizes`` and the other keys as the processor returns them)."""
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if images is not None:
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        param = next(self.model.parameters())
        inputs = {k: v.to(param.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
        return inputs

    @torch.inference_mode()
    def generate(self, texts: list[str], images: list[Any] | None, max_new_tokens: int) -> list[str]:
        """Answers for ``texts`` (USER messages), all with images or all without."""
        prompts = [self.build_prompt(t, images is not None) for t in texts]
        inputs = self.model_inputs(prompts, images)
        out = self.model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self._last_prune = prune_summary(self.handle) if images is not None else None
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def answer_batch(self, batch: list[Sample], max_new_tokens: int, model_id: str) -> list[dict[str, Any]]:
        """Records for ``batch`` in order; an unreadable image makes that sample an error record."""
        records: list[dict[str, Any] | None] = [None] * len(batch)
        with_image: list[tuple[int, Any]] = []
        without: list[int] = []
        for i, sample in enumerate(batch):
            if not sample.has_image:
                without.append(i)
                continue
            try:
                with_image.append((i, self.prepare_image(sample)))
            except Exception as err:  # any decoding failure marks the sample
                records[i] = answer_record(
                    sample, "", model_id, error=f"cannot read image {sample.image_ref}: {err}"
                )
        if with_image:
            texts = self.generate(
                [batch[i].text for i, _ in with_image], [im for _, im in with_image], max_new_tokens
            )
            for (i, _), text in zip(with_image, texts, strict=True):
                records[i] = answer_record(batch[i], text, model_id)
                if self._last_prune is not None:
                    records[i]["metadata"]["prune"] = self._last_prune
        if without:
            texts = self.generate([batch[i].text for i in without], None, max_new_tokens)
            for i, text in zip(without, texts, strict=True):
                records[i] = answer_record(batch[i], text, model_id)
        return [r for r in records if r is not None]


def _answer_files(bench_dir: Path) -> list[Path]:
    return [bench_dir / "answers.jsonl", *sorted(bench_dir.glob("answers.rank*.jsonl"))]


def merge_answers(bench_dir: Path, samples: list[Sample]) -> list[dict[str, Any]]:
    """Merge ``answers.jsonl`` and rank shards into ``answers.jsonl`` in question order; returns the
    answers of ``samples`` (records of questions outside ``samples`` are kept after them).

    One record per question: the first, unless it is an error record and a later one exists."""
    by_key: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for rec in iter_existing_answers(_answer_files(bench_dir)):
        key = json.dumps([rec.get("question_id"), rec.get("prompt")], ensure_ascii=False)
        if key not in by_key:
            by_key[key] = rec
            order.append(key)
        elif is_error_record(by_key[key]):  # a retry of a failed sample replaces the error record
            by_key[key] = rec
    wanted = [s.key for s in samples]
    wanted_set = set(wanted)
    current = [by_key[k] for k in wanted if k in by_key]
    others = [by_key[k] for k in order if k not in wanted_set]
    tmp = bench_dir / "answers.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in (*current, *others):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(bench_dir / "answers.jsonl")
    for shard in bench_dir.glob("answers.rank*.jsonl"):
        shard.unlink()
    return current


def run_benchmark(
    generator: Generator,
    bench: Benchmark,
    data_root: str | Path,
    bench_dir: Path,
    *,
    batch_size: int = 1,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    model_id: str = "model",
    ctx: DistContext | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    samples: list[Sample] | None = None,
) -> dict[str, Any]:
    """Generate the missing answers of one benchmark (this rank's share); returns timing and counts.

    ``samples``: the benchmark's samples, already cut to ``limit`` (default: loaded here).

    Answers already in ``bench_dir`` (from an interrupted run) are skipped, except those recorded as
    errors, which are retried; a torn last line from a crash is cut off first. Every batch is appended
    and flushed, so a crash loses at most one batch. ``on_batch(i)`` is called after batch ``i`` is written.
    """
    ctx = ctx or DistContext()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if samples is None:
        samples = bench.load(data_root)
        if limit is not None:
            samples = samples[:limit]
    done = {
        json.dumps([r.get("question_id"), r.get("prompt")], ensure_ascii=False)
        for r in iter_existing_answers(_answer_files(bench_dir))
        if not is_error_record(r)
    }
    ctx.barrier()  # every rank has read the existing answers before anyone appends
    pending = [s for s in samples if s.key not in done]
    mine = contiguous_chunk(pending, ctx.world_size, ctx.rank)
    path = bench_dir / ("answers.jsonl" if not ctx.distributed else f"answers.rank{ctx.rank}.jsonl")
    tokens = max_new_tokens or bench.max_new_tokens
    from tqdm import tqdm

    start = time.perf_counter()
    errors = 0
    bar = tqdm(
        total=len(mine),
        desc=f"{bench.spec} [rank {ctx.rank}]" if ctx.distributed else bench.spec,
        unit="q",
        disable=not progress,
        dynamic_ncols=True,
        position=ctx.rank,
    )
    with AnswerWriter(path) as writer:
        for b, i in enumerate(range(0, len(mine), batch_size)):
            batch = mine[i : i + batch_size]
            records = generator.answer_batch(batch, tokens, model_id)
            errors += sum(1 for r in records if r["metadata"].get("error"))
            writer.write_batch(records)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(b)
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "questions": len(samples),
        "already_done": len(samples) - len(pending),
        "generated": len(mine),
        "errors_this_run": errors,
        "seconds": seconds,
        "questions_per_second": len(mine) / seconds if seconds > 0 and mine else None,
        "max_new_tokens": tokens,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
    }


def score_benchmark_results(
    bench: Benchmark,
    answers: list[dict[str, Any]],
    data_root: str | Path,
    bench_dir: Path | None,
    *,
    judge: Any = None,
    model_id: str = "model",
    source: str | Path = "answers",
) -> tuple[dict[str, Any], QuestionResults]:
    """Score ``answers`` (read from ``source``, named in errors): the metrics, with the error count
    (samples whose image could not be read), and the per-question results they were computed from;
    malformed or duplicate answers raise ``AnswersError``."""
    validate_answers(answers, source, identity=bench.answer_identity)
    out_dir = bench_dir / "submission" if bench_dir is not None else None
    results = bench.question_results(answers, data_root, out_dir=out_dir, judge=judge, model_id=model_id)
    metrics = bench.metrics_from(results)
    metrics["errors"] = sum(1 for a in answers if (a.get("metadata") or {}).get("error"))
    return metrics, results


def score_benchmark(
    bench: Benchmark,
    answers: list[dict[str, Any]],
    data_root: str | Path,
    bench_dir: Path | None,
    *,
    judge: Any = None,
    model_id: str = "model",
    source: str | Path = "answers",
) -> dict[str, Any]:
    """The metrics of :func:`score_benchmark_results`."""
    return score_benchmark_results(
        bench, answers, data_root, bench_dir, judge=judge, model_id=model_id, source=source
    )[0]


def _check_config_compatible(run_dir: Path, config: EvalConfig) -> None:
    old_path = run_dir / "config.json"
    if not old_path.is_file():
        return
    old = json.loads(old_path.read_text())
    for key in ("model_id", "method", "method_params", "image_aspect_ratio", "layout", "max_new_tokens",
                "processor_kwargs"):
        new_value = config.resolved_model_id() if key == "model_id" else getattr(config, key)
        if key in old and old[key] != new_value:
            raise EvalError(
                f"{old_path}: this run directory holds answers for {key}={old[key]!r}, not {new_value!r}; "
                "use another --out to avoid mixing answers"
            )


def build_method(method: str | None, params: Mapping[str, Any], shape: Any = None) -> Any:
    """The pruning method instance of ``--method``/its parameters (None for no method), built before the
    model loads so that an unknown method or a bad parameter fails early: the constructors validate, and
    with ``shape`` (the model's ``ModelShape`` from its ``config.json``) the method's plan and model
    checks run as well (as ``finepruner.sweep.config.check_method_params`` does for ``finepruner sweep``)."""
    if method in NO_METHOD:
        return None
    from finepruner import methods
    from finepruner.methods.base import check_shape

    tokens = params.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise EvalError(f"--method {method}: tokens must be an integer >= 1, got {tokens!r}")
    for key, kind in (("heads_from", "file"), ("clip_model", "directory")):
        value = params.get(key)
        if isinstance(value, str | Path) and not Path(value).expanduser().exists():
            raise EvalError(f"--method {method}: {key}={value}: no such {kind}")
    try:
        instance = methods.create(method, **params)
        if shape is not None:  # the plan and model checks ``apply`` would run after the load
            check_shape(instance, shape)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise EvalError(f"--method {method}: {err}") from err
    return instance


def model_shape_of(config: EvalConfig, model: Any = None) -> Any:
    """The ``ModelShape`` (decoder layers, heads, visual tokens) of the run's model: of ``model`` when
    given, else from the checkpoint's ``config.json`` (no weight is read)."""
    if model is not None:
        from finepruner.models.adapters import adapter_for

        return type(adapter_for(model)).shape_of(model.config)
    from finepruner.sweep.config import SweepConfigError, model_shape

    try:
        return model_shape(str(config.model))
    except SweepConfigError as err:
        raise EvalError(str(err)) from err


def _apply_method(model: Any, method: Any, processor: Any = None) -> Any:
    """Apply the method instance of :func:`build_method` to ``model``; returns its handle (or None). The
    processor is bound to the handle: methods that read each sample's instruction text decode it from
    the prompt with it (``finepruner.apply(..., processor=...)``)."""
    if method is None:
        return None
    from finepruner import apply

    try:
        return apply(model, method, processor=processor)
    except (ValueError, TypeError, FileNotFoundError) as err:  # e.g. a budget or resource this model lacks
        raise EvalError(f"--method {method.name}: {err}") from err


@dataclass
class BenchmarkRun:
    """One benchmark of an evaluation, as ``evaluate`` recorded it (rank 0)."""

    spec: str
    #: the scorer's output plus the run's counts (``expected``, ``missing``, ``complete``, ...), as
    #: ``<bench>/metrics.json``
    metrics: dict[str, Any]
    #: every scored question's ``process_results`` values (``Benchmark.question_results``)
    results: QuestionResults
    #: the pruning handle's figures of every sample with an image, in question order (``prune_summary``)
    efficiency: list[dict[str, Any]]
    #: generation time and counts of this process (``run_benchmark``)
    timing: dict[str, Any]
    answers_file: Path

    @property
    def efficiency_summary(self) -> dict[str, Any] | None:
        """Means over the samples (``metrics["efficiency"]``)."""
        return self.metrics.get("efficiency")


@dataclass
class EvalResult(Mapping[str, dict[str, Any]]):
    """What one ``evaluate`` call produced: a mapping ``{bench spec: metrics}`` (empty on ranks other than
    0), with the resolved configuration and, per benchmark, its :class:`BenchmarkRun`."""

    config: EvalConfig
    #: the resolved configuration as written to ``config.json`` (family, decoding, versions, ...)
    record: dict[str, Any]
    runs: dict[str, BenchmarkRun] = field(default_factory=dict)
    #: ``model_load_seconds`` and, per benchmark, its timing (``timing.json``)
    timing: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, spec: str) -> dict[str, Any]:
        return self.runs[spec].metrics

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)


def evaluate(
    config: EvalConfig,
    model: Any = None,
    processor: Any = None,
    on_batch: Callable[[str, int], None] | None = None,
) -> EvalResult:
    """Run every benchmark of ``config``; returns an :class:`EvalResult` (``{bench: metrics}`` on rank 0,
    empty elsewhere).

    Before the model is loaded: the options, the data paths, every question file, and the method with its
    parameters against the model's shape (decoder layers, heads, visual tokens, from ``config.json``).
    Each benchmark's data is read once for generation and once for scoring. Pass
    ``model``/``processor`` to evaluate an in-memory model (``config.model`` is then only recorded).
    """
    config.check()
    benches = [
        benchmarks.get(spec, files=config.files.get(benchmarks.parse_spec(spec)[0]))
        for spec in config.benches
    ]
    problems = []
    for bench in benches:
        try:
            bench.check(config.data_root)
        except DataError as err:
            if not Path(config.data_root).is_dir():
                raise
            problems.append(str(err))
    if problems:
        raise DataError("; ".join(problems))
    # parse every question file now: a malformed line is reported before the model loads
    samples_of = {bench.spec: bench.load(config.data_root)[: config.limit] for bench in benches}
    if model is None:
        if not config.model:
            raise EvalError("no model: pass --model PATH")
        from finepruner.models.loading import check_checkpoint, resolve_checkpoint

        family = check_checkpoint(resolve_checkpoint(config.model))
    else:
        from finepruner.models.adapters import adapter_for

        family = type(adapter_for(model))
    family.check_layout(config.layout)
    if config.image_aspect_ratio is None:  # the family's protocol, recorded (and compared on resume) as such
        config = replace(config, image_aspect_ratio=family.default_image_aspect_ratio)
    method = build_method(
        config.method, config.method_params, None if config.method in NO_METHOD else model_shape_of(config, model)
    )
    run_dir = Path(config.out)
    ctx = init_distributed()
    try:
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _check_config_compatible(run_dir, config)
        ctx.barrier()
        model_id = config.resolved_model_id()
        t0 = time.perf_counter()
        if model is None:
            from finepruner.models.loading import load_model

            extra = {"processor_kwargs": dict(config.processor_kwargs)} if config.processor_kwargs else {}
            model, processor = load_model(
                config.model, dtype=config.dtype, device=config.device or ctx.default_device(),
                layout=config.layout, **extra,
            )
        load_seconds = time.perf_counter() - t0
        handle = _apply_method(model, method, processor)
        record = _config_record(config, benches, ctx, family)
        if ctx.is_main:
            write_json(run_dir / "config.json", record)
        generator = Generator(model, processor, config.image_aspect_ratio)
        generator.handle = handle
        from finepruner.eval.judge import judge_from_settings

        judge = (
            judge_from_settings(
                config.judge_model, config.judge_base_url, cache_path=run_dir / "judge_cache.jsonl"
            )
            if ctx.is_main
            else None
        )
        out = EvalResult(config=config, record=record, timing={"model_load_seconds": load_seconds, "benchmarks": {}})
        all_metrics: dict[str, Any] = {}
        try:
            for bench in benches:
                bench_dir = run_dir / bench.spec.replace(":", "_")
                bench_dir.mkdir(parents=True, exist_ok=True)
                stats = run_benchmark(
                    generator,
                    bench,
                    config.data_root,
                    bench_dir,
                    batch_size=config.batch_size,
                    limit=config.limit,
                    max_new_tokens=config.max_new_tokens,
                    model_id=model_id,
                    ctx=ctx,
                    progress=config.progress,
                    on_batch=(lambda b, _s=bench.spec: on_batch(_s, b)) if on_batch else None,
                    samples=samples_of[bench.spec],
                )
                ctx.barrier()  # all shards written
                if ctx.is_main:
                    samples = samples_of[bench.spec]
                    answers = merge_answers(bench_dir, samples)
                    metrics, results = score_benchmark_results(
                        bench,
                        answers,
                        config.data_root,
                        bench_dir,
                        judge=judge,
                        model_id=model_id,
                        source=bench_dir / "answers.jsonl",
                    )
                    metrics["answers_file"] = str(bench_dir / "answers.jsonl")
                    metrics["expected"] = len(samples)
                    metrics["missing"] = len(samples) - len(answers)
                    metrics["complete"] = metrics["missing"] == 0 and metrics["errors"] == 0
                    metrics["efficiency"] = efficiency_summary(answers)
                    metrics["limit"] = config.limit
                    write_json(bench_dir / "metrics.json", metrics)
                    all_metrics[bench.spec] = metrics
                    out.timing["benchmarks"][bench.spec] = stats
                    out.runs[bench.spec] = BenchmarkRun(
                        spec=bench.spec, metrics=metrics, results=results, efficiency=sample_efficiency(answers),
                        timing=stats, answers_file=bench_dir / "answers.jsonl",
                    )
                    write_json(run_dir / "metrics.json", all_metrics)
                    write_json(run_dir / "timing.json", out.timing)
                ctx.barrier()
        finally:
            if handle is not None:
                handle.remove()
        return out
    finally:
        ctx.close()


def _config_record(config: EvalConfig, benches: list[Benchmark], ctx: DistContext, family: Any) -> dict[str, Any]:
    import transformers

    import finepruner

    record = asdict(config)
    record["model_id"] = config.resolved_model_id()
    record["benchmarks"] = {
        b.spec: {
            "name": b.name,
            "split": b.split,
            "files": dict(b.files),
            "max_new_tokens": config.max_new_tokens or b.max_new_tokens,
        }
        for b in benches
    }
    record["family"] = family.family_name()
    record["decoding"] = {"do_sample": False, "num_beams": 1, "conversation": family.conversation}
    record["world_size"] = ctx.world_size
    record["versions"] = {
        "finepruner": finepruner.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def score_file(
    bench_spec: str,
    answers_path: str | Path,
    data_root: str | Path,
    *,
    files: Mapping[str, str] | None = None,
    out_dir: str | Path | None = None,
    judge: Any = None,
    model_id: str | None = None,
) -> dict[str, Any]:
    """Metrics of an answers file (ours or LLaVA's); submissions go to ``out_dir`` when given."""
    bench = benchmarks.get(bench_spec, files=files)
    bench.check(data_root, inference=False, scoring=True)
    answers = read_answers(Path(answers_path), identity=bench.answer_identity)
    if not answers:
        raise EvalError(f"answers file {answers_path} has no answers (it is empty)")
    metrics = score_benchmark(
        bench,
        answers,
        data_root,
        Path(out_dir) if out_dir else None,
        judge=judge,
        model_id=model_id or Path(answers_path).stem,
        source=answers_path,
    )
    counts = metrics.get("counts") or {}
    if counts.get("answers") and counts.get("unknown") == counts.get("answers"):
        raise EvalError(
            f"answers file {answers_path}: none of its {counts['answers']} answers belong to {bench.spec} "
            f"({counts.get('questions')} questions expected); wrong --bench or --data-root?"
        )
    return metrics
