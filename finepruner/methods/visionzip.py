"""``visionzip``: VisionZip (Yang et al., CVPR'25, training-free mode), spec ``methods_more.md`` §1.

Before the language model, in the CLIP layer LLaVA reads its features from (``vision_feature_layer``, -2):
"dominant" tokens are the patches with the largest [CLS]-query attention summed over heads, and the [CLS]
vector itself is sent as one of them (official); the remaining patches are merged into "contextual" tokens:
targets taken at a regular stride of the remaining list, every other remaining patch joins the target whose
head-mean key is most similar (cosine), and a contextual token is ``H[t] + mean(H[members])``. The LLM gets
[CLS], the dominant patches (index order), then the contextual tokens, with contiguous positions.

Towers without [CLS] (Qwen2-VL/2.5-VL/3-VL; LightCompress's Qwen2.5-VL port, spec ``methods_more.md`` §8):
no [CLS] vector is sent; the dominant tokens are the merged tokens receiving the most attention in the last
vision block (mean over heads, over the image's queries, over each 2 x 2 merge unit), the contextual merge
compares the last block's keys (after its vision RoPE, mean over the merge unit and the heads) and averages
the merged tokens themselves (the language model's input rows), so nothing is projected.
"""

from __future__ import annotations

import torch

from finepruner.methods.base import (
    Positions,
    PruningMethod,
    Selection,
    Stage,
    StageContext,
    require_default_features,
)

#: ``budget_scope`` values (``engine.vision.BUDGET_SCOPES``): on LLaVA-NeXT ``tokens`` per image, or per crop.
BUDGET_SCOPES: tuple[str, ...] = ("image", "crop")

#: Signals on a tower without [CLS] (Qwen, spec §8): last-block received attention and keys, the LLM input rows.
NO_CLS_SIGNALS: tuple[str, ...] = ("cls_attention", "feature_keys", "projected_features")

#: Published LLaVA-1.5 budgets (dominant, contextual), spec §1.3.
PUBLISHED_SPLITS: dict[int, tuple[int, int]] = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def split_budget(tokens: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for ``tokens``: the published 5/32 contextual share, floored
    (64 -> 54+10, 128 -> 108+20, 192 -> 162+30; the same rule for every budget)."""
    contextual = tokens * 5 // 32
    return tokens - contextual, contextual


def dominant_patches(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] indices of the largest ``scores`` [B, V] (first index on ties), in index order."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order[:, :count].sort(dim=-1).values


def contextual_tokens(
    features: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge (spec §1.2), vectorised over the batch, in float32.

    Args:
        features: [B, V, Dv] pre-projector patch features H.
        keys: [B, V, d] head-mean keys of the feature layer.
        remaining: [B, R] indices of the non-dominant patches, in index order.
        contextual: number of contextual tokens c (1..R).

    Returns:
        ``(tokens, targets)``: [B, c, Dv] float32 ``H[t] + mean(H[members of t])`` (``H[t]`` alone for a
        target without members) and [B, c] the target patch indices. Targets are the remaining-list places
        0, s, 2s, ... (s = max(1, R // c)); every other remaining patch joins the target of largest cosine
        similarity of L2-normalised keys (first target on ties).
    """
    batch, count = remaining.shape
    step = max(1, count // contextual)
    places = torch.arange(contextual, device=remaining.device) * step
    is_target = torch.zeros(count, dtype=torch.bool, device=remaining.device)
    is_target[places] = True
    targets = remaining[:, places]
    others = remaining[:, ~is_target]
    width = features.shape[-1]
    values = features.float()
    normed = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    target_keys = normed.gather(1, targets[..., None].expand(-1, -1, normed.shape[-1]))
    other_keys = normed.gather(1, others[..., None].expand(-1, -1, normed.shape[-1]))
    assign = (other_keys @ target_keys.transpose(1, 2)).argmax(dim=-1)  # [B, R - c]
    one_hot = torch.nn.functional.one_hot(assign, contextual).to(values.dtype)  # [B, R - c, c]
    member_values = values.gather(1, others[..., None].expand(-1, -1, width))
    counts = one_hot.sum(dim=1).clamp(min=1.0)[..., None]  # [B, c, 1]
    means = one_hot.transpose(1, 2) @ member_values / counts
    target_values = values.gather(1, targets[..., None].expand(-1, -1, width))
    return target_values + means, targets


class VisionZip(PruningMethod):
    """VisionZip: dominant tokens by [CLS] attention + merged contextual tokens, before the LLM (spec §1).

    What "N tokens" means: exactly ``dominant + contextual`` tokens per sample enter the language model; by
    default (``cls_token=True``, official) one of the dominant tokens is the [CLS] vector of the feature
    layer, so ``dominant - 1`` patches are kept.

    Parameters:
        tokens: N, split as the published budgets (64 -> 54+10, 128 -> 108+20, 192 -> 162+30; in general
            contextual = floor(5N/32)); default V/4 (144 -> 122+22 on LLaVA-1.5). Not with
            ``dominant``/``contextual``.
        dominant, contextual: the split directly (both together): dominant >= 1 (>= 0 without the [CLS]
            token), contextual >= 0; ``dominant - cls_token <= V`` and ``contextual <=`` the patches left.
        cls_token: True (official): the [CLS] vector is sent as the first dominant token; False
            (LightCompress, spec §8): ``dominant`` patches, no [CLS]; None (default): True where the vision
            tower has a [CLS] token (LLaVA-1.5, NeXT), False where it has none (Qwen; True is refused there).
        positions: ``"renumber"`` (default, official: contiguous positions) or ``"original"`` (dominant
            patches keep theirs, a contextual token takes its target's, [CLS] the first visual token's; on
            NeXT the first token of its unit).
        budget_scope: ``"image"`` (default) or ``"crop"``: the unit ``tokens`` counts on LLaVA-NeXT.

    Signals (``finepruner.engine.vision``): the feature layer's [CLS]-row attention summed over heads and its
    head-mean keys (one hook on that layer's self-attention), its output's [CLS] vector, the patch features
    and the projector outputs. The [CLS] and contextual tokens go through the model's projector.

    LLaVA-NeXT (``budget_scope``, ``spec/models.md`` §5.2, ``methods_more.md`` §1.4): ``tokens`` (or the
    split) counts per image over all its crops (``"image"``, default: one ranking of the crops' summed [CLS]
    rows, contextual tokens merged over the whole image, one [CLS] vector: the base crop's) or per crop
    (``"crop"``, the official NeXT rule, 108+20 / 54+10 / 27+5 per crop: every crop its own dominant patches,
    its [CLS] vector and contextual tokens; a crop left with fewer patches by unpadding keeps its patches as
    dominant first); newline tokens are always kept, in place, and not counted. The dominant patches stay in
    the image's token order; the [CLS] vectors, then the contextual tokens, of the image's units are inserted
    after the sample's kept visual tokens (official NeXT: base crop first, other crops' [CLS] and contextual
    tokens after all dominant patches, no unpadding and no newline). On LLaVA-1.5 ``budget_scope`` changes
    nothing (one image per sample). OneVision is refused (SigLIP has no [CLS] row, and its capture has no keys).

    Qwen2-VL / Qwen2.5-VL / Qwen3-VL (LightCompress ``visionzip.py``, ``prune_qwenv25vl_hook``; spec §8): per
    image, ``tokens`` (or the split) counts its V merged tokens, no [CLS] vector (``cls_token`` None or
    False). Dominant: the top ``dominant`` merged tokens by the attention they receive in the last vision
    block (``cls_attention``: mean over heads and over the image's queries, mean over each merge unit, window
    order undone; LightCompress sums over queries: the same ranking within an image). Contextual: targets at
    the regular stride of the remaining tokens, every other remaining token joins the target whose
    ``feature_keys`` (the last block's keys after its vision RoPE, mean over the merge unit and over heads,
    as LightCompress) are most similar (cosine), a contextual token is ``X[t] + mean(X[members])`` of the
    merged tokens X (the language model's input rows, as LightCompress merges ``inputs_embeds``). Kept and
    contextual tokens keep the 3-D positions of their token and target (LightCompress). Deviations:
    LightCompress's budget is two fractions of N (``int(d N)``, ``max(int(c N), 1)``), here ``tokens``/the
    split per image; it writes each contextual token into its target's slot, here the contextual tokens
    follow the image's kept tokens (with their targets' positions); on Qwen3-VL the contextual tokens get no
    deepstack level (they have no single source token), the kept ones get theirs.

    Deviations: scores, key similarities and the merge are computed in float32 (official: tower dtype), merged
    tokens are cast back before the projector; ties break to the first index (explicit). On LLaVA-1.5 it needs
    one image of patches per sample with the ``"default"`` feature strategy; others raise.
    """

    name = "visionzip"
    default_positions = "renumber"
    needs_vision = ("cls_attention_sum", "feature_keys", "cls_feature", "patch_features", "projected_features")

    def __init__(
        self,
        tokens: int | None = None,
        dominant: int | None = None,
        contextual: int | None = None,
        cls_token: bool | None = None,
        positions: Positions | None = None,
        budget_scope: str = "image",
    ) -> None:
        super().__init__(positions)
        if budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"{self.name}: budget_scope={budget_scope!r}; allowed: {BUDGET_SCOPES}")
        self.budget_scope = budget_scope
        if cls_token is not None and not isinstance(cls_token, bool):
            raise ValueError(f"{self.name}: cls_token={cls_token!r}; allowed: True (official) or False "
                             "(LightCompress), or None (True where the vision tower has a [CLS] token)")
        if tokens is not None and (dominant is not None or contextual is not None):
            raise ValueError(f"{self.name}: pass tokens or (dominant, contextual), not both")
        if (dominant is None) != (contextual is None):
            raise ValueError(f"{self.name}: pass dominant and contextual together (or tokens)")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{self.name}: tokens={tokens!r}; allowed: an integer >= 1 (and <= V)")
        if dominant is not None:
            low = 1 if cls_token is True else 0
            for label, value, least in (("dominant", dominant, low), ("contextual", contextual, 0)):
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ValueError(f"{self.name}: {label}={value!r}; allowed: an integer >= {least}")
            if dominant + contextual < 1:
                raise ValueError(f"{self.name}: dominant + contextual = 0; allowed: at least one token")
        self.tokens, self.dominant, self.contextual, self.cls_token = tokens, dominant, contextual, cls_token
        self._packed: bool | None = None  # ``bind_model``: whether the family packs crops (LLaVA-NeXT)
        self._tower_cls: bool = True  # ``bind_model``: whether the vision tower has a [CLS] token

    @property
    def sends_cls(self) -> bool:
        """Whether the [CLS] vector is sent: ``cls_token``, or (None) whether the tower has a [CLS] token."""
        return self._tower_cls if self.cls_token is None else self.cls_token

    def split(self, num_visual: int) -> tuple[int, int]:
        """``(dominant, contextual)`` for ``num_visual`` patches per sample, validated."""
        if self.dominant is not None:
            dominant, contextual = self.dominant, self.contextual
        else:
            tokens = self.tokens if self.tokens is not None else max(1, num_visual // 4)
            most = num_visual + int(self.sends_cls)
            if tokens > most:
                raise ValueError(
                    f"{self.name}: tokens={tokens} is not allowed; this model has {num_visual} visual tokens per "
                    f"sample, so tokens must be in 1..{most}"
                )
            dominant, contextual = split_budget(tokens)
        patches = dominant - int(self.sends_cls)
        if patches < 0:
            raise ValueError(f"{self.name}: dominant=0; allowed: an integer >= 1 (the [CLS] vector is sent as the "
                             "first dominant token), or cls_token=False")
        if patches > num_visual:
            raise ValueError(
                f"{self.name}: dominant={dominant} keeps {patches} patches; this model has {num_visual}, so "
                f"dominant must be at most {num_visual + int(self.sends_cls)}"
            )
        if contextual > num_visual - patches:
            raise ValueError(
                f"{self.name}: contextual={contextual} but only {num_visual - patches} patches are left after "
                f"the dominant ones; allowed: contextual in 0..{num_visual - patches}"
            )
        return dominant, contextual

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        if self._packed:  # NeXT: newline tokens kept on top, counts per crop: known (and checked) at selection
            return [Stage(layer=0, keep=None, insert=None)]
        dominant, contextual = self.split(num_visual)
        if self.sends_cls:  # [CLS] goes first: every token is inserted, in order
            stage = Stage(layer=0, keep=0, insert=dominant + contextual)
        else:
            stage = Stage(layer=0, keep=dominant, insert=contextual)
        return [stage]

    def _note_tower(self, model) -> None:
        """Notes whether ``model``'s vision tower has a [CLS] token (``cls_token=None`` follows it)."""
        from finepruner.models.adapters import adapter_for  # no import cycle

        try:
            adapter = adapter_for(model)
        except ValueError:  # not a registered family: the LLaVA-1.5 layout
            self._tower_cls = True
            return
        self._tower_cls = bool(adapter.has_cls(model.config))

    def required_vision(self, model) -> tuple[str, ...]:
        """With a [CLS] tower (or ``cls_token=True``): ``needs_vision``; on a tower without [CLS] (Qwen): the
        received attention of the last block, its keys and the language model's input rows (spec §8)."""
        self._note_tower(model)
        if self._tower_cls or self.sends_cls:
            return tuple(type(self).needs_vision)
        return NO_CLS_SIGNALS

    def bind_model(self, model) -> None:
        """Checks the feature strategy and notes whether the family packs crops (LLaVA-NeXT: the counts are
        then known at selection, newline tokens on top; the handle plans again after binding)."""
        from finepruner.models.adapters import adapter_for  # no import cycle

        self._note_tower(model)
        if self._tower_cls:
            require_default_features(self.name, model, "patch tokens only, the [CLS] row handled by the method")
        elif self.sends_cls:
            raise ValueError(f"{self.name}: cls_token=True but the vision tower has no [CLS] token; allowed there: "
                             "cls_token=False or None (LightCompress's port, no [CLS] vector)")
        self._packed = bool(adapter_for(model).packs_crops)
        self.needs_vision = type(self).needs_vision if self._tower_cls else NO_CLS_SIGNALS

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> Selection:
        if not self._tower_cls:
            return self._select_no_cls(ctx)
        vision = ctx.require_vision(self.name, *self.needs_vision, projector=True)
        if vision.newline_mask is not None:
            return self._select_packed(vision, ctx.visual_ids)
        ids = ctx.visual_ids
        batch, num_visual = ids.shape
        if vision.cls_feature.shape[1] != 1:
            raise ValueError(
                f"{self.name}: a sample has {vision.cls_feature.shape[1]} images; VisionZip selects per image "
                "from that image's [CLS] attention and needs one image per sample (LLaVA-1.5 layout)"
            )
        dominant, contextual = self.split(num_visual)
        device = ids.device
        scores = vision.cls_attention_sum.to(device).gather(1, ids)
        features = _gather(vision.patch_features.to(device), ids)
        keys = _gather(vision.feature_keys.to(device), ids)
        patches = dominant_patches(scores, dominant - int(self.sends_cls))
        parts: list[torch.Tensor] = []
        origins: list[torch.Tensor] = []
        if self.sends_cls:
            parts.append(vision.project(vision.cls_feature.to(device)))
            origins.append(torch.zeros(batch, 1, dtype=torch.long, device=device))
            parts.append(_gather(vision.projected_features.to(device), ids).gather(
                1, patches[..., None].expand(-1, -1, vision.projected_features.shape[-1])))
            origins.append(patches)
        if contextual:
            left = torch.ones(batch, num_visual, dtype=torch.bool, device=device)
            left.scatter_(1, patches, False)
            remaining = left.nonzero()[:, 1].view(batch, -1)
            merged, targets = contextual_tokens(features, keys, remaining, contextual)
            parts.append(vision.project(merged.to(features.dtype)))
            origins.append(targets)
        keep = torch.empty(batch, 0, dtype=torch.long, device=device) if self.sends_cls else patches
        if not parts:
            return Selection(keep=keep)
        return Selection(keep=keep, insert=torch.cat([p.to(device) for p in parts], dim=1),
                         insert_from=torch.cat(origins, dim=1))


    def _select_no_cls(self, ctx: StageContext) -> Selection:
        """A tower without [CLS] (LightCompress's Qwen port, spec §8): per image, the dominant merged tokens by
        received attention, the contextual tokens merged from the language model's input rows by key
        similarity; nothing is projected."""
        vision = ctx.require_vision(self.name, *NO_CLS_SIGNALS)
        ids = ctx.visual_ids
        batch, num_visual = ids.shape
        if vision.newline_mask is not None or vision.patches_per_image != num_visual:
            raise ValueError(f"{self.name}: without a [CLS] token VisionZip selects per image of merged tokens "
                             "(Qwen layout); this image's tokens are packed crops or several images")
        dominant, contextual = self.split(num_visual)
        device = ids.device
        scores = vision.cls_attention.to(device).gather(1, ids)
        values = _gather(vision.projected_features.to(device), ids)
        keep = dominant_patches(scores, dominant)
        if not contextual:
            return Selection(keep=keep)
        keys = _gather(vision.feature_keys.to(device), ids)
        left = torch.ones(batch, num_visual, dtype=torch.bool, device=device)
        left.scatter_(1, keep, False)
        remaining = left.nonzero()[:, 1].view(batch, -1)
        merged, targets = contextual_tokens(values, keys, remaining, contextual)
        return Selection(keep=keep, insert=merged.to(values.dtype), insert_from=targets)

    def _unit_split(self, members: int) -> tuple[int, int]:
        """``(patches, contextual)`` of one budget unit of ``members`` candidate patches: the image
        (``budget_scope="image"``, validated as on LLaVA-1.5) or one crop (``"crop"``: the split of ``tokens``
        per crop, capped where unpadding left the crop fewer patches: its patches are dominant first)."""
        if self.budget_scope == "image":
            dominant, contextual = self.split(members)
            return dominant - int(self.sends_cls), contextual
        if self.dominant is not None:
            dominant, contextual = self.dominant, self.contextual
        else:
            dominant, contextual = split_budget(self.tokens if self.tokens is not None else max(1, members // 4))
        patches = min(dominant - int(self.sends_cls), members)
        return patches, min(contextual, members - patches)

    def _select_packed(self, vision, ids: torch.Tensor) -> Selection:
        """LLaVA-NeXT: per image (or per crop), newline tokens kept and not counted; the dominant patches are
        kept in the image's token order, then each unit's [CLS] vector (the base crop's per image, every crop's
        per crop) and its contextual tokens (merged within the unit) are inserted after them."""
        from finepruner.engine.vision import image_candidates  # no import cycle

        device = ids.device
        batch = ids.shape[0]
        newline, crop = image_candidates(vision, ids)
        scores = vision.cls_attention_sum.to(device).gather(1, ids)
        features = _gather(vision.patch_features.to(device), ids)
        keys = _gather(vision.feature_keys.to(device), ids)
        cls_rows = vision.cls_feature.to(device)  # [B, crops, Dv]
        plans = []
        for b in range(batch):
            candidates = torch.nonzero(~newline[b])[:, 0]
            if self.budget_scope == "image":
                units = [(0, candidates)]
            else:
                units = [(c, candidates[crop[b, candidates] == c]) for c in torch.unique(crop[b, candidates]).tolist()]
            plans.append((candidates, [(c, members, *self._unit_split(members.numel())) for c, members in units]))
        lines = [int(newline[b].sum()) for b in range(batch)]
        kept_width = [lines[b] + sum(p for _, _, p, _ in units) for b, (_, units) in enumerate(plans)]
        inserted = [sum(int(self.sends_cls) + c for _, _, _, c in units) for _, units in plans]
        if self.budget_scope == "crop" and (len(set(kept_width)) > 1 or len(set(inserted)) > 1):
            raise ValueError(
                f"{self.name}: budget_scope='crop' keeps {sorted(set(kept_width))} and inserts {sorted(set(inserted))} "
                "tokens for images of the same token count in one batch (different crop layouts); batch them "
                "separately or use budget_scope='image'"
            )
        width = max(kept_width)
        keep_rows, insert_rows, origin_rows = [], [], []
        for b, (_, units) in enumerate(plans):
            kept = [torch.nonzero(newline[b])[:, 0]]
            heads, contexts, head_from, context_from = [], [], [], []
            extra = width - kept_width[b]  # image scope: fewer newline tokens than another unit of the group
            for unit, (c, members, patches, contextual) in enumerate(units):
                count = patches + (extra if unit == 0 else 0)
                top = members[dominant_patches(scores[b, members][None], count)[0]]
                kept.append(top)
                if self.sends_cls:
                    heads.append(cls_rows[b, c][None])
                    head_from.append(members[:1])
                if contextual:
                    left = members[~torch.isin(members, top)]
                    merged, targets = contextual_tokens(features[b:b + 1], keys[b:b + 1], left[None], contextual)
                    contexts.append(merged[0].to(features.dtype))
                    context_from.append(targets[0])
            keep_rows.append(torch.cat(kept).sort().values)
            insert_rows.append(heads + contexts)
            origin_rows.append(torch.cat(head_from + context_from) if head_from or context_from
                               else torch.empty(0, dtype=torch.long, device=device))
        keep = torch.stack(keep_rows)
        if not inserted[0]:
            return Selection(keep=keep)
        values = torch.stack([torch.cat(rows) for rows in insert_rows])  # [B, c, Dv]
        return Selection(keep=keep, insert=vision.project(values).to(device), insert_from=torch.stack(origin_rows))


def _gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(1, ids[..., None].expand(-1, -1, values.shape[-1]))
