"""Calibrated ("visual") heads: per-head statistics averaged over a data set, and the ``heads.json`` file.

The original code chose heads per image only (spec heads.md §5 item 10); calibration ranks the heads once,
offline, by the mean of a ranking strategy's per-sample score, so the pruning method can use a fixed set.

File format (docs/heads.md "Calibration file")::

    {"format": "finepruner-heads", "format_version": 1,
     "num_layers": 32, "num_heads": 32, "num_visual": 576, "layer": 1,
     "strategy": "sum", "options": {}, "best": "largest", "n_samples": 500,
     "scores": [...num_heads floats: mean per-sample score...],
     "scores_std": [...num_heads floats: population std over samples...],
     "ranked_heads": [...permutation of 0..num_heads-1, best first...],
     "weights": [...optional: num_heads non-negative floats summing to 1 (HAWK-style head weights)...],
     "data": "optional: which calibration data the statistics saw"}

``weights`` (``finepruner calibrate --weights``, ``HeadSet.with_weights``) are the L1-normalised mean scores
of a largest-is-best strategy (default ``sum``: each head's share of the mean visual-attention mass), the
static per-head weights of HAWK's soft selection (spec methods_more.md §7); ``weighting="hawk"`` of the
``finepruner`` method reads them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from finepruner.heads.selection import order_heads, sorted_long

FORMAT = "finepruner-heads"
FORMAT_VERSION = 1
PathLike = str | os.PathLike


@dataclass(frozen=True)
class HeadSet:
    """A calibrated head ranking for one decoder layer (the content of ``heads.json``)."""

    num_heads: int
    num_visual: int | None
    num_layers: int | None
    layer: int | None
    strategy: str
    options: Mapping[str, Any]
    best: str
    n_samples: int
    scores: tuple[float, ...]
    scores_std: tuple[float, ...]
    ranked_heads: tuple[int, ...]
    source: str | None = field(default=None, compare=False)
    weights: tuple[float, ...] | None = None
    data: str | None = None

    def top(self, heads: int) -> torch.Tensor:
        """The ``heads`` best calibrated heads, ascending int64."""
        if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= self.num_heads:
            raise ValueError(f"heads must be an int in [1, {self.num_heads}], got {heads!r}")
        return sorted_long(list(self.ranked_heads[:heads]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_visual": self.num_visual,
            "layer": self.layer,
            "strategy": self.strategy,
            "options": _jsonable(self.options),
            "best": self.best,
            "n_samples": self.n_samples,
            "scores": list(self.scores),
            "scores_std": list(self.scores_std),
            "ranked_heads": list(self.ranked_heads),
            **({"weights": list(self.weights)} if self.weights is not None else {}),
            **({"data": self.data} if self.data is not None else {}),
        }

    def with_weights(self, data: str | None = None) -> HeadSet:
        """This head set with HAWK-style weights: the mean scores L1-normalised (spec methods_more.md §7).

        HAWK's own weights come from a head-ablation procedure that is not public; the proxy here is the
        calibrated statistic itself (for ``sum``: the head's share of the mean visual-attention mass).
        Needs a strategy whose largest scores are best and whose mean scores are non-negative.
        """
        if self.best != "largest":
            raise ValueError(
                f"head weights need a strategy whose largest scores are best; {self.strategy!r} ranks the "
                "smallest first (use e.g. strategy 'sum')"
            )
        if any(x < 0 for x in self.scores) or not sum(self.scores) > 0:
            raise ValueError(
                f"head weights need non-negative mean scores with a positive sum; strategy {self.strategy!r} "
                f"gave {min(self.scores):.4g}..{max(self.scores):.4g}"
            )
        total = math.fsum(self.scores)
        weights = tuple(x / total for x in self.scores)
        return replace(self, weights=weights, data=self.data if data is None else data)

    def save(self, path: PathLike) -> None:
        """Write ``heads.json`` (UTF-8, indented)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")


class HeadStatsAccumulator:
    """Accumulate one ranking strategy's per-head scores over samples; ``result()`` ranks the heads.

    Example::

        acc = HeadStatsAccumulator(num_heads=32, strategy="sum", num_layers=32, layer=1)
        for attn in samples:          # [H, N] (or [B, H, N]) last-prompt-token attention to the image
            acc.update(attn)
        acc.result().save("heads.json")
    """

    def __init__(
        self,
        num_heads: int,
        strategy: str = "sum",
        *,
        num_visual: int | None = None,
        num_layers: int | None = None,
        layer: int | None = None,
        variable_visual: bool = False,
        **options: Any,
    ) -> None:
        """``variable_visual``: the samples' visual-token counts differ (families with per-image counts):
        each sample is scored on its own row and ``num_visual`` stays None (it matches any model)."""
        from finepruner.heads.api import strategy_info, validate_options

        info = strategy_info(strategy)
        if info.kind != "ranking":
            raise ValueError(
                f"calibration needs a ranking strategy (per-head scores), not {strategy!r} ({info.kind})"
            )
        validate_options(info, options)
        for label, value, low in (
            ("num_heads", num_heads, 1),
            ("num_visual", num_visual, 1),
            ("num_layers", num_layers, 1),
            ("layer", layer, 0),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
        if layer is not None and num_layers is not None and layer >= num_layers:
            raise ValueError(f"layer={layer} must be < num_layers={num_layers}")
        self.num_heads = num_heads
        self.strategy = strategy
        self.options = dict(options)
        self.num_visual = num_visual
        self.variable_visual = variable_visual
        self.num_layers = num_layers
        self.layer = layer
        self._best = info.best
        self._n = 0
        self._sum = torch.zeros(num_heads, dtype=torch.float64)
        self._sumsq = torch.zeros(num_heads, dtype=torch.float64)

    @property
    def n_samples(self) -> int:
        return self._n

    def update(self, attn: torch.Tensor) -> None:
        """Add one sample ``[H, N]`` or a batch ``[B, H, N]`` (any float dtype; scored in float32)."""
        from finepruner.heads.api import score_many

        if not isinstance(attn, torch.Tensor) or attn.dim() not in (2, 3):
            raise ValueError("attn must be a tensor [H, N] or [B, H, N]")
        batch = attn if attn.dim() == 3 else attn.unsqueeze(0)
        if batch.shape[1] != self.num_heads:
            raise ValueError(f"attn has {batch.shape[1]} heads, the accumulator expects {self.num_heads}")
        if self.variable_visual:
            pass
        elif self.num_visual is None:
            self.num_visual = int(batch.shape[2])
        elif batch.shape[2] != self.num_visual:
            raise ValueError(
                f"attn has {batch.shape[2]} visual tokens, the accumulator expects {self.num_visual}"
            )
        s = score_many(batch, self.strategy, **self.options).to("cpu", torch.float64)  # [B, H]
        self._sum += s.sum(dim=0)
        self._sumsq += (s * s).sum(dim=0)
        self._n += int(s.shape[0])

    def result(self) -> HeadSet:
        """Mean score per head and the heads ranked best first (ties: lowest index first)."""
        if self._n == 0:
            raise ValueError("no samples: call update() before result()")
        mean = self._sum / self._n
        var = (self._sumsq / self._n - mean * mean).clamp_min(0)
        ranked = order_heads(mean, largest=self._best == "largest")
        return HeadSet(
            num_heads=self.num_heads,
            num_visual=self.num_visual,
            num_layers=self.num_layers,
            layer=self.layer,
            strategy=self.strategy,
            options=dict(self.options),
            best=self._best,
            n_samples=self._n,
            scores=tuple(float(x) for x in mean),
            scores_std=tuple(float(x) for x in var.sqrt()),
            ranked_heads=tuple(int(x) for x in ranked),
        )


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def save_head_set(head_set: HeadSet, path: PathLike) -> None:
    """Write ``head_set`` to ``path`` as ``heads.json``."""
    head_set.save(path)


def _fail(path: PathLike, name: str, why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: field {name!r} {why}")


def _int_field(data: Mapping[str, Any], path: PathLike, name: str, nullable: bool, low: int) -> int | None:
    if name not in data:
        raise _fail(path, name, "is missing")
    value = data[name]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(path, name, f"must be an int >= {low}, got {value!r}")
    return value


def _float_list(data: Mapping[str, Any], path: PathLike, name: str, length: int) -> tuple[float, ...]:
    value = data.get(name)
    if not isinstance(value, list) or len(value) != length:
        raise _fail(path, name, f"must be a list of num_heads={length} numbers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise _fail(path, name, "must contain only finite numbers")
    return tuple(float(x) for x in value)


def parse_head_set(data: Mapping[str, Any], path: PathLike = "<heads.json>") -> HeadSet:
    """Validate a decoded ``heads.json`` mapping (internal consistency only)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{os.fspath(path)}: expected a JSON object")
    if data.get("format") != FORMAT:
        raise _fail(path, "format", f"must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise _fail(path, "format_version", f"must be {FORMAT_VERSION}, got {data.get('format_version')!r}")
    num_heads = _int_field(data, path, "num_heads", nullable=False, low=1)
    num_visual = _int_field(data, path, "num_visual", nullable=True, low=1)
    num_layers = _int_field(data, path, "num_layers", nullable=True, low=1)
    layer = _int_field(data, path, "layer", nullable=True, low=0)
    if layer is not None and num_layers is not None and layer >= num_layers:
        raise _fail(path, "layer", f"is {layer}, but num_layers is {num_layers}")
    n_samples = _int_field(data, path, "n_samples", nullable=False, low=1)
    if not isinstance(data.get("strategy"), str):
        raise _fail(path, "strategy", "must be a string")
    options = data.get("options", {})
    if not isinstance(options, Mapping):
        raise _fail(path, "options", "must be an object")
    best = data.get("best")
    if best not in ("largest", "smallest"):
        raise _fail(path, "best", f"must be 'largest' or 'smallest', got {best!r}")
    scores = _float_list(data, path, "scores", num_heads)
    scores_std = _float_list(data, path, "scores_std", num_heads)
    ranked = data.get("ranked_heads")
    if (
        not isinstance(ranked, list)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranked)
        or sorted(ranked) != list(range(num_heads))
    ):
        raise _fail(path, "ranked_heads", f"must be a permutation of 0..{num_heads - 1}")
    weights = data.get("weights")
    if weights is not None:
        weights = _float_list(data, path, "weights", num_heads)
        if any(x < 0 for x in weights) or not sum(weights) > 0:
            raise _fail(path, "weights", "must be non-negative numbers with a positive sum")
    described = data.get("data")
    if described is not None and not isinstance(described, str):
        raise _fail(path, "data", "must be a string or null")
    return HeadSet(
        num_heads=num_heads,
        num_visual=num_visual,
        num_layers=num_layers,
        layer=layer,
        strategy=data["strategy"],
        options=dict(options),
        best=best,
        n_samples=n_samples,
        scores=scores,
        scores_std=scores_std,
        ranked_heads=tuple(ranked),
        source=os.fspath(path),
        weights=weights,
        data=described,
    )


def load_head_set(
    path: PathLike,
    *,
    num_heads: int | None = None,
    layer: int | None = None,
    num_layers: int | None = None,
    num_visual: int | None = None,
) -> HeadSet:
    """Read ``heads.json`` and check it against the model; ``None`` skips a check.

    Raises:
        ValueError: naming the file and the field, if the file is malformed or a given shape differs
            (a field stored as null matches anything).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({exc})") from exc
    head_set = parse_head_set(data, path)
    for name, expected in (
        ("num_heads", num_heads),
        ("layer", layer),
        ("num_layers", num_layers),
        ("num_visual", num_visual),
    ):
        stored = getattr(head_set, name)
        if expected is not None and stored is not None and stored != expected:
            raise _fail(path, name, f"is {stored} in the file, but the model has {expected}")
    return head_set


def as_head_set(head_set: HeadSet | PathLike, num_heads: int) -> HeadSet:
    """A :class:`HeadSet` (loaded from a path if needed) whose ``num_heads`` matches ``num_heads``."""
    if isinstance(head_set, HeadSet):
        if head_set.num_heads != num_heads:
            where = head_set.source or "head_set"
            raise ValueError(
                f"{where}: field 'num_heads' is {head_set.num_heads} in the file, "
                f"but the attention has {num_heads}"
            )
        return head_set
    if isinstance(head_set, (str, os.PathLike)):
        return load_head_set(head_set, num_heads=num_heads)
    raise ValueError(f"head_set must be a HeadSet or a path to heads.json, got {type(head_set).__name__}")
