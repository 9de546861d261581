"""A pruned model behind a harness-neutral interface: flat ``key=value`` model arguments, requests of
(text, images, generation settings), batched greedy answers and per-sample pruning statistics.

Evaluation harnesses (lmms-eval: :mod:`finepruner.integrations.lmms_eval`) hand a model their flat
arguments and their requests; this module owns what is finepruner's: validating the method and its
parameters against the checkpoint's configuration before any weight is read, loading the model with
:func:`finepruner.load_model`, applying the method with :func:`finepruner.apply`, generating with the
evaluation runner's :class:`~finepruner.eval.runner.Generator` (the family's prompt, left padding, greedy
decoding) and recording, per sample, the kept visual tokens of every pruning stage and the efficiency
figures that ``finepruner eval`` records (``prune_summary``: layer-averaged visual tokens, prefill FLOPs).
Nothing here imports a harness.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Model arguments that configure the model itself; every other key is a parameter of the method.
MODEL_KEYS: dict[str, str] = {
    "pretrained": "checkpoint directory or built-in name ('toy')",
    "method": "pruning method (finepruner.methods.available()), or a spec 'name:key=value'",
    "batch_size": "questions per generate call (integer >= 1)",
    "max_batch_size": "accepted and ignored (lmms-eval passes it)",
    "device": "cpu, cuda, cuda:N or mps (default, and plain cuda: cuda:LOCAL_RANK when CUDA is available, else cpu)",
    "dtype": "float16, bfloat16 or float32 (default: the checkpoint's)",
    "attn_implementation": "sdpa (default), eager, flash_attention_2, ...",
    "image_aspect_ratio": "pad or original (default: the family's evaluation protocol)",
    "layout": "image-token layout of the family (default hf)",
    "stats_path": "JSON file for the pruning statistics (default: beside the harness's results)",
}
#: Keys ``processor.NAME=VALUE`` go to the processor (``load_model(processor_kwargs=...)``).
PROCESSOR_PREFIX = "processor."
#: Method values that apply no method at all (plain transformers: no statistics).
NO_METHOD = ("", "none")
#: Generation settings a task may ask for that greedy decoding satisfies.
GREEDY_SETTINGS = {"temperature": (0, 0.0, None), "do_sample": (False, None), "num_beams": (1, None),
                   "top_p": (None, 0, 0.0, 1, 1.0), "top_k": (None, 0, 1)}


@dataclass
class ModelArgs:
    """The parsed model arguments (:meth:`from_kwargs`)."""

    pretrained: str
    method: str | None = "vanilla"
    method_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    device: str | None = None
    dtype: str | None = None
    attn_implementation: str = "sdpa"
    image_aspect_ratio: str | None = None
    layout: str = "hf"
    stats_path: str | None = None
    processor_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> ModelArgs:
        """Split flat arguments (as a harness parsed ``key=value,...``) into model settings and method
        parameters; values still given as text are parsed as ``finepruner.methods.spec`` parses them
        (JSON numbers, booleans and lists, Python's True/False/None). ``method`` may itself be a spec
        (``fastv:tokens=64``). Raises ``ValueError`` naming the argument (cheap checks only: no file read)."""
        from finepruner.methods.spec import parse_method_spec, parse_value

        values = {k: parse_value(v) if isinstance(v, str) and k not in ("pretrained", "method") else v
                  for k, v in kwargs.items() if v is not None}
        if "pretrained" not in values:
            raise ValueError("model_args: pretrained=PATH is required (a local checkpoint directory, or 'toy')")
        method = values.pop("method", "vanilla")
        params: dict[str, Any] = {}
        if isinstance(method, str) and ":" in method:
            method, params = parse_method_spec(method)
        method = None if method is None or str(method).strip().lower() in NO_METHOD else str(method).strip()
        processor_kwargs = {k[len(PROCESSOR_PREFIX):]: values.pop(k) for k in list(values)
                            if k.startswith(PROCESSOR_PREFIX)}
        settings = {k: values.pop(k) for k in list(values) if k in MODEL_KEYS}
        settings.pop("max_batch_size", None)
        repeated = sorted(set(params) & set(values))
        if repeated:
            raise ValueError(f"model_args: method parameter(s) {', '.join(repeated)} given twice (in method= and "
                             "as key=value)")
        params.update(values)
        batch_size = settings.get("batch_size", 1)
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r} ('auto' is not supported)")
        settings["batch_size"] = batch_size
        for key in ("pretrained", "device", "dtype", "attn_implementation", "image_aspect_ratio", "layout",
                    "stats_path"):
            if key in settings:
                settings[key] = str(settings[key])
        return cls(method=method, method_params=params, processor_kwargs=processor_kwargs, **settings)

    def describe_method(self) -> str:
        if self.method is None:
            return "none"
        items = ",".join(f"{k}={v}" for k, v in self.method_params.items())
        return f"{self.method}:{items}" if items else self.method


def _allowed_args(method: str | None) -> str:
    from finepruner import methods

    own = [k for k in MODEL_KEYS if k != "max_batch_size"]
    params = list(methods.parameters(method)) if method is not None else []
    return ", ".join([*own, *(f"{p} (method)" for p in params), f"{PROCESSOR_PREFIX}NAME"])


def validate(args: ModelArgs) -> Any:
    """Check everything that can be checked before the weights are read; returns the checkpoint's family
    (its adapter class). Raises ``ValueError`` (``FileNotFoundError`` for a missing checkpoint) naming the
    argument and what is allowed: the checkpoint's files and configuration, dtype, device, image aspect
    ratio, layout, the method name, its parameters and its plan on this model's shape (``load_model``
    checks the attention implementation before it reads weights)."""
    from finepruner import methods
    from finepruner.eval.prompting import IMAGE_ASPECT_RATIOS
    from finepruner.models.loading import check_checkpoint, check_device, parse_dtype, resolve_checkpoint

    directory = resolve_checkpoint(args.pretrained)
    family = check_checkpoint(directory)
    parse_dtype(args.dtype)
    check_device(args.device)
    if args.image_aspect_ratio is not None and args.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio={args.image_aspect_ratio!r}; allowed: {', '.join(IMAGE_ASPECT_RATIOS)}")
    family.check_layout(args.layout)
    if args.method is None:
        if args.method_params:
            raise ValueError(f"model_args {', '.join(sorted(args.method_params))}: not a model argument, and "
                             f"method=none takes no parameters; allowed: {_allowed_args(None)}")
        return family
    try:
        method = methods.create(args.method, **args.method_params)
    except ValueError as err:
        if str(err).startswith("unknown method"):
            raise ValueError(f"method={args.method!r}: {err}") from None
        raise ValueError(f"method {args.method}: {err}; model arguments: {_allowed_args(args.method)}") from None
    except TypeError as err:
        raise ValueError(f"method {args.method}: {err}") from None
    import transformers

    config = getattr(transformers, family.config_class).from_pretrained(directory)
    shape = family.shape_of(config)
    from finepruner.methods.base import check_shape

    try:
        check_shape(method, shape)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ValueError(f"method {args.describe_method()} on {args.pretrained} ({family.family_name()}, "
                         f"{shape.num_layers} layers, {shape.num_heads} heads, up to {shape.num_visual} visual "
                         f"tokens per {'image' if family.per_image_budget else 'sample'}): {err}") from None
    return family


def resolve_device(device: str | None) -> str:
    """The device of this process: ``device`` as given, except that none or a bare ``cuda`` means
    ``cuda:LOCAL_RANK`` (one process per GPU under torchrun/accelerate) when CUDA is available; else cpu."""
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device or "cpu"


@dataclass
class Request:
    """One question: the USER text (no image token), its images (0 or 1: a sequence, or a function that
    returns it, called when the question's batch is answered, so that a large task's images are not all
    decoded at once), the generation budget, stop strings, the batch group it may share a generate call
    with (a task), and a key recorded with its statistics (e.g. task and document id)."""

    text: str
    images: Sequence[Any] | Callable[[], Sequence[Any]] = ()
    max_new_tokens: int = 128
    until: Sequence[str] = ()
    group: str = ""
    key: Mapping[str, Any] = field(default_factory=dict)

    def visuals(self) -> list[Any]:
        """The question's images; more than one is a ``ValueError``."""
        images = self.images() if callable(self.images) else self.images
        images = [v for v in (images or []) if v is not None]
        if len(images) > 1:
            raise ValueError(f"request {dict(self.key) or self.text[:40]!r} has {len(images)} images; "
                             "finepruner's harness model answers questions with at most one image")
        return images


def truncate(text: str, until: Sequence[str]) -> str:
    """``text`` cut at the first occurrence of any stop string (greedy output is the same as stopping there)."""
    cut = len(text)
    for stop in until:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut]


def greedy_conflicts(gen_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The generation settings in ``gen_kwargs`` that ask for something other than greedy decoding."""
    return {k: v for k, v in gen_kwargs.items() if k in GREEDY_SETTINGS and v not in GREEDY_SETTINGS[k]}


class PrunedModel:
    """A checkpoint loaded with :func:`finepruner.load_model`, pruned with :func:`finepruner.apply` and
    answered with :class:`finepruner.eval.runner.Generator`; ``samples`` holds each answered question's
    statistics (``key``, ``kept``: the kept visual tokens of the sample at each pruning stage, and the
    per-sample figures ``finepruner eval`` records).

    Pass ``model``/``processor`` to wrap an in-memory model (``args.pretrained`` is then only recorded).
    ``method=vanilla`` (the default) runs the engine without pruning, so statistics are recorded;
    ``method=none`` is plain transformers (no statistics).
    """

    def __init__(self, args: ModelArgs, model: Any = None, processor: Any = None) -> None:
        import finepruner
        from finepruner.eval.runner import Generator

        self.args = args
        if model is None:
            self.family = validate(args)
            device = resolve_device(args.device)
            options: dict[str, Any] = {}
            if args.processor_kwargs:
                options["processor_kwargs"] = dict(args.processor_kwargs)
            model, processor = finepruner.load_model(args.pretrained, dtype=args.dtype, device=device,
                                                     attn_implementation=args.attn_implementation,
                                                     layout=args.layout, **options)
        else:
            from finepruner.models.adapters import adapter_for

            self.family = type(adapter_for(model))
        self.model, self.processor = model, processor
        self.handle = None
        if args.method is not None:
            self.handle = finepruner.apply(model, args.method, processor=processor, **args.method_params)
        self.generator = Generator(model, processor, args.image_aspect_ratio)
        self.generator.handle = self.handle
        self.samples: list[dict[str, Any]] = []
        self.seconds = 0.0

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def close(self) -> None:
        """Remove the pruning method from the model (restores it exactly)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _image(self, image: Any) -> Any:
        from finepruner.eval.prompting import expand2square

        if not hasattr(image, "convert"):
            raise ValueError(f"finepruner answers image questions only; got a visual of type {type(image).__name__} "
                             "(video and audio inputs are not supported)")
        image = image.convert("RGB")
        if self.generator.image_aspect_ratio == "pad":
            image = expand2square(image, self.generator.background)
        return image

    def batches(self, requests: Sequence[Request], batch_size: int) -> Iterator[list[int]]:
        """Indices of ``requests`` in order, cut into batches of at most ``batch_size`` consecutive requests
        of the same group and generation budget (the batches ``finepruner eval`` forms on a question file)."""
        batch: list[int] = []
        for i, req in enumerate(requests):
            if batch and (len(batch) == batch_size or (req.group, req.max_new_tokens) !=
                          (requests[batch[0]].group, requests[batch[0]].max_new_tokens)):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def answer(self, requests: Sequence[Request], batch_size: int | None = None, progress: bool = False) -> list[str]:
        """Greedy answers of ``requests``, in order; each answered question's statistics go to ``samples``."""
        from finepruner.eval.runner import prune_summary

        size = batch_size or self.args.batch_size
        answers: list[str | None] = [None] * len(requests)
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="finepruner", unit="q", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        for batch in self.batches(requests, size):
            visuals = {i: requests[i].visuals() for i in batch}
            with_image = [i for i in batch if visuals[i]]
            without = [i for i in batch if not visuals[i]]
            for rows, has_image in ((with_image, True), (without, False)):
                if not rows:
                    continue
                images = [self._image(visuals[i][0]) for i in rows] if has_image else None
                texts = self.generator.generate([requests[i].text for i in rows], images,
                                                requests[rows[0]].max_new_tokens)
                summary = prune_summary(self.handle) if has_image and self.handle is not None else None
                kept = list(self.handle.kept) if summary is not None else []
                for row, (i, text) in enumerate(zip(rows, texts, strict=True)):
                    answers[i] = truncate(text, requests[i].until).strip()
                    record: dict[str, Any] = {**requests[i].key, "image": has_image}
                    if summary is not None:
                        record["kept"] = [int((k[row] >= 0).sum()) for k in kept]
                        record["prune"] = summary
                    self.samples.append(record)
            bar.update(len(batch))
        bar.close()
        self.seconds += time.perf_counter() - start
        return [a if a is not None else "" for a in answers]

    def stats(self, samples: Sequence[Mapping[str, Any]] | None = None, by: str = "task") -> dict[str, Any]:
        """The statistics record: configuration, per-group means (field ``by`` of the keys; the means are
        ``finepruner eval``'s ``efficiency`` summary) and the per-sample rows."""
        import finepruner
        from finepruner.eval.runner import efficiency_summary

        rows = list(self.samples if samples is None else samples)
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            groups.setdefault(str(row.get(by, "")), []).append(row)
        per_group = {}
        for name, members in groups.items():
            pruned = [{"metadata": {"prune": r["prune"]}} for r in members if r.get("prune")]
            summary = efficiency_summary(pruned) or {"samples": 0}
            kept = [r["kept"] for r in members if r.get("kept")]
            if kept and len({len(k) for k in kept}) == 1:
                summary["mean_kept"] = [sum(col) / len(col) for col in zip(*kept)]
            per_group[name] = {"questions": len(members), **summary}
        config = asdict(self.args)
        config.pop("stats_path", None)
        return {
            "finepruner": finepruner.__version__,
            "config": config,
            "family": self.family.family_name(),
            "method": self.args.describe_method(),
            "decoding": {"do_sample": False, "num_beams": 1, "conversation": self.family.conversation},
            "image_aspect_ratio": self.generator.image_aspect_ratio,
            "generation_seconds": self.seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            by + "s": per_group,
            "samples": rows,
        }

    @staticmethod
    def write_stats(record: Mapping[str, Any], path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

