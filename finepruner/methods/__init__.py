"""Pruning methods, registered by name (``available()``, ``create(name, **params)``).

Each method lives in its own module and documents its parameters in its class docstring.
"""

from __future__ import annotations

import inspect

from finepruner.methods.base import PruningMethod, Selection, Stage, StageContext
from finepruner.methods.cdpruner import CDPruner
from finepruner.methods.dart import DART
from finepruner.methods.divprune import DivPrune
from finepruner.methods.fastv import FastV
from finepruner.methods.finepruner_head import FinePrunerHead
from finepruner.methods.hiprune import HiPrune
from finepruner.methods.pdrop import PDrop
from finepruner.methods.pool import Pool
from finepruner.methods.prumerge import PruMerge, PruMergePlus
from finepruner.methods.random_selection import RandomSelection
from finepruner.methods.sparsevlm import SparseVLM
from finepruner.methods.vanilla import Vanilla
from finepruner.methods.visionzip import VisionZip
from finepruner.methods.vispruner import VisPruner

_METHODS: tuple[type[PruningMethod], ...] = (
    Vanilla, RandomSelection, FastV, PDrop, FinePrunerHead, VisPruner, CDPruner, SparseVLM, DivPrune, DART, Pool,
    VisionZip, PruMergePlus, PruMerge, HiPrune,
)


def _unique_names(classes: tuple[type[PruningMethod], ...]) -> dict[str, type[PruningMethod]]:
    """``{name: class}``, refusing an empty name and a name (or alias) that two classes claim."""
    registry: dict[str, type[PruningMethod]] = {}
    for cls in classes:
        for name in (cls.name, *getattr(cls, "aliases", ())):
            if not name:
                raise ValueError(f"method class {cls.__qualname__} has no name")
            if name in registry:
                raise ValueError(f"method name {name!r} is claimed by {registry[name].__qualname__} and "
                                 f"{cls.__qualname__}")
            registry[name] = cls
    return registry


_ALL_NAMES = _unique_names(_METHODS)
_REGISTRY: dict[str, type[PruningMethod]] = {cls.name: cls for cls in _METHODS}
#: Other accepted names (not listed by ``available()``).
ALIASES: dict[str, str] = {name: cls.name for name, cls in _ALL_NAMES.items() if name != cls.name}


def available() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get(name: str) -> type[PruningMethod]:
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}") from None


def parameters(name: str) -> dict[str, object]:
    """The parameters of method ``name`` with their defaults (``inspect.Parameter.empty`` if required)."""
    signature = inspect.signature(get(name).__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:]}


def create(name: str, **params) -> PruningMethod:
    """Instantiate method ``name``; unknown parameters raise a ValueError listing the allowed ones."""
    cls = get(name)
    allowed = parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for method {name!r}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(**params)


__all__ = ["PruningMethod", "Selection", "Stage", "StageContext", "available", "create", "get", "parameters"]
