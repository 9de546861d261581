"""``vispruner``: VisPruner (Zhang et al., ICCV'25), spec ``methods.md`` §4 and §7.7.

Before the language model, keep ``int(T * important_ratio)`` "important" visual tokens with the largest
[CLS] attention in the vision layer LLaVA reads (penultimate), mean over heads; fill the rest with
"diverse" tokens left by a ToMe-style de-duplication of the remaining tokens on the cosine similarity
of their pre-projector CLIP features.
"""

from __future__ import annotations

import numpy as np
import torch

from finepruner.methods.base import Positions, PruningMethod, Stage, StageContext, check_tokens
from finepruner.methods.divprune import symmetric_gram

#: ``budget_scope`` values (``engine.vision.BUDGET_SCOPES``): ``tokens`` per image, or per crop.
BUDGET_SCOPES: tuple[str, ...] = ("image", "crop")

#: Tokens removed per de-duplication round (official code).
ROUND_SIZE = 8


def important_count(tokens: int, important_ratio: float) -> int:
    """``int(T * r)``, as the official code."""
    return int(tokens * important_ratio)


def vispruner_select(
    cls_attention: torch.Tensor, features: torch.Tensor, tokens: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """VisPruner's kept set, vectorised over the batch (the de-duplication rounds read a candidate list per
    token, ``deduplicate``; ``vispruner_select_plain`` is the same rule with plain rounds).

    Args:
        cls_attention: [B, V] [CLS] attention (mean over heads).
        features: [B, V, D] pre-projector features.
        tokens: T, the number of tokens kept per sample (1..V).
        important_ratio: r; ``int(T*r)`` tokens are kept by attention, the rest by de-duplication.

    Returns:
        [B, T] sorted indices.

    De-duplication: the residual tokens (descending attention) are split alternately into A (even
    places) and B (odd places); the ``min(8, R - T_div, |A|)`` A-tokens whose best cosine match in B is
    highest are dropped; the survivors of A (in descending-similarity order, i.e. the order of the
    official ``argsort(...)[:, r:]``) followed by all of B form the next residual list. Rounds repeat until
    ``T_div`` tokens remain. Where the official code runs (every round with an even R and at most R/2
    drops) this is the official rule; the cap ``|A| = ceil(R/2)`` extends it to odd R and to small R,
    where the official code raises, and still ends with exactly T tokens. With ``T_div = 0`` no
    de-duplication runs.
    """
    return _select(cls_attention, features, tokens, important_ratio, deduplicate)


def vispruner_select_plain(
    cls_attention: torch.Tensor, features: torch.Tensor, tokens: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """``vispruner_select`` with the plain rounds (``deduplicate_plain``: an ``|A| x |B|`` block per
    round); the same kept set, at a cost that grows as the cube of the token count (tests, benchmarks)."""
    return _select(cls_attention, features, tokens, important_ratio, deduplicate_plain)


def _select(cls_attention, features, tokens, important_ratio, rounds) -> torch.Tensor:
    batch, num_visual, width = features.shape
    num_important = important_count(tokens, important_ratio)
    num_diverse = tokens - num_important
    order = cls_attention.argsort(dim=-1, descending=True, stable=True)
    important, residual = order[:, :num_important], order[:, num_important:]
    normed = features.to(torch.promote_types(features.dtype, torch.float32))
    normed = normed / normed.norm(dim=-1, keepdim=True)
    if num_diverse > 0:
        # cosine similarities among the initial residual tokens, once; rounds only read them
        start = normed.gather(1, residual[..., None].expand(-1, -1, width))
        gram = symmetric_gram(start)  # [B, R0, R0]: x xᵀ, each pair once (half the multiply-adds)
        if not bool(torch.isfinite(start.sum())):  # unit rows: a finite gram; else the plain NaN rules
            rounds = deduplicate_plain
        residual = residual.gather(1, rounds(gram, num_diverse))
    selected = torch.cat([important, residual], dim=1) if num_diverse > 0 else important
    return selected.sort(dim=-1).values


#: Candidates kept per token by the de-duplication rounds (its most similar tokens among those still
#: alive). With 24, a round of ``deduplicate_batched`` keeps its [|A|, 24] arrays below ATen's parallel grain
#: (32,768 elements) for one sample of up to ~2,730 residual tokens: the ~15 small operations of each round
#: run serially, which avoids OpenMP barrier stalls on busy cores (32 was up to 4x slower on the loaded
#: 2-core VM, no faster when idle).
CANDIDATES = 24
#: Of those, the most similar ones ``deduplicate_host`` reads first in every round (the rest only for the
#: A-tokens none of whose first ``HEAD`` candidates is in B, about one in ten at 2,720 residual tokens).
HEAD = 8


def deduplicate(gram: torch.Tensor, count: int) -> torch.Tensor:
    """The de-duplication rounds of ``vispruner_select`` on a residual list ``0..R0-1``.

    Args:
        gram: [B, R0, R0] cosine similarities of the residual tokens, in list order (finite).
        count: T_div, the tokens left at the end (1..R0).

    Returns:
        [B, T_div] places (indices into the initial list) in final list order.

    Each round needs, for every A-token, its best match in B; a plain round gathers the whole
    ``|A| x |B|`` block (R0³/96 reads in all, the cost that grows as the cube of the token count). Here
    every token keeps its ``CANDIDATES`` most similar tokens among those still alive (top-k of its gram
    row, refilled from the alive tokens when none of them is in B): since tokens only ever leave, the
    first candidate in B has the largest similarity of all B-tokens, so a round reads ``|A| x 24``
    entries. The values are the same gram entries and ``max`` is exact, so every round's ordering,
    ties included, is the plain rule's (``deduplicate_plain``). On the CPU the rounds run per sample as
    NumPy operations (``deduplicate_host``: about 1 µs of dispatch per operation where PyTorch's costs
    5-7 µs, and a round is a dozen operations on ~1,400 values); elsewhere batched as tensor operations
    (``deduplicate_batched``, no host synchronisation but one per round).
    """
    if gram.device.type != "cpu":
        return deduplicate_batched(gram, count)
    return torch.stack([deduplicate_host(sample, count) for sample in gram])


def deduplicate_host(gram: torch.Tensor, count: int) -> torch.Tensor:
    """``deduplicate`` for one sample's [R0, R0] CPU gram, on NumPy arrays over the same memory; returns
    [T_div] places.

    The candidate tables are [CANDIDATES, R0] (column ``i``: token ``i``'s candidates, most similar first),
    so that a round's gather of the A-tokens' columns and its maximum over candidates run along contiguous
    rows. A round reads the first ``HEAD`` candidates of every A-token: those are its most similar alive
    listed tokens, so the first one in B is its best match in B; only the A-tokens with none of them in B
    read the rest of their list, and only those with none of their list in B are refilled (``_refill_host``).
    """
    size = gram.shape[0]
    if size <= 2 * CANDIDATES:
        return deduplicate_plain(gram[None], count)[0]
    values, ids = gram.topk(CANDIDATES, dim=-1, sorted=True)
    cand_val = values.T.contiguous().numpy()  # [C, R0], each column in descending order
    cand_idx = ids.T.contiguous().numpy()
    head_val, head_idx = cand_val[:HEAD], cand_idx[:HEAD]  # views: the first rows are each token's best ones
    table = gram.numpy()
    places = np.arange(size)
    alive = np.ones(size, dtype=bool)
    never = np.float32(-np.inf)
    in_b = np.full(size, never, dtype=np.float32)  # 0 on the current B-tokens, -inf elsewhere
    while True:
        length = places.size
        drop = min(ROUND_SIZE, length - count, (length + 1) // 2)
        if drop <= 0:
            return torch.from_numpy(places)
        first, second = places[0::2], places[1::2]
        in_b.fill(never)
        in_b[second] = 0.0
        best = (head_val.take(first, axis=1) + in_b.take(head_idx.take(first, axis=1))).max(axis=0)
        missing = np.flatnonzero(best == never)
        if missing.size:  # no HEAD candidate in B: the whole list, then a refill
            rows = first[missing]
            found = (cand_val.take(rows, axis=1) + in_b.take(cand_idx.take(rows, axis=1))).max(axis=0)
            lost = np.flatnonzero(found == never)
            if lost.size:
                found[lost] = _refill_host(table, cand_val, cand_idx, rows[lost], alive, in_b, second)
            best[missing] = found
        order = np.argsort(-best, kind="stable")  # descending, ties in list order, as the plain rule
        alive[first[order[:drop]]] = False
        places = np.concatenate([first[order[drop:]], second])


def _refill_host(table, cand_val, cand_idx, rows, alive, in_b, second) -> np.ndarray:
    """Refill the candidate columns of ``rows`` with their most similar alive tokens, in descending order;
    returns their best similarity in B (exact over B where still none of them is in B). Where fewer tokens
    are alive than a column holds, its last entries stay as they were: dead tokens (never in B again) or
    alive ones listed again, with their true similarities, so the column still lists every alive token."""
    width = cand_val.shape[0]
    living = np.flatnonzero(alive)
    values = table.take(rows, axis=0).take(living, axis=1)  # [n, alive] (``take``: 3x faster than [rows, living])
    keep = min(width, living.size)
    if keep < living.size:
        top = np.argpartition(values, living.size - keep, axis=1)[:, living.size - keep:]
        values = values[np.arange(rows.size)[:, None], top]
    else:
        top = np.broadcast_to(np.arange(living.size), values.shape)
    order = np.argsort(-values, axis=1)  # most similar first (the order of equal values does not matter)
    lines = np.arange(rows.size)[:, None]
    top_val, top_idx = values[lines, order], living[top[lines, order]]
    cand_val[:keep, rows], cand_idx[:keep, rows] = top_val.T, top_idx.T
    best = (top_val + in_b.take(top_idx)).max(axis=1)
    still = np.flatnonzero(best == -np.inf)
    if still.size:  # every alive candidate is in A: the exact maximum over B
        best[still] = table.take(rows[still], axis=0).take(second, axis=1).max(axis=1)
    return best


def deduplicate_batched(gram: torch.Tensor, count: int) -> torch.Tensor:
    """``deduplicate`` on tensors, the whole batch in one set of operations per round (flat token ids, one
    candidate table [B*R0, CANDIDATES] for every sample)."""
    batch, size, _ = gram.shape
    if size <= 2 * CANDIDATES:
        return deduplicate_plain(gram, count)
    device = gram.device
    flat = gram.reshape(batch * size, size)
    # every token is addressed by its flat id, sample * R0 + place, so one table serves the whole batch
    offset = torch.arange(batch, device=device)[:, None] * size
    cand_val, cand_idx = gram.topk(CANDIDATES, dim=-1, sorted=False)  # [B, R0, C]
    cand_val = cand_val.reshape(batch * size, -1)
    cand_idx = (cand_idx + offset[..., None]).reshape(batch * size, -1)
    places = torch.arange(size, device=device) + offset  # [B, R] flat ids in list order
    # 0 on the current B-tokens, -inf elsewhere: adding it keeps a candidate's similarity only when in B
    in_b = torch.full((batch * size,), -torch.inf, dtype=gram.dtype, device=device)
    second_ids = None
    while True:
        length = places.shape[1]
        drop = min(ROUND_SIZE, length - count, (length + 1) // 2)
        if drop <= 0:
            return places - offset
        first, second = places[:, 0::2], places[:, 1::2]
        if second_ids is not None:
            in_b.index_fill_(0, second_ids, -torch.inf)
        second_ids = second.reshape(-1)
        in_b.index_fill_(0, second_ids, 0.0)
        rows = first.reshape(-1)  # the A-tokens, [B*|A|]
        best = (cand_val.index_select(0, rows) + _lookup(in_b, cand_idx.index_select(0, rows))).amax(dim=-1)
        if best.amin().item() == -torch.inf:  # no candidate of some A-token is in B
            missing = (best == -torch.inf).nonzero().squeeze(1)
            best[missing] = _refill(flat, cand_val, cand_idx, rows[missing], places, in_b, second, size)
        order = best.view(batch, -1).argsort(dim=-1, descending=True, stable=True)
        places = torch.cat([first.gather(1, order[:, drop:]), second], dim=1)


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` for a flat table (a 1-D gather, much cheaper than advanced indexing or ``take``)."""
    return table.index_select(0, ids.reshape(-1)).view(ids.shape)


def _refill(flat, cand_val, cand_idx, rows, places, in_b, second, size) -> torch.Tensor:
    """Refill the candidates of ``rows`` (flat ids) with their most similar alive tokens (those still in
    ``places``); returns their best similarity in B (exact over B where still none of them is in B)."""
    sample = rows // size
    mask = torch.zeros(in_b.shape, dtype=torch.bool, device=places.device).index_fill_(0, places.reshape(-1), True)
    alive = mask.nonzero().view(places.shape).index_select(0, sample)  # [n, R] flat ids of the row's sample
    values = flat.index_select(0, rows).gather(1, alive - (sample * size)[:, None])
    width = cand_val.shape[1]
    keep = min(width, alive.shape[1])
    top_val, top_pos = values.topk(keep, dim=-1, sorted=False)
    top_idx = alive.gather(1, top_pos)
    if keep < width:  # fewer alive tokens than candidates: all of them, padded with -inf
        top_val = torch.cat([top_val, top_val.new_full((len(rows), width - keep), -torch.inf)], dim=1)
        top_idx = torch.cat([top_idx, top_idx[:, :1].expand(-1, width - keep)], dim=1)
    cand_val[rows], cand_idx[rows] = top_val, top_idx
    best = (top_val + _lookup(in_b, top_idx)).amax(dim=-1)
    still = (best == -torch.inf).nonzero().squeeze(1)
    if still.numel():  # every alive candidate is in A: the exact maximum over B
        columns = second.index_select(0, sample[still]) - (sample[still] * size)[:, None]
        best[still] = flat.index_select(0, rows[still]).gather(1, columns).amax(dim=-1)
    return best


def deduplicate_plain(gram: torch.Tensor, count: int) -> torch.Tensor:
    """``deduplicate`` by the plain rule: each round gathers the ``|A| x |B|`` similarity block."""
    batch, size, _ = gram.shape
    rows = torch.arange(batch, device=gram.device)[:, None, None]
    places = torch.arange(size, device=gram.device).expand(batch, -1)
    while True:
        length = places.shape[1]
        drop = min(ROUND_SIZE, length - count, (length + 1) // 2)
        if drop <= 0:
            return places
        first, second = places[:, 0::2], places[:, 1::2]
        best = gram[rows, first[:, :, None], second[:, None, :]].amax(dim=-1)  # [B, |A|]
        survivors = best.argsort(dim=-1, descending=True, stable=True)[:, drop:]
        places = torch.cat([first.gather(1, survivors), second], dim=1)


class VisPruner(PruningMethod):
    """VisPruner: [CLS]-attention important tokens + de-duplicated diverse tokens, before the LLM.

    "N tokens" means exactly ``tokens`` visual tokens per sample enter the language model (all of a
    sample's images together); positions are renumbered (a plain shorter sequence).

    Parameters:
        tokens: visual tokens kept per sample (T, the official ``visual_token_num``); default: a quarter
            of the visual tokens (144 of 576). Must be in 1..V.
        important_ratio: r (default 0.5): ``int(T*r)`` tokens by [CLS] attention, ``T - int(T*r)`` by
            de-duplication; 0 <= r <= 1.
        positions: ``"renumber"`` (default, as the official code) or ``"original"``.

    Signals: the [CLS]-query attention of the vision layer LLaVA reads (``vision_feature_layer``, -2),
    averaged over heads, recomputed in float32 from that layer's q/k projections by a forward hook
    (``finepruner.engine.vision``), and that layer's output patch features (pre-projector).

    LLaVA-NeXT / OneVision (``budget_scope``, ``spec/models.md`` §5.2): ``tokens`` counts per image over all
    its crops (``"image"``, default) or per crop (``"crop"``, the official NeXT rule: T per crop, a crop
    left with fewer tokens by unpadding keeps them all); the image's newline tokens are always kept on top
    and not counted. NeXT: the [CLS] attention of each crop (layer -2), ranked over the whole image with
    ``"image"``; de-duplication on the pre-projector features, in the image's token order. OneVision
    (SigLIP, no [CLS]): the attention each patch receives in the feature layer (mean over heads and
    queries, VisPruner#1); on grids the model shrinks (anyres_max_9), scores and features are mixed with
    the model's bilinear weights. On LLaVA-1.5 ``"crop"`` selects T per image of a sample.

    Deviations: scores and cosine similarities are computed in float32 (the official code uses the
    tower dtype); sorts are stable (the official ``argsort`` is not: only exact ties differ); odd
    residual counts and rounds that would drop more than half of the residual tokens, where the official
    code raises, follow the rule of ``vispruner_select``; on LLaVA-1.5 a sample with several images gets
    one selection over all its visual tokens with ``budget_scope="image"`` (the official code selects per
    image or crop); the stage's count is known at selection (``Stage.keep`` None: newline tokens are kept
    on top of ``tokens``).
    """

    name = "vispruner"
    default_positions = "renumber"
    needs_vision = ("cls_attention", "patch_features")

    def __init__(
        self, tokens: int | None = None, important_ratio: float = 0.5, positions: Positions | None = None,
        budget_scope: str = "image",
    ) -> None:
        super().__init__(positions)
        if isinstance(important_ratio, bool) or not isinstance(important_ratio, int | float) or not (
            0.0 <= important_ratio <= 1.0
        ):
            raise ValueError(f"{self.name}: important_ratio={important_ratio!r}; allowed: 0 <= important_ratio <= 1")
        if budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"{self.name}: budget_scope={budget_scope!r}; allowed: {BUDGET_SCOPES}")
        self.tokens, self.important_ratio = tokens, float(important_ratio)
        self.budget_scope = budget_scope

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        keep = self.tokens if self.tokens is not None else max(1, num_visual // 4)
        check_tokens(self.name, keep, num_visual)
        return [Stage(layer=0, keep=None)]  # newline tokens (NeXT, OneVision) are kept on top of ``tokens``

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        vision = ctx.require_vision(self.name, "cls_attention", "patch_features")
        if vision.newline_mask is not None or self.budget_scope != "image":
            return self._select_images(vision, ctx.visual_ids)
        ids = ctx.visual_ids
        attention = vision.cls_attention.to(ids.device).gather(1, ids)
        features = vision.patch_features.to(ids.device)
        features = features.gather(1, ids[..., None].expand(-1, -1, features.shape[-1]))
        keep = self.tokens if self.tokens is not None else max(1, ids.shape[1] // 4)
        return vispruner_select(attention, features, keep, self.important_ratio)

    def _select_images(self, vision, ids: torch.Tensor) -> torch.Tensor:
        """Per image (or crop): newline tokens kept, ``vispruner_select`` over the others
        (``engine.vision.select_keeping_newlines``)."""
        from finepruner.engine.vision import image_candidates, select_keeping_newlines  # no import cycle

        attention = vision.cls_attention.to(ids.device).gather(1, ids)
        features = vision.patch_features.to(ids.device)
        features = features.gather(1, ids[..., None].expand(-1, -1, features.shape[-1]))

        def choose(rows: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
            units = rows[:, None]  # the units' own tokens only (no copy of each unit's whole sample)
            scores, values = attention[units, candidates], features[units, candidates]
            return vispruner_select(scores, values, count, self.important_ratio)

        newline, crop = image_candidates(vision, ids)
        return select_keeping_newlines(self.name, newline, crop, self.tokens, self.budget_scope, choose)
