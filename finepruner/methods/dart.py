"""``dart``: DART (Wen et al., EMNLP'25), duplication-aware pruning inside the LLM, spec ``methods_more.md`` §2.

At the input of layer ``K`` (default 2), pick pivot tokens by the L1 norm of layer ``K-1``'s keys (after
RoPE, heads concatenated): the ``pivot_image_tokens`` image tokens and the ``pivot_text_tokens`` tokens
after the image with the largest norms. For each pivot in turn, keep the ``t`` remaining image tokens
least similar to it (cosine of layer ``K-1``'s output passed through the model's final norm). The image
pivots are kept too; text is always kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from finepruner.methods.base import Positions, PruningMethod, Stage, StageContext, check_layer

if TYPE_CHECKING:
    from finepruner.engine.signals import StageSignals

PivotOrder = Literal["ascending", "set"]
PIVOT_ORDERS: tuple[str, ...] = ("ascending", "set")
#: The official command-line default ``max_num_trunction``.
DEFAULT_TOKENS = 128


def score_layer_keys(signals: StageSignals) -> torch.Tensor:
    """[B, L, kv_heads * head_dim] float32 keys of the stage's ``score_layer`` after RoPE, heads
    concatenated, for the current tokens (``StageSignals.rotated_keys``: the KV-cache entry when the
    prefill has a cache, otherwise the captured or recomputed ``k_proj`` output rotated)."""
    rotated = signals.rotated_keys()
    batch, heads, length, head_dim = rotated.shape
    return rotated.transpose(1, 2).reshape(batch, length, heads * head_dim)


def pick_counts(tokens: int, pivots: int, image_pivots: int, count_pivots_in_budget: bool) -> list[int]:
    """Tokens each pivot keeps, in pivot order. Official: ``t = tokens // pivots`` for every pivot (so
    ``image_pivots + pivots * t`` image tokens are kept: N+4 at the defaults). With
    ``count_pivots_in_budget``: ``tokens - image_pivots`` picks spread as evenly as possible, the first
    pivots taking one more (exactly ``tokens`` kept)."""
    if not count_pivots_in_budget:
        return [tokens // pivots] * pivots
    share, extra = divmod(tokens - image_pivots, pivots)
    return [share + (1 if p < extra else 0) for p in range(pivots)]


def dart_select(
    keys: torch.Tensor,
    hidden: torch.Tensor,
    visual_index: torch.Tensor,
    text_valid: torch.Tensor,
    image_pivots: int,
    text_pivots: int,
    counts: list[int],
    pivot_order: PivotOrder = "ascending",
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """DART's kept image tokens, vectorised over the batch.

    Args:
        keys: [B, L, W] post-RoPE keys of layer K-1 (heads concatenated).
        hidden: [B, L, D] layer K-1's output through the final norm.
        visual_index: [B, V] sequence positions of the image tokens.
        text_valid: [B, L] True for the text-pivot candidates (real tokens after the image).
        image_pivots, text_pivots: pivot counts.
        counts: tokens each pivot keeps (``pick_counts``), in pivot order.
        pivot_order: ``"ascending"``: pivots visited in ascending sequence order; ``"set"``: in CPython's
            iteration order of the set of their ``position_ids`` (built in choice order: image pivots by
            decreasing norm, then text pivots), the official code's order at batch 1.
        position_ids: [B, L] position ids (needed for ``"set"``).

    Returns:
        [B, k] sorted indices into the visual tokens: the image pivots and every pivot's picks.

    Pivots: the largest L1 norms, first index on ties (stable sort). Picks: per pivot, the remaining
    image tokens (pivots and earlier picks removed) with the lowest cosine similarity, first index on ties.
    """
    batch, num_visual = visual_index.shape
    norms = keys.abs().sum(dim=-1)  # [B, L]
    image_norms = norms.gather(1, visual_index)
    image_choice = image_norms.argsort(dim=-1, descending=True, stable=True)[:, :image_pivots]  # local ids
    text_norms = norms.masked_fill(~text_valid, -torch.inf)
    text_choice = text_norms.argsort(dim=-1, descending=True, stable=True)[:, :text_pivots]  # seq positions
    pivots = torch.cat([visual_index.gather(1, image_choice), text_choice], dim=1)  # [B, P], choice order
    if pivot_order == "ascending":
        pivots = pivots.sort(dim=-1).values
    else:
        order_keys = position_ids.gather(1, pivots).tolist()
        rows = []
        for row in range(batch):
            by_key = dict(zip(order_keys[row], pivots[row].tolist(), strict=True))
            rows.append([by_key[key] for key in set(order_keys[row])])  # CPython set iteration, as official
        pivots = torch.tensor(rows, dtype=torch.long, device=pivots.device)
    normed = hidden.float()
    normed = normed / normed.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    width = normed.shape[-1]
    pivot_vectors = normed.gather(1, pivots[..., None].expand(-1, -1, width))
    image_vectors = normed.gather(1, visual_index[..., None].expand(-1, -1, width))
    similarity = pivot_vectors @ image_vectors.transpose(1, 2)  # [B, P, V]
    pool = torch.ones(batch, num_visual, dtype=torch.bool, device=keys.device)
    pool.scatter_(1, image_choice, False)
    for step, count in enumerate(counts):
        if count == 0:
            continue
        candidates = similarity[:, step].masked_fill(~pool, torch.inf)
        picks = candidates.argsort(dim=-1, stable=True)[:, :count]
        pool.scatter_(1, picks, False)
    kept = ~pool
    return kept.nonzero()[:, 1].view(batch, -1)


class DART(PruningMethod):
    """DART: keep, per pivot token, the image tokens least similar to it, at the input of layer ``K``.

    What "N tokens" means: ``tokens=N`` is the official ``max_num_trunction`` M. Every pivot keeps
    ``t = M // (pivot_image_tokens + pivot_text_tokens)`` image tokens and the image pivots are kept as
    well, so ``pivot_image_tokens + 8·(M // 8)`` image tokens (N+4 at the defaults: 196 / 132 / 68 for
    N = 192 / 128 / 64) enter layers ``K..``; layers ``0..K-1`` see all of them.
    ``count_pivots_in_budget=True`` keeps exactly N instead.

    Parameters:
        tokens: M (default 128, the official command-line default).
        K: prune the input of layer K (default 2); pivots and similarities come from layer K-1 (1..T-1).
        pivot_image_tokens: image pivots (default 4; they are kept).
        pivot_text_tokens: pivots among the tokens after the image (default 4; text is always kept).
        count_pivots_in_budget: False (default, official: N+4 tokens kept); True: the image pivots count
            in the budget and ``N - pivot_image_tokens`` picks are spread over the pivots (the first
            ``(N - 4) % 8`` pivots take one more), so exactly N are kept.
        pivot_order: ``"ascending"`` (default): pivots visited in ascending sequence order (spec pitfall 2);
            ``"set"``: CPython's iteration order of the set of pivot positions, what the official code does
            (positions = the position ids, i.e. the official batch-1 indices).
        positions: ``"original"`` (default, as the official code: kept tokens keep their position ids,
            with gaps) or ``"renumber"``.

    Signals: layer K-1's keys after RoPE from the prefill's KV cache (or its ``k_proj`` output rotated
    here when there is no cache) and layer K-1's output (``StageSignals``); no attention weights, so any
    attention implementation works.

    Deviations: pivot order (above); ties broken by the first index (the official ``topk`` leaves them
    unspecified); similarities and norms in float32; any batch size (the official code asserts batch 1);
    a sample whose text after the image is shorter than ``pivot_text_tokens`` raises (the official
    ``topk`` does too).
    """

    name = "dart"
    default_positions = "original"

    def __init__(
        self,
        tokens: int = DEFAULT_TOKENS,
        K: int = 2,
        pivot_image_tokens: int = 4,
        pivot_text_tokens: int = 4,
        count_pivots_in_budget: bool = False,
        pivot_order: PivotOrder = "ascending",
        positions: Positions | None = None,
    ) -> None:
        super().__init__(positions)
        for label, value, low in (("tokens", tokens, 1), ("pivot_image_tokens", pivot_image_tokens, 0),
                                  ("pivot_text_tokens", pivot_text_tokens, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.name}: {label}={value!r}; allowed: an integer >= {low}")
        if pivot_image_tokens + pivot_text_tokens < 1:
            raise ValueError(f"{self.name}: pivot_image_tokens + pivot_text_tokens must be >= 1; got 0")
        if pivot_order not in PIVOT_ORDERS:
            raise ValueError(f"{self.name}: pivot_order={pivot_order!r}; allowed: {PIVOT_ORDERS}")
        if not isinstance(count_pivots_in_budget, bool):
            raise ValueError(f"{self.name}: count_pivots_in_budget={count_pivots_in_budget!r}; allowed: True, False")
        if count_pivots_in_budget and tokens < pivot_image_tokens:
            raise ValueError(
                f"{self.name}: tokens={tokens} with count_pivots_in_budget=True must be >= pivot_image_tokens "
                f"({pivot_image_tokens})"
            )
        self.tokens, self.K = tokens, K
        self.pivot_image_tokens, self.pivot_text_tokens = pivot_image_tokens, pivot_text_tokens
        self.count_pivots_in_budget, self.pivot_order = count_pivots_in_budget, pivot_order

    @property
    def num_pivots(self) -> int:
        return self.pivot_image_tokens + self.pivot_text_tokens

    def counts(self) -> list[int]:
        """Tokens kept per pivot, in pivot order."""
        return pick_counts(self.tokens, self.num_pivots, self.pivot_image_tokens, self.count_pivots_in_budget)

    def keep_count(self, num_visual: int) -> int:
        """Image tokens kept from layer K on, validated against ``num_visual``."""
        keep = self.pivot_image_tokens + sum(self.counts())
        if keep > num_visual:
            if self.count_pivots_in_budget:
                allowed = f"{self.pivot_image_tokens}..{num_visual}"
            else:
                top = self.num_pivots * ((num_visual - self.pivot_image_tokens) // self.num_pivots)
                allowed = f"1..{top + self.num_pivots - 1}" if top >= 0 else "none (too many pivots)"
            raise ValueError(
                f"{self.name}: tokens={self.tokens} keeps {keep} image tokens but this model has {num_visual} "
                f"visual tokens per sample; allowed tokens: {allowed}"
            )
        if keep < 1:
            raise ValueError(
                f"{self.name}: tokens={self.tokens} keeps no image token; allowed: tokens >= {self.num_pivots} "
                "or pivot_image_tokens >= 1"
            )
        return keep

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        check_layer(self.name, "K", self.K, 1, num_layers - 1)
        keep = self.keep_count(num_visual)
        return [Stage(layer=self.K, keep=keep, score_layer=self.K - 1, last_query=False)]

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        signals = ctx.signals
        visual = signals.visual_index
        length = signals.hidden.shape[1]
        after = torch.arange(length, device=visual.device)[None] > visual[:, -1:]
        if signals.mask2d is not None:
            after = after & signals.mask2d.bool()
        available = after.sum(dim=1)
        if bool((available < self.pivot_text_tokens).any()):
            raise ValueError(
                f"{self.name}: pivot_text_tokens={self.pivot_text_tokens} but a prompt has only "
                f"{int(available.min())} tokens after its image; pass a smaller pivot_text_tokens"
            )
        keys = score_layer_keys(signals)
        hidden = signals.final_norm(signals.hidden)
        return dart_select(keys, hidden, visual, after, self.pivot_image_tokens, self.pivot_text_tokens,
                           self.counts(), self.pivot_order, signals.position_ids)
