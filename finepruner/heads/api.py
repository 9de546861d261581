"""Public entry points: ``select``, ``select_detailed``, ``select_batch``, ``score``, ``strategies``.

Input: ONE sample's last-prompt-token attention to the visual tokens, ``[num_heads, num_visual]``, any
float dtype; it is upcast to float32 before any statistic (spec heads.md §3.1 item 5, §5 item 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from finepruner.heads.registry import REGISTRY, Strategy
from finepruner.heads.selection import Selection, sorted_long, top_heads
from finepruner.heads.statistics import as_float32


def strategies(kind: str | None = None) -> tuple[str, ...]:
    """Names of the strategies (optionally only one kind: ``"ranking"``, ``"selector"``, ``"control"``)."""
    kinds = ("ranking", "selector", "control")
    if kind is not None and kind not in kinds:
        raise ValueError(f"kind must be one of {kinds} or None, got {kind!r}")
    return tuple(name for name, entry in REGISTRY.items() if kind is None or entry.kind == kind)


def strategy_info(strategy: str) -> Strategy:
    """The registry entry (kind, best end, options with defaults) of ``strategy``."""
    if not isinstance(strategy, str) or strategy not in REGISTRY:
        raise ValueError(f"unknown head-selection strategy {strategy!r}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[strategy]


def validate_options(entry: Strategy, options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise ValueError(f"strategy {entry.name!r}: unknown option(s) {unknown}; allowed: {allowed}")


def _check_heads(entry: Strategy, heads: int | None, num_heads: int) -> None:
    if heads is None:
        if entry.heads == "required":
            raise ValueError(f"strategy {entry.name!r} needs heads=H with 1 <= H <= num_heads={num_heads}")
        return
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= num_heads:
        raise ValueError(f"heads must be an int with 1 <= heads <= num_heads={num_heads}, got {heads!r}")


def _check_attn(attn: Any, dims: int) -> torch.Tensor:
    shape = "[num_heads, num_visual]" if dims == 2 else "[batch, num_heads, num_visual]"
    if not isinstance(attn, torch.Tensor) or attn.dim() != dims:
        got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attention must be a tensor {shape}, got {got}")
    if any(size < 1 for size in attn.shape):
        raise ValueError(f"attention {shape} must be non-empty, got {tuple(attn.shape)}")
    return as_float32(attn)


def select_detailed(attn: torch.Tensor, strategy: str, heads: int | None = None, **options: Any) -> Selection:
    """Select heads for one sample and return the full :class:`Selection` (ranked order, scores, info)."""
    entry = strategy_info(strategy)
    validate_options(entry, options)
    a = _check_attn(attn, 2)
    _check_heads(entry, heads, a.shape[0])
    if entry.kind == "ranking":
        s = entry.score_fn(a, **options)
        ranked = top_heads(s, heads, largest=entry.best == "largest")
        return Selection(sorted_long(ranked), ranked, s, {"num_heads": heads})
    return entry.select_fn(a, heads, **options)


def select(attn: torch.Tensor, strategy: str, heads: int | None = None, **options: Any) -> torch.Tensor:
    """Selected head indices of one sample ``[num_heads, num_visual]``: a sorted int64 tensor.

    ``heads`` is H for rankings, ``hierarchical``, ``random`` and ``calibrated``; an optional upper bound for
    ``dynamic``/``consensus``; optional for ``sparsevlm_priority`` (default ``round(14/32 · num_heads)``);
    ignored (but validated) for ``all``. Ties: lowest head index first.
    """
    return select_detailed(attn, strategy, heads, **options).indices


def score(attn: torch.Tensor, strategy: str, **options: Any) -> torch.Tensor:
    """Per-head scores (float32 ``[num_heads]``) of a ranking strategy; see ``strategy_info(s).best``."""
    entry = strategy_info(strategy)
    if entry.kind != "ranking":
        raise ValueError(
            f"strategy {strategy!r} is a {entry.kind}, not a ranking, so it has no per-head scores; "
            f"use select()/select_detailed(). Rankings: {', '.join(strategies('ranking'))}"
        )
    validate_options(entry, options)
    return entry.score_fn(_check_attn(attn, 2), **options)


def score_many(attn: torch.Tensor, strategy: str, **options: Any) -> torch.Tensor:
    """Batched :func:`score`: ``[B, H, N] -> [B, H]`` float32."""
    entry = strategy_info(strategy)
    if entry.kind != "ranking":
        raise ValueError(f"strategy {strategy!r} is a {entry.kind}, not a ranking")
    validate_options(entry, options)
    return entry.score_fn(_check_attn(attn, 3), **options)


def select_batch(
    attn: torch.Tensor, strategy: str, heads: int | None = None, **options: Any
) -> list[torch.Tensor]:
    """:func:`select` per sample of ``[B, num_heads, num_visual]``; ``result[b] == select(attn[b], ...)``.

    Rankings are scored in one batched pass; the other strategies loop over the samples. ``random`` uses
    the same ``seed`` for every sample (pass a different seed per sample through :func:`select` if wanted).
    """
    entry = strategy_info(strategy)
    validate_options(entry, options)
    a = _check_attn(attn, 3)
    _check_heads(entry, heads, a.shape[1])
    if entry.kind == "ranking":
        ranked = top_heads(entry.score_fn(a, **options), heads, largest=entry.best == "largest")
        return list(ranked.sort(dim=-1).values.unbind(0))
    return [entry.select_fn(a[b], heads, **_sample_options(entry, options, b, a.shape[0])).indices
            for b in range(a.shape[0])]


def _sample_options(entry: Strategy, options: Mapping[str, Any], b: int, batch: int) -> dict[str, Any]:
    """Sample ``b``'s options: per-sample options given as a ``[B, ...]`` tensor are indexed by ``b``."""
    out = dict(options)
    for name in entry.per_sample:
        value = out.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            if value.shape[0] != batch:
                raise ValueError(f"strategy {entry.name!r}: {name} has {value.shape[0]} rows for a batch of {batch}")
            out[name] = value[b]
    return out
