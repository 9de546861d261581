"""``visionzip``: VisionZip (Yang et al., CVPR'25, training-free mode), spec ``methods_more.md`` §1.

Before the language model, in the CLIP layer LLaVA reads its features from (``vision_feature_layer``, -2):
"dominant" tokens are the patches with the largest [CLS]-query attention summed over heads, and the [CLS]
vector itself is sent as one of them (official); the remaining patches are merged into "contextual" tokens:
targets taken at a regular stride of the remaining list, every other remaining patch joins the target whose
head-mean key is most similar (cosine), and a contextual token is ``H[t] + mean(H[members])``. The LLM gets
[CLS], the dominant patches (index order), then the contextual tokens, with contiguous positions.
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
            (LightCompress, spec §8): ``dominant`` patches, no [CLS].
        positions: ``"renumber"`` (default, official: contiguous positions) or ``"original"`` (dominant
            patches keep theirs, a contextual token takes its target's, [CLS] the first visual token's).

    Signals (``finepruner.engine.vision``): the feature layer's [CLS]-row attention summed over heads and its
    head-mean keys (one hook on that layer's self-attention), its output's [CLS] vector, the patch features
    and the projector outputs. The [CLS] and contextual tokens go through the model's projector.

    Deviations: scores, key similarities and the merge are computed in float32 (official: tower dtype), merged
    tokens are cast back before the projector; ties break to the first index (explicit). Needs one image of
    patches per sample with the ``"default"`` feature strategy (LLaVA-1.5 layout); others raise.
    """

    name = "visionzip"
    default_positions = "renumber"
    needs_vision = ("cls_attention_sum", "feature_keys", "cls_feature", "patch_features", "projected_features")

    def __init__(
        self,
        tokens: int | None = None,
        dominant: int | None = None,
        contextual: int | None = None,
        cls_token: bool = True,
        positions: Positions | None = None,
    ) -> None:
        super().__init__(positions)
        if not isinstance(cls_token, bool):
            raise ValueError(f"{self.name}: cls_token={cls_token!r}; allowed: True (official) or False (LightCompress)")
        if tokens is not None and (dominant is not None or contextual is not None):
            raise ValueError(f"{self.name}: pass tokens or (dominant, contextual), not both")
        if (dominant is None) != (contextual is None):
            raise ValueError(f"{self.name}: pass dominant and contextual together (or tokens)")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{self.name}: tokens={tokens!r}; allowed: an integer >= 1 (and <= V)")
        if dominant is not None:
            low = 1 if cls_token else 0
            for label, value, least in (("dominant", dominant, low), ("contextual", contextual, 0)):
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ValueError(f"{self.name}: {label}={value!r}; allowed: an integer >= {least}")
            if dominant + contextual < 1:
                raise ValueError(f"{self.name}: dominant + contextual = 0; allowed: at least one token")
        self.tokens, self.dominant, self.contextual, self.cls_token = tokens, dominant, contextual, cls_token

    def split(self, num_visual: int) -> tuple[int, int]:
        """``(dominant, contextual)`` for ``num_visual`` patches per sample, validated."""
        if self.dominant is not None:
            dominant, contextual = self.dominant, self.contextual
        else:
            tokens = self.tokens if self.tokens is not None else max(1, num_visual // 4)
            most = num_visual + int(self.cls_token)
            if tokens > most:
                raise ValueError(
                    f"{self.name}: tokens={tokens} is not allowed; this model has {num_visual} visual tokens per "
                    f"sample, so tokens must be in 1..{most}"
                )
            dominant, contextual = split_budget(tokens)
        patches = dominant - int(self.cls_token)
        if patches > num_visual:
            raise ValueError(
                f"{self.name}: dominant={dominant} keeps {patches} patches; this model has {num_visual}, so "
                f"dominant must be at most {num_visual + int(self.cls_token)}"
            )
        if contextual > num_visual - patches:
            raise ValueError(
                f"{self.name}: contextual={contextual} but only {num_visual - patches} patches are left after "
                f"the dominant ones; allowed: contextual in 0..{num_visual - patches}"
            )
        return dominant, contextual

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        dominant, contextual = self.split(num_visual)
        if self.cls_token:  # [CLS] goes first: every token is inserted, in order
            return [Stage(layer=0, keep=0, insert=dominant + contextual)]
        return [Stage(layer=0, keep=dominant, insert=contextual)]

    def bind_model(self, model) -> None:
        require_default_features(self.name, model, "patch tokens only, the [CLS] row handled by the method")

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> Selection:
        vision = ctx.require_vision(self.name, *self.needs_vision, projector=True)
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
        patches = dominant_patches(scores, dominant - int(self.cls_token))
        parts: list[torch.Tensor] = []
        origins: list[torch.Tensor] = []
        if self.cls_token:
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
        keep = torch.empty(batch, 0, dtype=torch.long, device=device) if self.cls_token else patches
        if not parts:
            return Selection(keep=keep)
        return Selection(keep=keep, insert=torch.cat([p.to(device) for p in parts], dim=1),
                         insert_from=torch.cat(origins, dim=1))


def _gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(1, ids[..., None].expand(-1, -1, values.shape[-1]))
