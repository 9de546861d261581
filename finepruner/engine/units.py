"""Budget units of a prefill: the visual tokens one selection call ranks together.

A unit is one image of one sample on families with per-image budgets (LLaVA-NeXT, OneVision), or all
visual tokens of one sample on LLaVA-1.5 (``ModelAdapter.per_image_budget``). Units with the same number
of visual tokens share a plan and form a *group*: the method's ``select`` runs once per group, batched
over its units, with the same tensors it sees at batch size 1 ([u, V] instead of [B, V]). A batch whose
units are exactly its samples in order with equal counts is one group: every method then runs exactly as
it always did on LLaVA-1.5 (``Group.whole_batch``).

``rebuild`` applies the groups' selections when the rows end up with different lengths (or a row holds
several units): each row's kept tokens and inserted tokens are laid out in sequence order and the batch
is left-padded again (``spec/models.md`` §5.1, "gather per row, re-pad (left), carry per-row 2-D masks").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finepruner.models.adapters.base import ImageSpan

#: Position id of re-padding slots (transformers' ``masked_fill_(attention_mask == 0, 1)`` convention).
PAD_POSITION = 1


@dataclass
class Unit:
    """The current visual tokens of one budget unit during a prefill.

    Attributes:
        row: the sample.
        image: the image's index in the sample (0 for a per-sample unit).
        offset: index of the unit's first token among the sample's visual tokens.
        count: the unit's original visual tokens N (its plan is ``method.plan(layers, N)``).
        index: [V] current sequence positions of its visual tokens (in the row).
        ids: [V] unit-local ids: 0..N-1 original tokens, N, N+1, ... tokens inserted by stages.
        row_ids: [V] the same tokens as ids of the sample (``Handle.kept``): original tokens
            ``offset + id``, inserted tokens numbered after all of the sample's visual tokens.
        next_id: the unit-local id of its next inserted token.
    """

    row: int
    image: int
    offset: int
    count: int
    index: torch.Tensor
    ids: torch.Tensor
    row_ids: torch.Tensor
    next_id: int


@dataclass
class Group:
    """Units with the same original count (the same plan), selected together."""

    count: int
    units: list[Unit]
    whole_batch: bool = False
    memo: dict = field(default_factory=dict)

    @property
    def rows(self) -> list[int]:
        return [unit.row for unit in self.units]


def make_units(spans: list[list[ImageSpan]], image_mask: torch.Tensor) -> list[Unit]:
    """Units in row-major order from the adapter's image spans and the [B, L] visual-token mask."""
    units: list[Unit] = []
    for row, row_spans in enumerate(spans):
        if not row_spans:
            continue
        positions = image_mask[row].nonzero()[:, 0]
        for span in row_spans:
            ids = torch.arange(span.count, device=image_mask.device)
            units.append(Unit(row=row, image=span.image, offset=span.offset, count=span.count,
                              index=positions[span.offset:span.offset + span.count], ids=ids,
                              row_ids=ids + span.offset, next_id=span.count))
    return units


def make_groups(units: list[Unit], batch: int) -> list[Group]:
    """Units grouped by count, in order of first appearance; ``whole_batch`` when one group holds one unit
    per sample, every sample in order."""
    groups: dict[int, Group] = {}
    for unit in units:
        groups.setdefault(unit.count, Group(unit.count, [])).units.append(unit)
    result = list(groups.values())
    if len(result) == 1 and result[0].rows == list(range(batch)):
        result[0].whole_batch = True
    return result


def row_visual_totals(units: list[Unit], batch: int) -> list[int]:
    """Current visual tokens per sample."""
    totals = [0] * batch
    for unit in units:
        totals[unit.row] += int(unit.index.shape[0])
    return totals


def pack_rows(rows: list[torch.Tensor | None], fill: int | float, batch_shape: int) -> torch.Tensor:
    """[B, max n] from one 1-D (or [n, ...]) tensor per sample, right-padded with ``fill``; rows of equal
    length stack without padding."""
    present = [r for r in rows if r is not None]
    width = max((r.shape[0] for r in present), default=0)
    template = present[0]
    out = template.new_full((batch_shape, width, *template.shape[1:]), fill)
    for row, values in enumerate(rows):
        if values is not None:
            out[row, : values.shape[0]] = values
    return out


@dataclass
class Choice:
    """One unit's selection: ``keep`` [k] indices into its current tokens; optional inserted hidden states
    ``insert`` [c, D], the token each takes its original position from (``insert_from`` [c]) and which
    slots are real (``valid`` [c] bool, None: all)."""

    keep: torch.Tensor
    insert: torch.Tensor | None = None
    insert_from: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class Rebuilt:
    """``rebuild``'s result: the new [B, L'] tensors and each unit's kept/inserted row ids."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    mask2d: torch.Tensor | None
    source_index: torch.Tensor
    shift: torch.Tensor
    kept_row_ids: list[torch.Tensor]
    inserted_row_ids: list[torch.Tensor | None]


def rebuild(hidden: torch.Tensor, position_ids: torch.Tensor, mask2d: torch.Tensor | None,
            source_index: torch.Tensor, shift: torch.Tensor, units: list[Unit], choices: list[Choice],
            renumber: bool, row_counters: list[int]) -> Rebuilt:
    """Keep each unit's chosen tokens and every non-visual token, insert each unit's new tokens right
    after its last kept token (where its span began when it keeps none), and left-pad the rows again.

    Positions: ``renumber`` closes the gaps (each token moves down by the visual tokens dropped before it
    and up by the real inserted tokens before it; inserted tokens follow the token before them); else
    kept tokens keep theirs and inserted ones take the position of their ``insert_from`` token. The units
    are updated in place (``index``, ``ids``, ``row_ids``, ``next_id``); ``row_counters`` [B] counts the
    ids given to inserted tokens of each sample and is updated too.
    """
    batch, length, width = hidden.shape
    device = hidden.device
    by_row: dict[int, list[tuple[Unit, Choice]]] = {}
    for unit, choice in zip(units, choices, strict=True):
        by_row.setdefault(unit.row, []).append((unit, choice))
    rows: list[dict] = []
    new_shift = shift.clone()
    kept_row_ids: dict[int, torch.Tensor] = {}
    inserted_row_ids: dict[int, torch.Tensor | None] = {}
    for row in range(batch):
        pairs = by_row.get(row, [])
        keep = torch.ones(length, dtype=torch.bool, device=device)
        for unit, _ in pairs:
            keep[unit.index] = False
        for unit, choice in pairs:
            keep[unit.index[choice.keep]] = True
        old = keep.nonzero()[:, 0]
        dropped = (~keep).long()
        dropped_before = dropped.cumsum(0) - dropped
        splices = []
        for order, (unit, choice) in enumerate(pairs):
            if choice.insert is None:
                continue
            anchor = unit.index[choice.keep[-1]] if choice.keep.numel() else unit.index[0] - 1
            point = int(torch.searchsorted(old, anchor.reshape(1), right=True)[0])
            splices.append((point, order, unit, choice))
        splices.sort(key=lambda item: (item[0], item[1]))
        source, positions, masks, origins = [], [], [], []
        inserted_at: dict[int, torch.Tensor] = {}
        extra: list[torch.Tensor] = []
        placed, added, cursor = 0, 0, 0
        row_mask = mask2d[row] if mask2d is not None else torch.ones(length, dtype=torch.long, device=device)
        for point, order, unit, choice in [*splices, (old.shape[0], -1, None, None)]:
            piece = old[cursor:point]
            if piece.numel():
                pos = position_ids[row, piece]
                if renumber:
                    pos = pos - dropped_before[piece] + added
                source.append(piece)
                positions.append(pos)
                masks.append(row_mask[piece])
                origins.append(source_index[row, piece])
                placed += piece.numel()
            cursor = point
            if choice is None:
                continue
            count = choice.insert.shape[0]
            valid = choice.valid if choice.valid is not None else torch.ones(count, dtype=torch.bool, device=device)
            if renumber:
                previous = positions[-1][-1] if positions else position_ids[row, old[0]] - 1
                offsets = (valid.long().cumsum(0) - 1).clamp(min=0)
                pos = previous + 1 + offsets
                added += int(valid.sum())
            else:
                pos = position_ids[row, unit.index[choice.insert_from]]
            source.append(length + sum(e.shape[0] for e in extra) + torch.arange(count, device=device))
            extra.append(choice.insert.to(hidden.dtype))
            positions.append(pos.to(position_ids.dtype))
            masks.append(valid.to(row_mask.dtype))
            origins.append(torch.full((count,), -1, dtype=source_index.dtype, device=device))
            inserted_at[order] = placed + torch.arange(count, device=device)
            placed += count
        if renumber:
            new_shift[row] = shift[row] + int(dropped.sum()) - added
        rows.append({"source": torch.cat(source) if source else old, "positions": torch.cat(positions),
                     "mask": torch.cat(masks), "origins": torch.cat(origins),
                     "extra": torch.cat(extra) if extra else None, "pairs": pairs, "old": old,
                     "inserted_at": inserted_at})
    new_length = max(r["source"].shape[0] for r in rows)
    out_hidden = hidden.new_zeros(batch, new_length, width)
    out_positions = position_ids.new_full((batch, new_length, *position_ids.shape[2:]), PAD_POSITION)
    mask_dtype = mask2d.dtype if mask2d is not None else torch.long
    out_mask = torch.zeros(batch, new_length, dtype=mask_dtype, device=device)
    out_source = torch.full((batch, new_length), -1, dtype=source_index.dtype, device=device)
    for row, built in enumerate(rows):
        count = built["source"].shape[0]
        pad = new_length - count
        extended = hidden[row] if built["extra"] is None else torch.cat([hidden[row], built["extra"]])
        out_hidden[row, pad:] = extended[built["source"]]
        out_positions[row, pad:] = built["positions"]
        out_mask[row, pad:] = built["mask"].to(mask_dtype)
        out_source[row, pad:] = built["origins"]
        new_of_old = torch.full((length,), -1, dtype=torch.long, device=device)
        is_old = built["source"] < length
        new_of_old[built["source"][is_old]] = pad + torch.arange(count, device=device)[is_old]
        for order, (unit, choice) in enumerate(built["pairs"]):
            kept_index = new_of_old[unit.index[choice.keep]]
            kept_ids, kept_row = unit.ids[choice.keep], unit.row_ids[choice.keep]
            kept_row_ids[id(unit)] = kept_row
            inserted_row_ids[id(unit)] = None
            if order in built["inserted_at"]:
                count_new = choice.insert.shape[0]
                new_ids = torch.arange(unit.next_id, unit.next_id + count_new, device=device)
                new_row = torch.arange(row_counters[row], row_counters[row] + count_new, device=device)
                unit.next_id += count_new
                row_counters[row] += count_new
                unit.index = torch.cat([kept_index, pad + built["inserted_at"][order]])
                unit.ids = torch.cat([kept_ids, new_ids])
                unit.row_ids = torch.cat([kept_row, new_row])
                inserted_row_ids[id(unit)] = new_row
            else:
                unit.index, unit.ids, unit.row_ids = kept_index, kept_ids, kept_row
    needs_mask = mask2d is not None or bool((out_mask == 0).any())
    return Rebuilt(
        hidden=out_hidden, position_ids=out_positions, mask2d=out_mask if needs_mask else None,
        source_index=out_source, shift=new_shift,
        kept_row_ids=[kept_row_ids[id(u)] for u in units],
        inserted_row_ids=[inserted_row_ids[id(u)] for u in units],
    )
