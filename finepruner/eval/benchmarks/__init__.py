"""Benchmark registry: ``get("pope").load(data_root)``, ``available()``, ``register(cls)``.

Names accept a split suffix, e.g. ``"vizwiz:val"`` or ``"vqav2:val"`` (spec sections 3 and 5).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from finepruner.eval.benchmarks.base import Benchmark, Sample, result
from finepruner.eval.errors import UnknownBenchmarkError

_REGISTRY: dict[str, type[Benchmark]] = {}

_BUILTIN_MODULES = ("vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mme", "mmbench", "mmvet")
#: Listing order of the built-in benchmarks (the LLaVA-1.5 paper's table); others follow by name.
_ORDER = ("vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mme", "mmbench", "mmbench_cn", "mmvet")


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator adding a benchmark under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"benchmark name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} needs another name")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def available() -> list[str]:
    """Registered benchmark names, in the order of the LLaVA-1.5 paper's table."""
    _ensure_builtins()
    return [n for n in _ORDER if n in _REGISTRY] + sorted(n for n in _REGISTRY if n not in _ORDER)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"vizwiz:val"`` -> ``("vizwiz", "val")``; ``"pope"`` -> ``("pope", None)``."""
    name, _, split = spec.partition(":")
    return name.strip(), (split.strip() or None)


def get(spec: str, split: str | None = None, files: Mapping[str, str] | None = None) -> Benchmark:
    """A benchmark instance by name (``name`` or ``name:split``), with optional file overrides."""
    _ensure_builtins()
    name, spec_split = parse_spec(spec)
    if name not in _REGISTRY:
        raise UnknownBenchmarkError(f"unknown benchmark {name!r}; valid names: {', '.join(available())}")
    return _REGISTRY[name](split=split or spec_split, files=files)


__all__ = ["Benchmark", "Sample", "available", "get", "parse_spec", "register", "result"]
