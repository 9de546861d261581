"""``prumerge`` and ``prumerge_plus``: LLaVA-PruMerge / PruMerge+ (Shang et al., ICCV'25), spec
``methods_more.md`` §5.

Before the language model: the [CLS] row of ONE attention head over the full width, built from the ``q_proj``
/ ``k_proj`` outputs of the LAST CLIP layer, ranks the patches; the patches whose attention is an IQR outlier
(``> Q3 + 1.5 IQR``) are kept (adaptive count), PruMerge+ adds a spatial grid of patches; every kept patch
absorbs its 32 most key-similar patches weighted by their attention (``F_i + sum a_j F_j``, no
normalisation), one extra token sums the unkept patches the same way, and all go through the projector in
attention order (then the grid, then the extra token) with contiguous positions.

LLaVA-NeXT (our definition; the official code does not prune anyres input, spec §5.1): the rule runs on each
budget unit (``budget_scope``: the image over its crops, or each crop) of the image's packed tokens, newline
tokens kept and not counted; the signals are each crop's own last-layer [CLS] row and keys, every kept token
merges only tokens of its own crop, and every crop gets its own extra token (as the official encoder gives
each row of a crop batch). See ``PruMerge``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from finepruner.methods.base import Positions, PruningMethod, Selection, Stage, StageContext

IQRScope = Literal["sample", "batch"]
IQR_SCOPES: tuple[str, ...] = ("sample", "batch")
#: ``budget_scope`` values (``engine.vision.BUDGET_SCOPES``): on LLaVA-NeXT ``tokens`` per image, or per crop.
BUDGET_SCOPES: tuple[str, ...] = ("image", "crop")
#: Neighbours merged into each kept token (official ``topk(..., k=32)``).
NEIGHBOURS = 32


def outlier_count(attention: torch.Tensor) -> int:
    """Values above ``Q3 + 1.5 * IQR`` of the flattened ``attention`` (numpy's linear percentiles)."""
    flat = attention.double().flatten()
    q1, q3 = torch.quantile(flat, 0.25).item(), torch.quantile(flat, 0.75).item()
    return int((flat > q3 + 1.5 * (q3 - q1)).sum().item())


def complement(index: torch.Tensor, num: int) -> torch.Tensor:
    """The official ``complement_idx`` for one sample: ``sorted(arange(num) with index set to 0)[len(index):]``.
    The unkept patches in index order when ``index`` has no duplicates; each duplicate drops one more of the
    smallest unkept patches (official behaviour)."""
    masked = torch.arange(num, device=index.device).scatter(0, index, 0)
    return masked.sort().values[index.numel():]


def merge_tokens(
    features: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, index: torch.Tensor,
    neighbours: int = NEIGHBOURS, normalize: bool = False,
) -> torch.Tensor:
    """PruMerge's merged tokens for one sample (spec §5.1), in float32.

    Args:
        features: [N, Dv] pre-projector patch features F.
        keys: [N, Dv] last-layer patch keys.
        attention: [N] the merged-head [CLS] attention a.
        index: [k] the kept patches in output order (duplicates allowed, as in the official fixed branch).
        neighbours: patches merged into each kept one (fewer when fewer candidates exist).
        normalize: divide each weighted sum by its weights' sum (the official division is commented out).

    Returns:
        [k + 1, Dv]: ``F_i + sum_{j in nbrs(i)} a_j F_j`` per kept entry, then ``sum_{j unkept} a_j F_j``.
        A kept entry's candidates are the other kept entries and the unkept patches (``complement``), in that
        order; the ``neighbours`` with the largest key cosine are taken (first candidate on ties).
    """
    values, weights = features.float(), attention.float()
    normed = torch.nn.functional.normalize(keys.float(), p=2, dim=-1)
    rest = complement(index, features.shape[0])
    pool = torch.cat([index, rest])  # [M] candidates; entry p of ``index`` is pool entry p
    count = index.numel()
    sims = normed[index] @ normed[pool].T  # [k, M]
    sims[torch.arange(count, device=sims.device), torch.arange(count, device=sims.device)] = -math.inf
    take = min(neighbours, pool.numel() - 1)
    chosen = pool[sims.argsort(dim=-1, descending=True, stable=True)[:, :take]]  # [k, take]
    picked = weights[chosen]  # [k, take]
    merged = (values[chosen] * picked[..., None]).sum(dim=1)
    if normalize:
        merged = merged / picked.sum(dim=1, keepdim=True)
    extra = (values[rest] * weights[rest][:, None]).sum(dim=0, keepdim=True)
    return torch.cat([values[index] + merged, extra])


class PruMerge(PruningMethod):
    """PruMerge: IQR-outlier [CLS] attention + attention-weighted key-neighbour merging, before the LLM (§5).

    What "N tokens" means: by default the count is adaptive, per image: the IQR outliers plus one extra
    token (``prumerge_plus``: plus the grid); every kept token is a merged token. With ``tokens`` or
    ``ratio`` the official non-adaptive branch runs instead (fixed counts, below).

    Parameters:
        tokens: fixed budget N instead of the adaptive count. ``prumerge``: the ``N - 1`` top-attention patches
            plus the extra token = N. ``prumerge_plus``: the non-adaptive branch with ``r = N / (2V)``
            (64 / 128 / 192 -> r = 1/18, 1/9, 1/6 on LLaVA-1.5: 32+32+1 = 65, 64+64+1 = 129, 96+96+1 = 193).
        ratio: r directly (0 < r <= 1): ``int(V*r)`` top patches (+ the "+" grid ``arange(s/2, V-1, s)``,
            s = int(1/r)) + the extra token. Not with ``tokens``.
        iqr: ``"sample"`` (default): the outlier quartiles of each image alone, so a padded batch equals each
            sample alone; ``"batch"`` (official): the quartiles and the ratio over the whole batch.
        dedup: drop grid patches already kept (non-adaptive "+" only; official False: the de-duplication line
            is commented out, so a patch can appear twice). The adaptive grid is always de-duplicated
            (official).
        normalize_merge_weights: divide each neighbour sum by its attention sum (official False).
        neighbours: patches merged into each kept one (official 32).
        positions: ``"renumber"`` (default, official: contiguous) or ``"original"`` (each merged token takes
            its kept patch's position, the extra token the first visual token's).

        budget_scope: ``"image"`` (default) or ``"crop"``: the unit ``tokens``, ``ratio`` and the IQR count on
            LLaVA-NeXT (below); nothing changes on LLaVA-1.5 (one image per sample).

    Samples of a batch may keep different counts (adaptive, ``dedup``): the shorter ones get padding slots
    (``Selection.insert_valid``) that no token attends to and that take no position.

    LLaVA-NeXT (our definition, ``spec/models.md`` §4, ``methods_more.md`` §1.4 and §5; the official code does not
    prune anyres input): the signals are each crop's own (its [CLS] row of the last layer's merged head, a
    softmax over that crop's 577 keys, and its keys), mapped to the image's packed order through unpadding;
    newline tokens are always kept, in place, and not counted. The rule above runs on each budget *unit* of
    U tokens, the unit's tokens in the image's token order standing for the ``V`` patches: the image's tokens
    over all its crops (``budget_scope="image"``: one attention ranking, one IQR, one grid along the unit's
    tokens) or each crop's tokens that unpadding left (``"crop"``: the official per-crop practice of the NeXT
    tables, 5 x 128/64/32 = 640/320/160). ``tokens=N`` per unit: ``prumerge`` keeps the ``N - C`` top tokens and
    ``prumerge_plus`` runs the fixed branch with ``r = N / (2U)`` (capped at 1 per crop), C = the unit's crops
    (1 per crop); per crop, a crop that unpadding left too few tokens keeps them all. Every kept entry merges
    its ``neighbours`` most key-similar tokens *of its own crop* (the crop's other kept entries, then its unkept
    tokens) with the crop's attention weights, and every crop gets one extra token (the sum of its unkept
    tokens), as the official encoder gives each row of a crop batch. Inserted order: the units in crop order,
    each unit's entries in their rule order (attention, then grid), then the unit's extra tokens in crop order;
    they follow the image's newline tokens; an extra token's ``insert_from`` is its crop's first token.
    ``iqr="batch"``: the quartiles over all units of the selection group (images of one token count).
    """

    name = "prumerge"
    default_positions = "renumber"
    needs_vision = ("last_layer_attention", "last_layer_keys", "patch_features")
    #: PruMerge+ adds spatially sampled patches.
    grid_additions: bool = False

    def __init__(
        self,
        tokens: int | None = None,
        ratio: float | None = None,
        iqr: IQRScope = "sample",
        dedup: bool = False,
        normalize_merge_weights: bool = False,
        neighbours: int = NEIGHBOURS,
        positions: Positions | None = None,
        budget_scope: str = "image",
    ) -> None:
        super().__init__(positions)
        if budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"{self.name}: budget_scope={budget_scope!r}; allowed: {BUDGET_SCOPES}")
        self.budget_scope = budget_scope
        self._packed: bool | None = None  # ``bind_model``: whether the family packs crops (LLaVA-NeXT)
        if tokens is not None and ratio is not None:
            raise ValueError(f"{self.name}: pass tokens or ratio, not both (neither: the adaptive official rule)")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{self.name}: tokens={tokens!r}; allowed: an integer >= 1 (and <= V)")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float)
                                  or not 0.0 < ratio <= 1.0):
            raise ValueError(f"{self.name}: ratio={ratio!r}; allowed: 0 < ratio <= 1")
        if iqr not in IQR_SCOPES:
            raise ValueError(f"{self.name}: iqr={iqr!r}; allowed: {IQR_SCOPES}")
        for label, value in (("dedup", dedup), ("normalize_merge_weights", normalize_merge_weights)):
            if not isinstance(value, bool):
                raise ValueError(f"{self.name}: {label}={value!r}; allowed: True or False")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"{self.name}: neighbours={neighbours!r}; allowed: an integer >= 1")
        self.tokens, self.ratio, self.iqr, self.dedup = tokens, ratio, iqr, dedup
        self.normalize_merge_weights, self.neighbours = normalize_merge_weights, neighbours

    @property
    def adaptive(self) -> bool:
        return self.tokens is None and self.ratio is None

    def fixed_ratio(self, num_visual: int) -> float | None:
        """r of the non-adaptive branch (None when adaptive)."""
        if self.ratio is not None:
            return float(self.ratio)
        if self.tokens is not None and self.grid_additions:
            return self.tokens / (2 * num_visual)
        return None

    def fixed_index(self, order: torch.Tensor, num_visual: int) -> torch.Tensor:
        """Kept entries of one sample in the non-adaptive branch, from its descending-attention ``order``."""
        if self.tokens is not None and not self.grid_additions:
            return order[: self.tokens - 1]
        ratio = self.fixed_ratio(num_visual)
        return self.fixed_branch(order, ratio, num_visual)

    def fixed_branch(self, order: torch.Tensor, ratio: float, count: int) -> torch.Tensor:
        """The official non-adaptive branch (``methods_more.md`` §5.3) on ``count`` tokens ranked by
        ``order``: the ``int(count * ratio)`` top tokens, and for "+" the grid ``arange(step / 2, count - 1,
        step)``, ``step = int(1 / ratio)`` (minus the top tokens with ``dedup``)."""
        top = order[: int(count * ratio)]
        if not self.grid_additions:
            return top
        step = int(1 / ratio)
        grid = torch.arange(int(step / 2), count - 1, step, device=order.device)
        if self.dedup:
            grid = grid[~torch.isin(grid, top)]
        return torch.cat([top, grid])

    def fixed_count(self, num_visual: int) -> int | None:
        """Tokens per sample of the non-adaptive branch without de-duplication (None when data-dependent)."""
        if self.adaptive or (self.dedup and self.grid_additions):
            return None
        if self.tokens is not None and not self.grid_additions:
            return self.tokens
        ratio = self.fixed_ratio(num_visual)
        count = int(num_visual * ratio)
        if self.grid_additions:
            step = int(1 / ratio)
            count += len(range(int(step / 2), num_visual - 1, step))
        return count + 1

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        if self._packed:  # NeXT: newline tokens kept on top, counts per unit: known (and checked) at selection
            return [Stage(layer=0, keep=None, insert=None)]
        if self.tokens is not None:
            most = 2 * num_visual if self.grid_additions else num_visual
            if self.tokens > most:
                rule = "2V (r = N / 2V <= 1)" if self.grid_additions else "V"
                raise ValueError(
                    f"{self.name}: tokens={self.tokens} is not allowed; this model has {num_visual} visual tokens "
                    f"per sample, so tokens must be in 1..{most} ({rule})"
                )
        if num_visual < 2:
            raise ValueError(f"{self.name}: {num_visual} visual token per sample; merging needs at least 2")
        return [Stage(layer=0, keep=0, insert=self.fixed_count(num_visual))]

    def adaptive_index(self, order: torch.Tensor, ratio: float, num_visual: int) -> torch.Tensor:
        """Kept entries of one sample in the adaptive branch: ``int(V * ratio)`` top patches, and for "+" the
        grid ``arange(0, V - 1, int(int(1/ratio) / 3))`` minus the kept ones. Where the official code fails,
        ratio = 0 is taken as 1/V for the grid stride, and a stride of 0 (ratio > 1/3) as 1."""
        top = order[: int(num_visual * ratio)]
        if not self.grid_additions:
            return top
        step = int(1 / ratio) if ratio > 0 else num_visual
        grid = torch.arange(0, num_visual - 1, max(1, int(step / 3)), device=order.device)
        return torch.cat([top, grid[~torch.isin(grid, top)]])

    def bind_model(self, model) -> None:
        """Notes whether the family packs crops (LLaVA-NeXT: the counts are then known at selection, newline
        tokens on top; the handle plans again after binding)."""
        from finepruner.models.adapters import adapter_for  # no import cycle

        try:
            self._packed = bool(adapter_for(model).packs_crops)
        except ValueError:  # not a registered family: the LLaVA-1.5 layout
            self._packed = False

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> Selection:
        vision = ctx.require_vision(self.name, *self.needs_vision, projector=True)
        if vision.newline_mask is not None:
            return self._select_packed(vision, ctx.visual_ids)
        ids = ctx.visual_ids
        batch, num_visual = ids.shape
        if vision.patches_per_image != num_visual:
            raise ValueError(
                f"{self.name}: {num_visual} visual tokens per sample from images of {vision.patches_per_image} "
                "patches; PruMerge ranks and merges the patches of one image and needs one image per sample "
                "(LLaVA-1.5 layout)"
            )
        device = ids.device
        attention = vision.last_layer_attention.to(device).gather(1, ids)
        features = _gather(vision.patch_features.to(device), ids)
        keys = _gather(vision.last_layer_keys.to(device), ids)
        order = attention.argsort(dim=-1, descending=True, stable=True)
        if not self.adaptive:
            indices = [self.fixed_index(order[b], num_visual) for b in range(batch)]
        else:
            if self.iqr == "batch":  # official: quartiles and ratio over the flattened batch
                ratios = [outlier_count(attention) / attention.numel()] * batch
            else:
                ratios = [outlier_count(attention[b]) / num_visual for b in range(batch)]
            indices = [self.adaptive_index(order[b], ratios[b], num_visual) for b in range(batch)]
        rows = [merge_tokens(features[b], keys[b], attention[b], indices[b], self.neighbours,
                             self.normalize_merge_weights) for b in range(batch)]
        count = max(row.shape[0] for row in rows)
        insert = features.new_zeros(batch, count, features.shape[-1], dtype=torch.float32)
        valid = torch.zeros(batch, count, dtype=torch.bool, device=device)
        origins = torch.zeros(batch, count, dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            insert[b, : row.shape[0]] = row
            valid[b, : row.shape[0]] = True
            origins[b, : indices[b].numel()] = indices[b]
        projected = vision.project(insert.to(features.dtype))
        keep = torch.empty(batch, 0, dtype=torch.long, device=device)
        return Selection(keep=keep, insert=projected.to(device), insert_from=origins, insert_valid=valid)


    def unit_index(self, order: torch.Tensor, count: int, crops: int, ratio: float | None) -> torch.Tensor:
        """Kept entries (positions into the unit's ``count`` tokens) of one LLaVA-NeXT budget unit of ``crops``
        crops, from its descending-attention ``order``: the adaptive branch at the outlier ``ratio``, or the fixed
        one with ``tokens`` per unit (``N - crops`` top tokens; "+": ``r = N / 2U``) or ``ratio`` (checked per
        image, capped per crop)."""
        if ratio is not None:
            return self.adaptive_index(order, ratio, count)
        per_crop = self.budget_scope == "crop"
        if self.tokens is not None and not self.grid_additions:
            top = self.tokens - crops
            if not per_crop and not 0 <= top <= count:
                raise ValueError(
                    f"{self.name}: tokens={self.tokens} is not allowed for an image of {count} tokens in {crops} crops "
                    f"besides its newline tokens (always kept): tokens are the top tokens plus one extra token per "
                    f"crop, so tokens must be in {crops}..{count + crops}"
                )
            return order[: max(0, top)]
        if self.tokens is not None:
            if not per_crop and self.tokens > 2 * count:
                raise ValueError(
                    f"{self.name}: tokens={self.tokens} is not allowed for an image of {count} tokens besides its "
                    f"newline tokens (always kept); tokens must be in 1..{2 * count} (2U: r = N / 2U <= 1)"
                )
            ratio = min(1.0, self.tokens / (2 * count))
        else:
            ratio = float(self.ratio)
        return self.fixed_branch(order, ratio, count)

    def _select_packed(self, vision, ids: torch.Tensor) -> Selection:
        """LLaVA-NeXT: the rule per budget unit (the image or each crop) of the image's packed tokens, merges
        and extra tokens per crop, newline tokens kept and not counted (class docstring)."""
        from finepruner.engine.vision import image_candidates  # no import cycle

        device = ids.device
        batch, num_visual = ids.shape
        newline, crop = image_candidates(vision, ids)
        attention = vision.last_layer_attention.to(device).gather(1, ids).float()
        features = _gather(vision.patch_features.to(device), ids)
        keys = _gather(vision.last_layer_keys.to(device), ids)
        lines = [torch.nonzero(newline[b])[:, 0] for b in range(batch)]
        if len({line.numel() for line in lines}) > 1:
            raise ValueError(
                f"{self.name}: images of the same token count with {sorted({line.numel() for line in lines})} "
                "newline tokens in one batch (different crop layouts); batch them separately"
            )
        units: list[list[torch.Tensor]] = []
        for b in range(batch):
            candidates = torch.nonzero(~newline[b])[:, 0]
            if self.budget_scope == "image":
                units.append([candidates])
            else:
                units.append([candidates[crop[b, candidates] == c] for c in torch.unique(crop[b, candidates]).tolist()])
        ratios: dict[tuple[int, int], float | None] = {}
        if self.adaptive and self.iqr == "batch":  # the quartiles over all units of the group
            pooled = torch.cat([attention[b, m] for b in range(batch) for m in units[b]])
            shared = outlier_count(pooled) / pooled.numel()
        for b in range(batch):
            for u, members in enumerate(units[b]):
                if not self.adaptive:
                    ratios[b, u] = None
                elif self.iqr == "batch":
                    ratios[b, u] = shared
                else:
                    ratios[b, u] = outlier_count(attention[b, members]) / members.numel()
        rows, origins = [], []
        for b in range(batch):
            row, origin = [], []
            for u, members in enumerate(units[b]):
                unit_crops = torch.unique(crop[b, members]).tolist()
                order = attention[b, members].argsort(descending=True, stable=True)
                index = members[self.unit_index(order, members.numel(), len(unit_crops), ratios[b, u])]
                merged = features.new_zeros(index.numel(), features.shape[-1], dtype=torch.float32)
                extras, extra_from = [], []
                for c in unit_crops:
                    own = members[crop[b, members] == c]  # the crop's tokens, in token order
                    local = torch.full((num_visual,), -1, dtype=torch.long, device=device)
                    local[own] = torch.arange(own.numel(), device=device)
                    at = torch.nonzero(crop[b, index] == c)[:, 0]  # the crop's kept entries, in output order
                    values = merge_tokens(features[b, own], keys[b, own], attention[b, own], local[index[at]],
                                          self.neighbours, self.normalize_merge_weights)
                    merged[at] = values[:-1]
                    extras.append(values[-1:])
                    extra_from.append(own[:1])
                row += [merged, *extras]
                origin += [index, *extra_from]
            rows.append(torch.cat(row))
            origins.append(torch.cat(origin))
        count = max(r.shape[0] for r in rows)
        insert = features.new_zeros(batch, count, features.shape[-1], dtype=torch.float32)
        valid = torch.zeros(batch, count, dtype=torch.bool, device=device)
        insert_from = torch.zeros(batch, count, dtype=torch.long, device=device)
        for b, (r, o) in enumerate(zip(rows, origins, strict=True)):
            insert[b, : r.shape[0]] = r
            valid[b, : r.shape[0]] = True
            insert_from[b, : o.numel()] = o
        projected = vision.project(insert.to(features.dtype))
        keep = torch.stack(lines)
        return Selection(keep=keep, insert=projected.to(device), insert_from=insert_from,
                         insert_valid=None if bool(valid.all()) else valid)


class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus spatially sampled patches (spec §5.1 "+", §5.3); parameters as ``prumerge``.

    Adaptive (default): the outliers plus the grid ``arange(0, V - 1, int(int(1/ratio) / 3))`` not already
    kept, plus the extra token. ``tokens=N``: the official non-adaptive branch with ``r = N / (2V)``.
    """

    name = "prumerge_plus"
    grid_additions = True


def _gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(1, ids[..., None].expand(-1, -1, values.shape[-1]))
