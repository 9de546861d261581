"""Sweep configs (YAML): a list of grid blocks, each a product of methods, tokens, heads, strategies and
benchmarks, with fixed parameters; validated before anything runs (``docs/sweeps.md``).

Schema::

    name: head_ablation            # sweep name in the results store (default: the file's stem)
    description: free text
    benchmarks: [pope, mme]        # default benchmarks of every block (name or name:split)
    defaults: {K: 2, budget: average}   # fixed parameters, given to every cell whose method accepts them
    settings: {batch_size: 8}      # eval settings: batch_size, limit, max_new_tokens, image_aspect_ratio,
                                   # dtype, files ({bench: {key: path}}), processor_kwargs ({name: value})
    grid:                          # the union of these blocks; each block is a product
      - method: vanilla
      - method: [fastv, pdrop]     # a list is an axis; a scalar is a fixed value
        tokens: [192, 128, 64]
        params: {positions: null}  # fixed parameters, never expanded (use this for list-valued ones)
        benchmarks: [pope]         # optional, overrides the default benchmarks for this block
    variants:                      # named parameter overrides, chosen with --variant NAME
      original: {definitions: original}

Every key of a block other than ``method``, ``params`` and ``benchmarks`` is a method parameter; it
must be accepted by every method of the block (``finepruner.methods.parameters``). ``strategy`` values
must be in ``finepruner.heads.strategies()``, benchmarks in ``finepruner.eval.benchmarks.available()``.
Strings may use ``${ENV_VAR}``. Cells whose resolved configuration is identical are run once (e.g.
``strategy: all`` ignores ``heads``, so it is run once per budget whatever the ``heads`` axis says, and the
control strategies ignore ``definitions``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from finepruner.methods.base import ModelShape

BLOCK_KEYS = ("method", "params", "benchmarks")
TOP_KEYS = ("name", "description", "benchmarks", "defaults", "settings", "grid", "variants")
SETTING_KEYS = ("batch_size", "limit", "max_new_tokens", "image_aspect_ratio", "dtype", "files", "processor_kwargs")
#: Settings that change answers: part of a cell's identity (batch size and dtype are recorded, not keyed,
#: except dtype, which changes fp16/fp32 numerics).
IDENTITY_SETTINGS = ("limit", "max_new_tokens", "image_aspect_ratio", "dtype", "files", "processor_kwargs")
#: Parameters that locate files with the same content on different machines: not part of a cell's identity.
LOCATION_PARAMS = ("clip_model",)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SweepConfigError(ValueError):
    """An invalid sweep config; the message names the offending key."""


@dataclass(frozen=True)
class Cell:
    """One run: a method configuration on one benchmark."""

    method: str
    params: Mapping[str, Any]
    benchmark: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    model_id: str = "model"

    @property
    def tokens(self) -> int | None:
        return self.params.get("tokens")

    @property
    def heads(self) -> int | None:
        return self.params.get("heads")

    @property
    def strategy(self) -> str | None:
        return self.params.get("strategy")

    def identity(self) -> dict[str, Any]:
        """What defines the cell's answers (hashed into ``run_id``)."""
        return {
            "model_id": self.model_id,
            "method": self.method,
            "params": {k: v for k, v in sorted(self.params.items()) if k not in LOCATION_PARAMS},
            "benchmark": self.benchmark,
            "settings": {k: self.settings[k] for k in IDENTITY_SETTINGS if self.settings.get(k) is not None},
        }

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """Short human-readable name: ``finepruner t64 H16 sparsity``."""
        parts = [self.method]
        for key, value in sorted(self.params.items()):
            if key == "tokens":
                parts.append(f"t{value}")
            elif key == "heads":
                parts.append(f"H{value}")
            elif key == "strategy":
                parts.append(str(value))
            elif key not in LOCATION_PARAMS:
                parts.append(f"{key}={_short(value)}")
        return " ".join(parts)

    def slug(self) -> str:
        text = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label.replace(" ", "_"))
        return text[:80].strip("_") or "cell"

    def relative_dir(self) -> str:
        """Run directory relative to the runs folder: ``<model>/<bench>/<slug>-<run_id[:8]>``."""
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model_id) or "model"
        return f"{model}/{self.benchmark.replace(':', '_')}/{self.slug()}-{self.run_id[:8]}"


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


@dataclass
class Sweep:
    """A validated sweep config."""

    name: str
    blocks: list[dict[str, Any]]
    benchmarks: list[str]
    defaults: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    variant: str | None = None
    source: str | None = None

    @property
    def full_name(self) -> str:
        return f"{self.name}@{self.variant}" if self.variant else self.name

    def cells(self, model_id: str = "model", overrides: Mapping[str, Any] | None = None) -> list[Cell]:
        """Every cell, in config order, duplicates removed. ``overrides``: ``{key: value}`` for every method
        that accepts ``key``, or ``{"method.key": value}`` for one method."""
        from finepruner import methods

        self.check_overrides(overrides or {})
        out: dict[str, Cell] = {}
        variant = self.variants.get(self.variant, {}) if self.variant else {}
        for block in self.blocks:
            names = _as_list(block["method"])
            axes = {k: v for k, v in block.items() if k not in BLOCK_KEYS}
            fixed = dict(block.get("params") or {})
            benches = _as_list(block.get("benchmarks") or self.benchmarks)
            keys = list(axes)
            for name in names:
                accepted = set(methods.parameters(name))
                for combo in itertools.product(*[_as_list(axes[k]) for k in keys]):
                    params = {k: v for k, v in self.defaults.items() if k in accepted}
                    params.update(fixed)
                    params.update(dict(zip(keys, combo)))
                    params.update({k: v for k, v in variant.items() if k in accepted})
                    for key, value in (overrides or {}).items():
                        target, dot, pkey = key.partition(".")
                        if dot and methods.ALIASES.get(target, target) == name:
                            params[pkey] = value
                        elif not dot and key in accepted:
                            params[key] = value
                    params = canonical_params(name, params)
                    for bench in benches:
                        cell = Cell(name, params, bench, dict(self.settings), model_id)
                        out.setdefault(cell.run_id, cell)
        return list(out.values())


    def method_names(self) -> list[str]:
        """The (canonical) methods of every block, in config order."""
        return list(dict.fromkeys(n for block in self.blocks for n in _as_list(block["method"])))

    def check_overrides(self, overrides: Mapping[str, Any]) -> None:
        """``--param`` keys: ``method.key`` must name a method of this sweep and one of its parameters;
        a plain ``key`` must be a parameter of at least one method of the sweep. Raises
        :class:`SweepConfigError` naming the key and what is allowed."""
        from finepruner import methods

        names = self.method_names()
        for key in overrides:
            target, dot, pkey = key.partition(".")
            if dot:
                canonical = methods.ALIASES.get(target, target)
                if canonical not in names:
                    known = "known methods" if canonical in methods.available() else "methods"
                    raise SweepConfigError(
                        f"--param {key}: {target!r} is not a method of this sweep "
                        f"({', '.join(names)}); {known}: {', '.join(methods.available())}"
                    )
                allowed = methods.parameters(canonical)
                if pkey not in allowed:
                    raise SweepConfigError(f"--param {key}: method {canonical!r} has no parameter {pkey!r}; "
                                           f"allowed: {', '.join(allowed) or 'none'}")
            elif not any(key in methods.parameters(n) for n in names):
                allowed = sorted({p for n in names for p in methods.parameters(n)})
                raise SweepConfigError(
                    f"--param {key}: no method of this sweep ({', '.join(names)}) has a parameter {key!r}; "
                    f"allowed: {', '.join(allowed) or 'none'} (or METHOD.KEY=VALUE for one method)"
                )


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


#: Parameters kept even when equal to the method's default (they are the reports' axes).
AXIS_PARAMS = ("tokens", "heads", "strategy")


def canonical_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Drop parameters that cannot change the result, so equal runs get one ``run_id``: ``heads`` (and
    ``seed``) under ``strategy: all``, ``seed`` for strategies other than ``random``, ``definitions`` for
    the controls (``all``, ``random``, ``calibrated``, which ``heads_from`` implies), and values equal to
    the method's defaults (except ``tokens``, ``heads`` and ``strategy``)."""
    from finepruner import methods

    defaults = methods.parameters(method)
    out = {k: v for k, v in params.items()
           if k in AXIS_PARAMS or not (k in defaults and defaults[k] == v and v is not None)}
    out = {k: v for k, v in out.items() if v is not None}
    # heads_from= makes the strategy ``calibrated`` (a control), whatever ``strategy`` says
    strategy = "calibrated" if "heads_from" in out else out.get("strategy", defaults.get("strategy"))
    if "strategy" in defaults:
        from finepruner import heads as head_lib

        try:
            info = head_lib.strategy_info(strategy) if strategy else None
        except (KeyError, ValueError):
            info = None
        if info is not None and info.heads == "ignored":
            out.pop("heads", None)
        if info is not None and info.kind == "control":  # all / random / calibrated: no head statistics
            out.pop("definitions", None)
        if strategy != "random":
            out.pop("seed", None)
    return out


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            var = match.group(1)
            if var not in os.environ:
                raise SweepConfigError(f"{where}: environment variable {var} is not set (used as ${{{var}}})")
            return os.environ[var]

        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}") for k, v in value.items()}
    return value


def parse_sweep(data: Mapping[str, Any], *, name: str | None = None, variant: str | None = None,
                source: str | None = None) -> Sweep:
    """Validate a config mapping (as read from YAML); raises :class:`SweepConfigError` naming the key."""
    from finepruner import heads as head_lib
    from finepruner import methods
    from finepruner.eval import benchmarks as bench_registry

    where = source or "sweep config"
    if not isinstance(data, Mapping):
        raise SweepConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise SweepConfigError(
            f"{where}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_KEYS)}"
        )
    data = {k: _expand_env(v, f"{where}: {k}") for k, v in data.items() if k != "variants"} | {
        "variants": data.get("variants") or {}
    }
    known_methods = set(methods.available()) | set(methods.ALIASES)
    known_strategies = set(head_lib.strategies())
    known_benches = set(bench_registry.available())

    def check_bench(spec: Any, key: str) -> None:
        if not isinstance(spec, str):
            raise SweepConfigError(f"{where}: {key}: benchmark names are strings, got {spec!r}")
        bname, split = bench_registry.parse_spec(spec)
        if bname not in known_benches:
            raise SweepConfigError(
                f"{where}: {key}: unknown benchmark {bname!r}; available: {', '.join(sorted(known_benches))}"
            )
        try:
            bench_registry.get(spec)
        except ValueError as err:
            raise SweepConfigError(f"{where}: {key}: {err}") from None

    benches = _as_list(data.get("benchmarks") or [])
    for i, spec in enumerate(benches):
        check_bench(spec, f"benchmarks[{i}]")
    defaults = dict(data.get("defaults") or {})
    settings = dict(data.get("settings") or {})
    bad = sorted(set(settings) - set(SETTING_KEYS))
    if bad:
        raise SweepConfigError(
            f"{where}: settings: unknown key(s) {', '.join(bad)}; allowed: {', '.join(SETTING_KEYS)}"
        )
    _check_settings(settings, where)
    all_params = {p for m in methods.available() for p in methods.parameters(m)}
    for key in defaults:
        if key not in all_params:
            raise SweepConfigError(f"{where}: defaults.{key}: no method has a parameter {key!r}")
    if "strategy" in defaults and defaults["strategy"] not in known_strategies:
        raise SweepConfigError(f"{where}: defaults.strategy: unknown strategy {defaults['strategy']!r}")
    grid = data.get("grid")
    if not isinstance(grid, list) or not grid:
        raise SweepConfigError(f"{where}: grid: expected a non-empty list of blocks")
    blocks = []
    for i, block in enumerate(grid):
        key0 = f"grid[{i}]"
        if not isinstance(block, Mapping) or "method" not in block:
            raise SweepConfigError(f"{where}: {key0}: each block needs a 'method' (a name or a list)")
        names = _as_list(block["method"])
        for name in names:
            if name not in known_methods:
                raise SweepConfigError(
                    f"{where}: {key0}.method: unknown method {name!r}; available: {', '.join(methods.available())}"
                )
        names = [methods.ALIASES.get(n, n) for n in names]
        params = block.get("params") or {}
        if not isinstance(params, Mapping):
            raise SweepConfigError(f"{where}: {key0}.params: expected a mapping")
        for key in [k for k in block if k not in BLOCK_KEYS] + list(params):
            for name in names:
                if key not in methods.parameters(name):
                    raise SweepConfigError(
                        f"{where}: {key0}.{key}: method {name!r} has no parameter {key!r}; "
                        f"allowed: {', '.join(methods.parameters(name)) or 'none'}"
                    )
        for value in _as_list(block.get("strategy", [])) + _as_list(params.get("strategy", [])):
            if value not in known_strategies:
                raise SweepConfigError(
                    f"{where}: {key0}.strategy: unknown strategy {value!r}; "
                    f"available: {', '.join(sorted(known_strategies))}"
                )
        for axis in [k for k in block if k not in BLOCK_KEYS]:
            if isinstance(block[axis], (list, tuple)) and not block[axis]:
                raise SweepConfigError(f"{where}: {key0}.{axis}: empty list")
        block_benches = _as_list(block.get("benchmarks") or [])
        for j, spec in enumerate(block_benches):
            check_bench(spec, f"{key0}.benchmarks[{j}]")
        if not block_benches and not benches:
            raise SweepConfigError(f"{where}: {key0}: no benchmarks (set 'benchmarks' at the top or in the block)")
        blocks.append({**dict(block), "method": names if isinstance(block["method"], list) else names[0]})
    variants = data.get("variants") or {}
    if not isinstance(variants, Mapping):
        raise SweepConfigError(f"{where}: variants: expected a mapping of name -> parameters")
    for vname, vparams in variants.items():
        if not isinstance(vparams, Mapping):
            raise SweepConfigError(f"{where}: variants.{vname}: expected a mapping of parameters")
        for key in vparams:
            if key not in all_params:
                raise SweepConfigError(f"{where}: variants.{vname}.{key}: no method has a parameter {key!r}")
    if variant is not None and variant not in variants:
        raise SweepConfigError(
            f"{where}: --variant {variant!r} is not defined; variants: {', '.join(variants) or 'none'}"
        )
    return Sweep(
        name=str(data.get("name") or name or "sweep"),
        blocks=blocks,
        benchmarks=[str(b) for b in benches],
        defaults=defaults,
        settings=settings,
        variants={k: dict(v) for k, v in variants.items()},
        description=str(data.get("description") or ""),
        variant=variant,
        source=source,
    )


def _check_settings(settings: Mapping[str, Any], where: str) -> None:
    """Types and ranges of the ``settings`` block; raises :class:`SweepConfigError` naming the key."""
    from finepruner.eval.prompting import IMAGE_ASPECT_RATIOS

    for key in ("batch_size", "limit", "max_new_tokens"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SweepConfigError(f"{where}: settings.{key}: {value!r} is not allowed; allowed: an integer >= 1")
    aspect = settings.get("image_aspect_ratio")
    if aspect is not None and aspect not in IMAGE_ASPECT_RATIOS:
        raise SweepConfigError(f"{where}: settings.image_aspect_ratio: {aspect!r} is not allowed; allowed: "
                               f"{', '.join(IMAGE_ASPECT_RATIOS)}")
    dtype = settings.get("dtype")
    if dtype is not None:
        check_dtype(dtype, f"{where}: settings.dtype")
    files = settings.get("files")
    if files is not None and not (isinstance(files, Mapping) and all(
            isinstance(v, Mapping) and all(isinstance(p, str) for p in v.values()) for v in files.values())):
        raise SweepConfigError(f"{where}: settings.files: expected {{benchmark: {{key: path}}}}, got {files!r}")
    kwargs = settings.get("processor_kwargs")
    if kwargs is not None and not (isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs)):
        raise SweepConfigError(f"{where}: settings.processor_kwargs: expected {{name: value}} (keyword arguments "
                               f"of the model's processor, e.g. {{min_pixels: 200704}}), got {kwargs!r}")


def check_dtype(dtype: Any, where: str) -> None:
    """``dtype`` must name a torch floating-point dtype (``models.loading.parse_dtype``); raises
    :class:`SweepConfigError` prefixed with ``where``."""
    from finepruner.models.loading import parse_dtype

    try:
        parse_dtype(dtype)
    except ValueError as err:
        raise SweepConfigError(f"{where}: {err}") from None


def check_device(device: str) -> None:
    """``--device``: a torch device present here (``models.loading.check_device``); raises
    :class:`SweepConfigError`."""
    from finepruner.models.loading import check_device as check

    try:
        check(device)
    except ValueError as err:
        raise SweepConfigError(f"--device: {err}") from None


#: Filter keys other than method parameters (``--only``/``--exclude``).
FILTER_KEYS = ("method", "benchmark", "bench", "run_id")


def check_filters(sweep: Sweep, filters: Iterable[tuple[str, list[str]]], flag: str) -> None:
    """Every ``--only``/``--exclude`` key must be a filter key or a parameter of a method of the sweep."""
    from finepruner import methods

    allowed = set(FILTER_KEYS) | {p for n in sweep.method_names() for p in methods.parameters(n)}
    params = ", ".join(sorted(allowed - set(FILTER_KEYS)))
    for key, _ in filters:
        if key not in allowed:
            raise SweepConfigError(f"{flag} {key}=...: unknown key {key!r}; allowed: {', '.join(FILTER_KEYS)} "
                                   f"or a parameter of the sweep's methods ({params})")


def load_sweep(path: str | Path, variant: str | None = None) -> Sweep:
    """Read and validate a YAML sweep config."""
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SweepConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_sweep(data or {}, name=path.stem, variant=variant, source=str(path))


def parse_filters(items: Iterable[str] | None) -> list[tuple[str, list[str]]]:
    """``--only key=v1,v2`` -> [(key, [v1, v2])]; keys: method, benchmark, tokens, heads, strategy or any
    parameter."""
    out = []
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise SweepConfigError(f"filter expects key=value[,value...], got {item!r}")
        out.append((key.strip(), [v.strip() for v in values.split(",")]))
    return out


def cell_matches(cell: Cell, filters: list[tuple[str, list[str]]]) -> bool:
    """True when the cell matches every filter (values compared as strings)."""
    for key, values in filters:
        if key == "method":
            actual: Any = cell.method
        elif key in ("benchmark", "bench"):
            actual = cell.benchmark
        elif key == "run_id":
            actual = cell.run_id
        else:
            actual = cell.params.get(key)
        if str(actual) not in values and not (actual is None and "none" in values):
            return False
    return True


# -- validating cells before anything runs ------------------------------------------------------------
def __getattr__(name: str) -> Any:
    """``ModelShape`` lives in ``finepruner.methods.base``; imported on first use so that importing this
    module does not import torch."""
    if name == "ModelShape":
        from finepruner.methods.base import ModelShape

        return ModelShape
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_shape(model: str | Path) -> ModelShape:
    """The decoder depth, heads and visual tokens of checkpoint ``model`` (a directory or ``"toy"``),
    from its configuration only; raises :class:`SweepConfigError` naming the problem."""
    from finepruner.models.loading import check_checkpoint, resolve_checkpoint

    try:
        directory = resolve_checkpoint(str(model))
        check_checkpoint(directory)
        from transformers import AutoConfig

        from finepruner.models.adapters import adapter_class

        config = AutoConfig.from_pretrained(str(directory))
        return adapter_class(config.model_type).shape_of(config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # a broken config.json
        raise SweepConfigError(f"--model {model}: {err}") from None


def _describe_hint(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_hint(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    if hint in names:
        return names[hint]
    if origin in (Sequence, list, tuple):
        return f"a list of {_describe_hint(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin in (Mapping, dict):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from YAML or ``--param``) fits the type annotation ``hint``; annotations
    this does not know are accepted (the method's own checks still run)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, os.PathLike):
        return isinstance(value, (str, os.PathLike))
    if origin in (Sequence, list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_conforms(v, args[0]) for v in value))
    if origin in (Mapping, dict):
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_method_params(method: str, params: Mapping[str, Any], shape: ModelShape | None = None) -> None:
    """Validate one cell's method and parameters without a model: unknown names, types against the
    method's signature, and the method's own constructor checks; with ``shape`` (from the checkpoint's
    config.json) also its plan and model checks. Raises ``ValueError`` naming the parameter."""
    from finepruner import methods
    from finepruner.methods.base import check_shape

    cls = methods.get(method)
    allowed = methods.parameters(method)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} has no parameter(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be evaluated: rely on the method's own checks
        hints = {}
    for key, value in params.items():
        if key in hints and not _conforms(value, hints[key]):
            raise ValueError(f"{method}: {key}={value!r} is {type(value).__name__}; "
                             f"allowed: {_describe_hint(hints[key])}")
    if "clip_model" in allowed and params.get("clip_model") is not None:
        # constructing would load the CLIP checkpoint: check that its folder exists instead
        path = Path(str(params["clip_model"])).expanduser()
        if not path.is_dir():
            raise ValueError(f"{method}: clip_model={params['clip_model']!r} is not a directory (a local CLIP "
                             "checkpoint, e.g. a copy of openai/clip-vit-large-patch14-336)")
        tokens = params.get("tokens")
        if shape is not None and isinstance(tokens, int) and not 1 <= tokens <= shape.num_visual:
            raise ValueError(f"{method}: tokens={tokens} is out of range; this model has "
                             f"{shape.num_visual} visual tokens per sample (allowed: 1..{shape.num_visual})")
        return
    instance = methods.create(method, **dict(params))
    if shape is not None:  # the checks ``apply`` runs (per image at its prefill where counts vary)
        check_shape(instance, shape)


def validate_cells(cells: Iterable[Cell], shape: ModelShape | None = None, limit: int = 5) -> None:
    """Check every distinct method configuration of ``cells`` (``check_method_params``); raises
    :class:`SweepConfigError` listing the first ``limit`` problems, each with the cells it affects."""
    seen: set[str] = set()
    problems: dict[str, list[str]] = {}
    for cell in cells:
        key = json.dumps([cell.method, dict(cell.params)], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_method_params(cell.method, cell.params, shape)
        except (ValueError, TypeError, OSError) as err:
            problems.setdefault(str(err), []).append(cell.label)
    if problems:
        count = sum(len(v) for v in problems.values())
        lines = [f"{', '.join(repr(x) for x in labels)}: {msg}" for msg, labels in list(problems.items())[:limit]]
        more = f"\n  ... and {len(problems) - limit} more problem(s)" if len(problems) > limit else ""
        raise SweepConfigError(f"{count} invalid method configuration(s) (cells by label):\n  "
                               + "\n  ".join(lines) + more)
