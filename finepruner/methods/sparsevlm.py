"""``sparsevlm``: SparseVLM (Zhang et al., ICML'25) and SparseVLM+ (v2.0), spec ``methods.md`` §2, §7.1-7.5.

Text *raters* are picked once per prompt from the input embeddings; after each pruning layer ``l`` the
visual tokens are ranked by the rater-to-visual attention of layer ``l`` and the layer's *output* is
pruned (a stage at ``l + 1`` that scores with ``l``). v1.0/v1.5 recycle part of the pruned tokens into
a few merged tokens (``sparsevlm_recycling``); v2.0 corrects the attention for RoPE's distance bias,
averages 14 selected heads, does not merge and keeps the original position ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from finepruner.methods.base import (
    ModelShape,
    Positions,
    PruningMethod,
    Selection,
    Stage,
    StageContext,
    check_layer,
    text_after_visual,
    top_k_sorted,
)
from finepruner.methods.sparsevlm_recycling import cluster_and_merge, density_noise

VERSIONS: tuple[str, ...] = ("1.0", "1.5", "2.0")

#: Top-k sizes at the pruning layers [2, 6, 15] before recycling, per version and budget (§2.3, §7.4).
SCHEDULES: dict[str, dict[int, tuple[int, ...]]] = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}

#: v1.0 ``(scale, bias)`` of the rank rule ``k = int(rank * scale + bias)``, from the official scripts.
RANK_SETTINGS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}

#: Pruning layers (0-indexed; the output of these layers is pruned) per version.
DEFAULT_LAYERS: dict[str, tuple[int, ...]] = {"1.0": (2, 6, 15, 19), "1.5": (2, 6, 15), "2.0": (2, 6, 15)}

#: Fraction of the pruned tokens that are recycled, and candidates per merged token.
RECYCLE_FRACTION = 0.3
CANDIDATES_PER_CLUSTER = 10


def recycled_counts(pruned: int) -> tuple[int, int]:
    """``(candidates, merged tokens)`` for ``pruned`` pruned tokens: ``int(0.3 p) + 1`` and ``int(n / 10) + 1``."""
    candidates = int(pruned * RECYCLE_FRACTION) + 1
    return candidates, int(candidates / CANDIDATES_PER_CLUSTER) + 1


def visual_counts(keeps: Sequence[int], num_visual: int, merge: bool = True) -> list[tuple[int, int]]:
    """``(kept, merged)`` per pruning layer for a fixed schedule: ``k = min(k_l, v - 1)``, then
    ``v = k + c`` (§7.2)."""
    counts, current = [], num_visual
    for wanted in keeps:
        keep = min(wanted, current - 1)
        merged = recycled_counts(current - keep)[1] if merge else 0
        counts.append((keep, merged))
        current = keep + merged
    return counts


def average_visual_tokens(layers: Sequence[int], counts: Sequence[tuple[int, int]], num_layers: int,
                          num_visual: int, after: bool = False) -> float:
    """Layer-averaged visual-token count (merged tokens included), what SparseVLM's "N tokens" means (§0.3).

    ``after=False``: the count *entering* each decoder layer (``handle.stats.average_visual_tokens``);
    ``after=True``: the count after each layer, as the official "Equal Tokens" print (the pruning layer
    already counts its pruned output), lower by ``(num_visual - v_after_first) / num_layers``.
    """
    shift = 0 if after else 1
    bounds = [0, *(layer + shift for layer in layers), num_layers]
    values = [num_visual, *(keep + merged for keep, merged in counts)]
    return sum(v * (hi - lo) for v, lo, hi in zip(values, bounds[:-1], bounds[1:], strict=True)) / num_layers



#: SparseVLM's official pruning layers and v1.5 schedules are for LLaVA-1.5 (32 layers, 576 tokens).
SPARSEVLM_LAYERS = (2, 6, 15)

#: How far (relative) the 576-equivalent of a budget may lie from SparseVLM's nearest official budget
#: before ``sparsevlm_mapping`` refuses it instead of silently running that budget's schedule.
SPARSEVLM_BUDGET_TOLERANCE = 0.25


def sparsevlm_mapping(tokens: int, num_layers: int, num_visual: int) -> dict:
    """SparseVLM parameters for a model other than LLaVA-1.5: the pruning layers scaled to the depth and
    the official v1.5 schedule of the budget closest to ``tokens * 576 / V``, scaled by ``V / 576``
    (the realised layer average is what ``PruneStats.average_visual_tokens`` reports). A budget further
    than ``SPARSEVLM_BUDGET_TOLERANCE`` from every official one is a ValueError: snapping 4 and 8 of 144
    tokens to the 64-of-576 schedule would run one configuration under three labels."""
    layers: list[int] = []
    for layer in SPARSEVLM_LAYERS:
        value = min(num_layers - 2, max(round(layer * num_layers / 32), layers[-1] + 1 if layers else 0))
        layers.append(value)
    if len(set(layers)) != len(layers):
        raise ValueError(f"sparsevlm: {num_layers} decoder layers are too few for three pruning layers")
    equivalent = tokens * 576 / num_visual
    budget = min(SCHEDULES["1.5"], key=lambda n: abs(n - equivalent))
    if abs(equivalent - budget) > SPARSEVLM_BUDGET_TOLERANCE * budget:
        reachable = ", ".join(str(round(n * num_visual / 576)) for n in sorted(SCHEDULES["1.5"]))
        raise ValueError(
            f"sparsevlm: tokens={tokens} of {num_visual} visual tokens is {equivalent:g} of LLaVA-1.5's 576, "
            f"and SparseVLM has official schedules only for 64/96/128/192 of 576; allowed here: about "
            f"{reachable} tokens (within {SPARSEVLM_BUDGET_TOLERANCE:.0%}), or pass layers= and keeps= yourself"
        )
    keeps = [max(1, round(k * num_visual / 576)) for k in SCHEDULES["1.5"][budget]]
    return {"layers": layers, "keeps": keeps}


class SparseVLM(PruningMethod):
    """SparseVLM: text-rater-guided pruning inside the language model, with token recycling.

    What "N tokens" means: ``tokens=N`` names the official schedule whose *layer-averaged* visual-token
    count (merged tokens included) is about N on LLaVA-1.5 (32 layers, 576 tokens); it is not the count
    that survives to the last layer (``handle.stats.average_visual_tokens`` gives the realised average).

    Parameters:
        tokens: the budget N: 192 (default), 128, 96 or 64 (v1.0: 192, 128, 64). On families whose images
            have variable counts (Qwen, LLaVA-NeXT, OneVision) without ``layers``/``keeps``: any N, mapped
            onto each image's own count at its prefill (``sparsevlm_mapping``; ``bind_counts``).
        version: ``"1.5"`` (default, ICML: fixed schedule, recycling, renumbered positions),
            ``"2.0"`` (SparseVLM+: RoPE gravity correction, ``heads`` selected heads, no merging,
            original positions) or ``"1.0"`` (k from the matrix rank of the rater-to-visual attention).
        layers: pruning layers, 0-indexed; the output of each is pruned. Default [2, 6, 15]
            ([2, 6, 15, 19] for v1.0).
        keeps: top-k sizes at those layers instead of the schedule of ``tokens`` (v1.5/v2.0), e.g. for
            models other than LLaVA-1.5; each is capped at (current visual count - 1).
        scale, bias: v1.0's rule ``k = min(int(rank * scale + bias), v - 1)``; default from ``tokens``
            (192: 13.5, 0; 128: 9, 6; 64: 0.8, 0, the official scripts).
        merge: recycle pruned tokens into merged ones; default True for v1.0/v1.5, False for v2.0.
        heads: v2.0's number of selected heads (official: 14).
        seed: seeds the tie-break noise of the clustering, per sample and stage (never the global RNG).
        positions: default ``"renumber"`` for v1.0/v1.5 and ``"original"`` for v2.0, as the official code.

    Deviations: attention, rater scores and merging run in float32 (the official code in the model
    dtype); any batch size (raters, scores and v1.0 ranks per sample; padding masked); a sample whose
    raters are empty uses all its text tokens; v1.0 needs the same count for every sample of a batch.
    """

    name = "sparsevlm"
    default_positions = "renumber"

    def __init__(
        self,
        tokens: int = 192,
        version: str = "1.5",
        layers: Sequence[int] | None = None,
        keeps: Sequence[int] | None = None,
        scale: float | None = None,
        bias: float | None = None,
        merge: bool | None = None,
        heads: int = 14,
        seed: int = 0,
        positions: Positions | None = None,
    ) -> None:
        version = str(version)
        if version not in VERSIONS:
            raise ValueError(f"sparsevlm: version={version!r} is unknown; pass version='1.0', '1.5' or '2.0'")
        if positions is None and version == "2.0":
            positions = "original"
        super().__init__(positions)
        if version == "1.0":
            if keeps is not None:
                raise ValueError("sparsevlm: keeps= is for version '1.5'/'2.0'; version '1.0' uses scale= and bias=")
            if scale is None or bias is None:
                if tokens not in RANK_SETTINGS:
                    raise ValueError(
                        f"sparsevlm: version '1.0' has no scale/bias for tokens={tokens!r}; pass tokens="
                        f"{', '.join(map(str, RANK_SETTINGS))}, or scale= and bias="
                    )
                default_scale, default_bias = RANK_SETTINGS[tokens]
                scale = default_scale if scale is None else scale
                bias = default_bias if bias is None else bias
        else:
            if scale is not None or bias is not None:
                raise ValueError(f"sparsevlm: scale=/bias= are for version '1.0', not {version!r}")
            if keeps is not None and not all(isinstance(k, int) and k >= 1 for k in keeps):
                raise ValueError(f"sparsevlm: keeps={list(keeps)}; each must be an integer >= 1")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"sparsevlm: heads={heads!r}; pass a positive integer (official: 14)")
        self.tokens, self.version, self.seed, self.heads = tokens, version, seed, heads
        self.layers = list(layers) if layers is not None else list(DEFAULT_LAYERS[version])
        self.keeps = list(keeps) if keeps is not None else None
        self.scale, self.bias = scale, bias
        self.merge = (version != "2.0") if merge is None else bool(merge)
        self._explicit_schedule = layers is not None or keeps is not None
        self._per_image = False  # set by bind_counts: tokens=N mapped onto each image's count

    # -- plan -----------------------------------------------------------------------------------
    def schedule(self) -> list[int] | None:
        """Top-k sizes per pruning layer (None for v1.0, whose counts depend on the prompt)."""
        if self.version == "1.0":
            return None
        if self.keeps is None and self.tokens not in SCHEDULES[self.version]:
            raise ValueError(
                f"sparsevlm: no version {self.version!r} schedule for tokens={self.tokens!r}; pass tokens="
                f"{', '.join(map(str, SCHEDULES[self.version]))}, or keeps=[k1, k2, ...] (one per layer); on "
                "families with variable counts (Qwen, LLaVA-NeXT, OneVision) tokens=N is mapped onto each image"
            )
        return list(self.keeps) if self.keeps is not None else list(SCHEDULES[self.version][self.tokens])

    def bind_counts(self, variable: bool) -> None:
        """On families with variable counts (``apply`` on Qwen, LLaVA-NeXT, OneVision), ``tokens=N`` without
        ``layers``/``keeps`` (v1.5/v2.0) is ``sparsevlm_mapping`` onto each image's own count at its prefill
        (the v1.5 schedule of the nearest official budget, scaled); with a fixed count (LLaVA-1.5) the
        official schedule of N as given."""
        self._per_image = variable and not getattr(self, "_explicit_schedule", True) and self.version != "1.0"

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        if getattr(self, "_per_image", False):
            mapped = sparsevlm_mapping(self.tokens, num_layers, num_visual)
            layers, keeps = mapped["layers"], mapped["keeps"]
        else:
            layers, keeps = self.layers, self.schedule()
        for layer in layers:
            check_layer(self.name, "layers[i]", layer, 0, num_layers - 2)
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"sparsevlm: layers={layers} must be strictly increasing")
        if keeps is None:
            return [Stage(layer=l + 1, keep=None, score_layer=l, last_query=False, insert=None) for l in layers]
        if len(keeps) != len(layers):
            raise ValueError(
                f"sparsevlm: {len(layers)} pruning layers {layers} but {len(keeps)} top-k sizes {keeps}; "
                "give one per layer (keeps=) or matching layers="
            )
        counts = visual_counts(keeps, num_visual, self.merge)
        return [
            Stage(layer=l + 1, keep=keep, score_layer=l, last_query=False, insert=merged)
            for l, (keep, merged) in zip(layers, counts, strict=True)
        ]

    def check_model(self, num_heads: int, num_layers: int, num_visual: int) -> None:
        if self.version == "2.0" and self.heads > num_heads:
            raise ValueError(
                f"sparsevlm: version '2.0' selects heads={self.heads} heads but the model has {num_heads}; "
                f"pass heads=1..{num_heads}"
            )

    # -- selection ------------------------------------------------------------------------------
    def raters(self, ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rater positions [B, R] in the prefill input, valid [B, R])``, once per prompt (§2.2 step 1);
        rows with fewer raters are padded (``valid`` False).

        Text = every real token after the last visual token (of the selection's image; other images' visual
        tokens are not text, ``spec/models.md`` §5.2); weight of a text token = mean over visual
        tokens of softmax over text of the raw dot products of the input embeddings; raters = weight
        above the sample's mean weight.
        """
        signals = ctx.signals
        if "sparsevlm_raters" in signals.memo:
            return signals.memo["sparsevlm_raters"]
        embeds, visual = signals.inputs_embeds, signals.input_visual_index
        text, valid = text_after_visual(ctx)
        width = embeds.shape[-1]
        vis = embeds.gather(1, visual[..., None].expand(-1, -1, width)).float()
        txt = embeds.gather(1, text[..., None].expand(-1, -1, width)).float()
        relation = (vis @ txt.transpose(1, 2)).masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
        weight = relation.mean(dim=1)  # [B, T]
        mean = (weight * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        raters = valid & (weight > mean)
        raters = torch.where(raters.any(dim=1, keepdim=True), raters, valid)  # no rater: all text tokens
        order = (~raters).to(torch.int8).argsort(dim=1, stable=True)[:, : int(raters.sum(dim=1).max())]
        result = (text.gather(1, order), raters.gather(1, order))
        signals.memo["sparsevlm_raters"] = result
        return result

    def rater_attention(self, ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [B, heads, R, V], valid [B, R])``: attention of the raters to the current visual tokens at
        the score layer (v2.0: divided by the RoPE logit of all-ones vectors)."""
        signals = ctx.signals
        text, raters = self.raters(ctx)
        query = signals.current_index(text).clamp(min=0)  # text tokens are never pruned
        rows = signals.query_attention(query)  # [B, H, R, L]
        visual = signals.visual_index
        heads = rows.shape[1]
        attention = rows.gather(3, visual[:, None, None, :].expand(-1, heads, query.shape[1], -1))
        if self.version == "2.0":
            cos, sin = signals.position_embeddings

            def at(table, index):
                return table.float().gather(1, index[..., None].expand(-1, -1, table.shape[-1]))

            rope = (at(cos, query) @ at(cos, visual).transpose(1, 2) + at(sin, query) @ at(sin, visual).transpose(1, 2))
            attention = attention / (rope / cos.shape[-1] ** 0.5)[:, None]
        return attention, raters

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor | Selection:
        attention, raters = self.rater_attention(ctx)
        weights = raters.to(attention.dtype)
        if self.version == "2.0":
            if self.heads > attention.shape[1]:
                raise ValueError(f"sparsevlm: heads={self.heads} but the model has {attention.shape[1]} heads")
            per_head = (attention * weights[:, None, :, None]).sum(dim=(2, 3))  # [B, H]
            chosen = per_head.topk(self.heads, dim=-1).indices
            ctx.heads = list(chosen.sort(dim=-1).values)
            index = chosen[:, :, None, None].expand(-1, -1, attention.shape[2], attention.shape[3])
            attention = attention.gather(1, index)
        relation = attention.mean(dim=1)  # [B, R, V]
        scores = (relation * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)  # [B, V]
        current = scores.shape[1]
        keep = stage.keep if stage.keep is not None else self.rank_keep(relation, raters, current)
        local = top_k_sorted(scores, keep)
        if not self.merge or keep >= current:
            return local
        return self.recycle(stage_index, ctx, scores, local)

    def rank_keep(self, relation: torch.Tensor, raters: torch.Tensor, current: int) -> int:
        """v1.0's count: ``min(int(rank * scale + bias), v - 1)``, or all ``v`` when rank == v (§7.3)."""
        counts = []
        for row in range(relation.shape[0]):
            rank = int(torch.linalg.matrix_rank(relation[row][raters[row]].float()))
            counts.append(current if rank == current else max(0, min(int(rank * self.scale + self.bias), current - 1)))
        if len(set(counts)) > 1:
            raise ValueError(
                f"sparsevlm: version '1.0' chose different counts {counts} for the samples of one batch; "
                "run them one at a time (batch size 1) or use version='1.5'"
            )
        return counts[0]

    def recycle(self, stage_index: int, ctx: StageContext, scores: torch.Tensor, local: torch.Tensor) -> Selection:
        """Merge the best-scored pruned tokens (§2.2 step 4): the top ``int(0.3 p) + 1`` by score, in
        decreasing order, clustered into ``int(n / 10) + 1`` merged tokens."""
        signals = ctx.signals
        batch, current = scores.shape
        pruned_mask = torch.ones_like(scores, dtype=torch.bool).scatter_(1, local, False)
        pruned = pruned_mask.nonzero()[:, 1].view(batch, -1)  # position order
        candidates, clusters = recycled_counts(pruned.shape[1])
        order = scores.gather(1, pruned).topk(candidates, dim=-1).indices
        chosen = pruned.gather(1, order)  # [B, n] indices into the current visual tokens
        positions = signals.visual_index.gather(1, chosen)
        hidden = signals.hidden
        tokens = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        noise = torch.stack([density_noise(self.seed, key, stage_index, candidates) for key in ctx.row_keys])
        merged, centres, _ = cluster_and_merge(tokens, clusters, noise)
        return Selection(keep=local, insert=merged.to(hidden.dtype), insert_from=chosen.gather(1, centres))

    @classmethod
    def defaults_for(cls, shape: ModelShape, params: Mapping) -> dict:
        """On a model other than LLaVA-1.5 (32 layers, 576 visual tokens), a budget ``tokens=N`` without
        ``layers``/``keeps`` (and not version 1.0) becomes ``sparsevlm_mapping``'s ``layers`` and ``keeps``;
        otherwise (and on a ``shape.variable`` family, where ``apply`` maps it per image) ``params``
        unchanged. A budget no official schedule maps to raises ``ValueError``."""
        completed = super().defaults_for(shape, params)
        if getattr(shape, "variable", False):  # images of their own counts: mapped per image (bind_counts)
            return completed
        if ((shape.num_layers, shape.num_visual) != (32, 576) and "tokens" in completed
                and "keeps" not in completed and "layers" not in completed
                and str(completed.get("version", "1.5")) != "1.0"):
            completed.update(sparsevlm_mapping(completed.pop("tokens"), shape.num_layers, shape.num_visual))
        return completed
