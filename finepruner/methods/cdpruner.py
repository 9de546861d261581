"""``cdpruner``: CDPruner (Zhang et al., NeurIPS'25), spec ``methods.md`` §5 and §7.9.

Before the language model, keep the visual tokens chosen by greedy MAP inference of a determinantal
point process whose kernel ``L = diag(r) S diag(r)`` combines the cosine similarity S of the projected
visual tokens (diversity) with the CLIP relevance r of each token to the instruction text.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from finepruner.methods.base import Positions, PruningMethod, Stage, StageContext, check_tokens
from finepruner.methods.divprune import symmetric_gram
from finepruner.methods.dpp_blocked import dpp_greedy_blocked
from finepruner.models.clip_text import ClipText, as_clip_text, load_clip_text
from finepruner.models.instructions import (  # noqa: F401  (re-exported: the instruction text lived here)
    ANSWER_SUFFIXES,
    ASSISTANT_MARKER,
    as_tokenizer,
    instruction_from_prompt,
)

Normalize = Literal["sample", "batch"]
#: ``relevance`` rules: the CLIP text tower (official, CLIP vision towers) or the language model's input
#: embeddings of the instruction (``spec/models.md`` §5.2, towers without a matching text tower).
RELEVANCE_RULES: tuple[str, ...] = ("auto", "clip", "llm")
#: ``budget_scope`` values: ``tokens`` per image (all its crops), or per crop (official LLaVA-NeXT rule).
BUDGET_SCOPES: tuple[str, ...] = ("image", "crop")
#: The sub-folder of a model checkpoint that may hold its own CLIP text tower (the toy model ships one);
#: used when neither ``clip_model`` nor ``clip_text`` is given.
SHIPPED_CLIP_SUBDIR = "clip_text"
_MISSING_CLIP = (
    "cdpruner needs CLIP's text tower: pass clip_model=PATH, the directory of a local CLIP checkpoint (for "
    "LLaVA-1.5 a copy of openai/clip-vit-large-patch14-336), or clip_text=(text_model, tokenizer, "
    "visual_projection)"
)


def dpp_greedy(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al., 2018), batched.

    Args:
        kernel: [B, N, N] positive semi-definite kernels (float32).
        count: picks per sample (1..N).

    Returns:
        [B, count] sorted indices. Each step picks the candidate with the largest remaining marginal gain
        ``d²`` (first index on ties, as ``argmax``), exactly as the official loop. Deviation, only once
        the kernel's rank is exhausted (the largest remaining ``d²`` is not positive, where the official
        code divides by ``sqrt`` of a non-positive number and returns NaN-driven duplicates, i.e. fewer
        tokens): the pick contributes a zero vector, so later picks follow the remaining ``d²`` and the
        result still holds ``count`` distinct tokens.
    """
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    if kernel.shape[0] == 1:
        chosen = _greedy_single(gains[0], kernel[0], None, count)
    else:
        chosen = _greedy(gains, _row_reader(kernel), count)
    return chosen if chosen is not None else dpp_greedy_plain(kernel, count)


def dpp_select(similarity: torch.Tensor, relevance: torch.Tensor, count: int) -> torch.Tensor:
    """``dpp_greedy(diag(r) S diag(r), count)`` without building the kernel: the greedy reads only its
    diagonal and the ``count`` rows it picks, so those are formed on demand with the same products
    (``L_ij = (r_i S_ij) r_j``, bit for bit the entries of ``similarity_kernel``'s ``L``) instead of two
    elementwise passes over the N x N matrix. Same picks as ``dpp_greedy(similarity_kernel(...))``."""
    diagonal = torch.diagonal(similarity, dim1=1, dim2=2)
    gains = relevance * diagonal * relevance
    if similarity.shape[0] == 1:
        chosen = _greedy_single(gains[0], similarity[0], relevance[0], count)
    else:
        similarity_row = _row_reader(similarity)

        def kernel_row(j: torch.Tensor) -> torch.Tensor:
            return relevance.gather(1, j[:, None]) * similarity_row(j) * relevance

        chosen = _greedy(gains, kernel_row, count)
    if chosen is None:
        return dpp_greedy_plain(relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1), count)
    return chosen


def _row_reader(matrix: torch.Tensor):
    """``j [B] -> matrix[b, j_b] [B, N]``: one 1-D ``index_select`` of a contiguous matrix's rows."""
    batch, size, _ = matrix.shape
    if not matrix.is_contiguous():
        rows = torch.arange(batch, device=matrix.device)
        return lambda j: matrix[rows, j]
    flat = matrix.view(batch * size, size)
    offset = torch.arange(batch, device=matrix.device) * size
    return lambda j: flat.index_select(0, j + offset)


def _greedy(gains: torch.Tensor, kernel_row, count: int) -> torch.Tensor | None:
    """The loop of ``dpp_greedy_plain`` with the kernel read by rows (``kernel_row(j)``: [B, N] rows ``j``
    [B]) and picked candidates held at ``-inf`` in ``gains`` instead of masking every step; the same
    arithmetic on the same shapes, hence the same picks. None when a value is not finite (NaN or inf in
    the kernel, or an overflowing update), where the plain loop's NaN rules decide instead."""
    batch, size = gains.shape
    if not bool(torch.isfinite(gains).all()):
        return None
    vectors = gains.new_empty(batch, count, size)  # c_i of the Cholesky-style update, [B, T, N]
    chosen = gains.new_empty(batch, count, dtype=torch.long)
    tiny = torch.finfo(gains.dtype).tiny
    for step in range(count):
        j = gains.argmax(dim=-1)
        chosen[:, step] = j
        gain = gains.gather(1, j[:, None]).squeeze(1)
        row = kernel_row(j)
        if step:
            past = vectors[:, :step]  # [B, step, N]
            coefficients = past.gather(2, j[:, None, None].expand(-1, step, 1)).view(batch, 1, step)
            row = row - (coefficients @ past).squeeze(1)
        e = row / gain.clamp_min(tiny).sqrt().unsqueeze(-1)
        positive = gain > 0
        if not bool(positive.all()):
            e = torch.where(positive.unsqueeze(-1), e, torch.zeros_like(e))
        vectors[:, step] = e
        gains = gains - e.square()
        gains.scatter_(1, j[:, None], -math.inf)
    if not bool(torch.isfinite(vectors.sum())) and not bool(torch.isfinite(vectors).all()):
        return None  # a NaN update (the sum alone may also overflow on finite values)
    return chosen.sort(dim=-1).values


def _greedy_single(gains: torch.Tensor, matrix: torch.Tensor, weights: torch.Tensor | None,
                   count: int) -> torch.Tensor | None:
    """``_greedy`` for one sample: ``gains`` [N], kernel rows ``matrix[j]`` [N] of ``matrix`` [N, N]
    (``weights[j] * S[j] * weights`` with ``weights``: ``dpp_select``'s ``L = diag(r) S diag(r)``).

    The pick is read back as an int, so that the kernel row, the pick's coefficients and its held gain are
    views instead of gathers, and ``e`` is written straight into its row of the update vectors. The same
    arithmetic on the same values (the same ``[1, 1, t] x [1, t, N]`` matmul, division, squares and
    subtraction), the same first index on ties, hence the same picks as ``_greedy``; [1, count] sorted
    indices, or None as ``_greedy``. (Dropping the picked candidates' columns from the matmul would read a
    fifth less at T = N/3, but a narrower matmul is not always rounded the same, and it saved under 5 %.)"""
    (size,) = gains.shape
    if not bool(torch.isfinite(gains).all()):
        return None
    gains = gains.clone()
    vectors = gains.new_empty(count, size)  # c_i of the Cholesky-style update, [T, N]
    chosen: list[int] = []
    tiny = torch.finfo(gains.dtype).tiny
    for step in range(count):
        gain, index = gains.max(dim=0)  # the first index of the largest gain, as ``argmax``
        j = int(index)
        chosen.append(j)
        row = matrix[j] if weights is None else weights[j] * matrix[j] * weights
        if step:
            coefficients = vectors[:step, j].contiguous().view(1, 1, step)
            row = row - (coefficients @ vectors[:step].unsqueeze(0)).view(size)
        e = vectors[step]
        torch.div(row, gain.clamp_min(tiny).sqrt().view(1), out=e)
        if not float(gain) > 0:
            e.zero_()
        gains.sub_(e.square())
        gains[j] = -math.inf
    if not bool(torch.isfinite(vectors.sum())) and not bool(torch.isfinite(vectors).all()):
        return None  # a NaN update (the sum alone may also overflow on finite values)
    return torch.tensor(sorted(chosen), dtype=torch.long, device=gains.device).view(1, count)


#: ``dpp_select_projected`` selects by blocks (``dpp_blocked``) from this many tokens on (below, S is one
#: ``symmetric_gram``: its panels and the one-by-one greedy are the faster there).
BLOCKED_FROM = 1024


def dpp_select_projected(projected: torch.Tensor, relevance: torch.Tensor, count: int) -> torch.Tensor:
    """``dpp_select(cosine_similarity(projected), relevance, count)`` without the N x N similarity where the
    sample is large (spec §5.2: S enters the DPP only through ``L``'s diagonal and the picked rows).

    One sample of at least ``BLOCKED_FROM`` tokens: ``dpp_blocked.dpp_greedy_blocked`` on the normalised
    tokens, the same greedy through the Gram-Schmidt form of its update vectors, blocks of picks and one
    matrix product per block (``T N D`` multiply-adds instead of the N x N product and ``T² N / 2`` reads
    one pick at a time), rounded differently; otherwise (a batch, fewer tokens, a NaN or inf)
    ``dpp_select`` on ``cosine_similarity``."""
    normed = (projected / projected.norm(dim=-1, keepdim=True)).float()
    batch, size, _ = normed.shape
    if batch != 1 or size < BLOCKED_FROM or not bool(torch.isfinite(normed.sum())):
        return dpp_select(symmetric_gram(normed), relevance, count)
    chosen = dpp_greedy_blocked(normed[0], relevance[0].float(), count)
    if chosen is None:
        return dpp_select(symmetric_gram(normed), relevance, count)
    return chosen


def dpp_greedy_plain(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """``dpp_greedy`` written as the plain batched loop (every step masks the picked candidates)."""
    batch, size, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    vectors = kernel.new_zeros(batch, count, size)  # c_i of the Cholesky-style update, [B, T, N]
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d_i^2
    picked = torch.zeros(batch, size, dtype=torch.bool, device=kernel.device)
    chosen = kernel.new_empty(batch, count, dtype=torch.long)
    for step in range(count):
        j = gains.masked_fill(picked, -math.inf).argmax(dim=-1)
        chosen[:, step] = j
        gain = gains[rows, j]
        row = kernel[rows, j]
        if step:
            past = vectors[:, :step]  # [B, step, N]
            row = row - (past[rows, :, j].unsqueeze(1) @ past).squeeze(1)
        positive = gain > 0
        e = row / gain.clamp_min(torch.finfo(gain.dtype).tiny).sqrt().unsqueeze(-1)
        e = torch.where(positive.unsqueeze(-1), e, torch.zeros_like(e))
        vectors[:, step] = e
        gains = gains - e.square()
        picked[rows, j] = True
    return chosen.sort(dim=-1).values


def relevance_scores(
    image_embeds: torch.Tensor, text_embeds: list[torch.Tensor], normalize: Normalize = "sample",
    theta: float | None = None,
) -> torch.Tensor:
    """CDPruner's relevance r [B, V] (float32).

    ``image_embeds`` [B, V, P] and each sample's text segment embeddings [M_b, P] are L2-normalised;
    ``rel = -(E @ Tᵀ).mean(over segments)`` (the official sign); then min-max normalisation
    ``(rel - min + 1e-6) / (max - min)`` per sample (``normalize="sample"``) or over the whole batch
    tensor (``"batch"``, the official code); then, with ``theta``, ``exp(θ / (2(1-θ)) · r)``.
    """
    images = image_embeds.float()
    images = images / images.norm(dim=-1, keepdim=True)
    rel = []
    for row, text in enumerate(text_embeds):
        text = text.float().to(images.device)
        text = text / text.norm(dim=-1, keepdim=True)
        rel.append((-(images[row] @ text.T)).mean(dim=-1))
    rel = torch.stack(rel)
    if normalize == "sample":
        low, high = rel.amin(dim=-1, keepdim=True), rel.amax(dim=-1, keepdim=True)
    else:
        low, high = rel.min(), rel.max()
    rel = (rel - low + 1e-6) / (high - low)
    if theta is not None:
        rel = torch.exp(theta / (2.0 * (1.0 - theta)) * rel)
    return rel


def cosine_similarity(projected: torch.Tensor) -> torch.Tensor:
    """S [B, V, V], the cosine similarity of the projected tokens [B, V, D]: normalised in the projector's
    dtype, then float32 (as the official code); the products by ``divprune.symmetric_gram`` (S is
    symmetric: half the multiply-adds of one matmul, the same dot products up to the BLAS's rounding)."""
    normed = (projected / projected.norm(dim=-1, keepdim=True)).float()
    return symmetric_gram(normed)


def similarity_kernel(projected: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``L = diag(r) S diag(r)`` (``cosine_similarity``); the selection itself uses ``dpp_select``, which
    forms only the rows of L it reads."""
    return relevance.unsqueeze(2) * cosine_similarity(projected) * relevance.unsqueeze(1)


class CDPruner(PruningMethod):
    """CDPruner: conditional DPP selection of visual tokens before the LLM.

    "N tokens" means exactly ``tokens`` visual tokens per sample enter the language model (all of a
    sample's images together); positions are renumbered (a plain shorter sequence).

    Parameters:
        tokens: visual tokens kept per sample (the official ``visual_token_num``); default: a quarter of
            the visual tokens (144 of 576). Must be in 1..V.
        clip_model: directory of a local CLIP checkpoint (for LLaVA-1.5: a copy of
            ``openai/clip-vit-large-patch14-336``) that provides the text tower with projection, its
            tokenizer and ``visual_projection``. Default: the ``clip_text/`` folder of the model's own
            checkpoint when it has one (the toy model ships its tower there); otherwise ``apply`` raises.
        clip_text: an already built ``ClipText`` or ``(text_model, tokenizer, visual_projection)`` tuple
            (tests, or sharing one loaded tower between runs).
        tokenizer: deprecated: pass ``processor=`` to ``finepruner.apply`` instead (the engine decodes
            each sample's instruction, ``StageContext.instructions``). Still accepted, and used when
            ``apply`` gets no processor.
        normalize: ``"sample"`` (default): relevance min-max normalised per sample, so a sample's
            selection does not depend on its batch; ``"batch"``: over the whole batch, as the official
            code (identical at batch size 1).
        theta: None (default, the released code) or θ in (0, 1) for the paper's variant
            ``r = exp(θ/(2(1-θ)) · r)``.
        positions: ``"renumber"`` (default, as the official code) or ``"original"``.
        budget_scope: ``"image"`` (default) or ``"crop"`` (LLaVA-NeXT / OneVision, below); on LLaVA-1.5
            ``"crop"`` selects T per image of a sample.
        relevance: ``"auto"`` (default): ``"clip"`` on CLIP vision towers (LLaVA-1.5, NeXT), ``"llm"`` on
            towers without [CLS] (OneVision's SigLIP); ``"clip"`` on such a tower raises (no matching text
            tower); ``"llm"`` needs a family that packs crops (NeXT, OneVision).
        relevance_sign: None (default): -1 with ``"clip"`` (official), +1 with ``"llm"``; or -1 / +1.

    Signals: the projector outputs (for S) and ``vision_tower.post_layernorm`` of the selected CLIP
    features (for ``visual_projection``, as the official code), captured by hooks during LLaVA's own
    image encoding (``finepruner.engine.vision``); the CLIP text tower runs on the model's device. The
    instruction text of each sample (``needs_instructions``): the explicit texts of
    ``handle.set_instructions([...])`` for one prefill, else decoded by the engine from the prompt with
    the processor bound at ``apply(..., processor=...)`` (``finepruner.models.instructions``).

    LLaVA-NeXT / OneVision (``spec/models.md`` §5.2): ``tokens`` counts per image over
    all its crops (``budget_scope="image"``, default) or per crop (``"crop"``, the official NeXT rule: T
    per crop, a crop left with fewer tokens by unpadding keeps them all); the image's newline tokens are
    always kept on top and not counted. S is the cosine similarity of the image's projected tokens (its
    rows of the language model's input); r is min-max normalised over the image's tokens (all crops
    jointly, newlines excluded); one DPP per image (per crop with ``"crop"``). NeXT (CLIP tower):
    the CLIP rule with the negative sign, as the official code. OneVision (SigLIP, no matching CLIP text
    tower, ``relevance="llm"``): ``r_i = mean_j cos(x_i, t_j)`` between the projected tokens and the
    language model's input embeddings of the instruction's tokens (tokenized without special tokens by
    the processor bound at ``apply``), sign +1 by default.

    Deviations: per-sample normalisation by default (above); the DPP's handling of an exhausted kernel
    (``dpp_greedy``); the text tower runs after the vision tower, not on a parallel CUDA stream; on
    LLaVA-1.5 a sample with several images gets one selection over all its visual tokens with
    ``budget_scope="image"``; on NeXT/OneVision an image whose relevance is constant (e.g. an empty
    instruction) gets r = 1 (the official min-max would divide by 0); the stage's count is known at
    selection (``Stage.keep`` None: newline tokens are kept on top of ``tokens``).
    """

    name = "cdpruner"
    default_positions = "renumber"
    needs_vision = ("projected_features", "post_layernorm_features")
    needs_instructions = True

    def __init__(
        self,
        tokens: int | None = None,
        clip_model: str | None = None,
        clip_text=None,
        tokenizer=None,
        normalize: Normalize = "sample",
        theta: float | None = None,
        positions: Positions | None = None,
        budget_scope: str = "image",
        relevance: str = "auto",
        relevance_sign: int | None = None,
    ) -> None:
        super().__init__(positions)
        if budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"{self.name}: budget_scope={budget_scope!r}; allowed: {BUDGET_SCOPES}")
        if relevance not in RELEVANCE_RULES:
            raise ValueError(f"{self.name}: relevance={relevance!r}; allowed: {RELEVANCE_RULES}")
        if relevance_sign is not None and (isinstance(relevance_sign, bool) or relevance_sign not in (-1, 1)):
            raise ValueError(f"{self.name}: relevance_sign={relevance_sign!r}; allowed: None, -1 or 1")
        self.budget_scope, self.relevance, self.relevance_sign = budget_scope, relevance, relevance_sign
        self._rule = "clip"  # the relevance rule in use, set by bind_model
        if normalize not in ("sample", "batch"):
            raise ValueError(f"{self.name}: normalize={normalize!r}; allowed: 'sample', 'batch'")
        if theta is not None and not (isinstance(theta, int | float) and 0.0 < theta < 1.0):
            raise ValueError(f"{self.name}: theta={theta!r}; allowed: None or 0 < theta < 1")
        if clip_model is not None and clip_text is not None:
            raise ValueError(f"{self.name}: pass clip_model or clip_text, not both")
        self.tokens, self.normalize, self.theta = tokens, normalize, theta
        self.clip_model = str(clip_model) if clip_model is not None else None
        self._clip: ClipText | None = None
        if clip_model is not None:
            self._clip = load_clip_text(clip_model)
        elif clip_text is not None:
            self._clip = as_clip_text(clip_text)
        self._clip_from_model: Path | None = None  # the model folder's tower in use (no clip_model given)
        if tokenizer is not None:
            warnings.warn("cdpruner: tokenizer= is deprecated; pass processor= to finepruner.apply",
                          DeprecationWarning, stacklevel=2)
        self._tokenizer = as_tokenizer(tokenizer, "tokenizer")

    def bound_tokenizer(self):
        return self._tokenizer

    def bind_model(self, model) -> None:
        """Without ``clip_model``/``clip_text``: load the CLIP text tower shipped in the model's checkpoint
        folder (``SHIPPED_CLIP_SUBDIR``), or raise the error that asks for ``clip_model``. The relevance rule
        is chosen here (``relevance``): the ``"llm"`` rule needs no CLIP tower."""
        self._rule = self._relevance_rule(model)
        needs = self.required_vision(model)
        if needs != type(self).needs_vision:  # only then an instance value (describe() lists it)
            self.needs_vision = needs
        else:
            vars(self).pop("needs_vision", None)
        if self._rule == "llm":
            return
        if self._clip is not None and self._clip_from_model is None:
            return
        folder = shipped_clip_dir(model)
        if folder is None:
            raise ValueError(f"{_MISSING_CLIP}; the model's checkpoint folder has no {SHIPPED_CLIP_SUBDIR}/ tower")
        if folder != self._clip_from_model:
            self._clip, self._clip_from_model = load_clip_text(folder), folder
            self.clip_model = str(folder)

    def required_vision(self, model) -> tuple[str, ...]:
        """With the ``"llm"`` relevance on a family whose capture has no CLIP-side features (Qwen), only the
        projected features; otherwise ``needs_vision`` (the CLIP rule, and NeXT/OneVision whose capture also
        marks the newline tokens)."""
        from finepruner.models.adapters import adapter_for  # no import cycle

        needs = type(self).needs_vision
        try:
            adapter = adapter_for(model)
        except ValueError:
            return needs
        supported = adapter.vision_signals_supported()
        if supported is not None and not set(needs) <= supported and self._relevance_rule(model) == "llm":
            return ("projected_features",)
        return needs

    def _relevance_rule(self, model) -> str:
        """``"clip"`` or ``"llm"`` for ``model`` (``relevance``), or a ValueError naming why."""
        from finepruner.models.adapters import adapter_for  # no import cycle

        try:
            adapter = adapter_for(model)
        except ValueError:  # not a registered family: the LLaVA-1.5 layout
            return "llm" if self.relevance == "llm" else "clip"
        clip_tower = adapter.has_cls(model.config)
        rule = self.relevance if self.relevance != "auto" else ("clip" if clip_tower else "llm")
        if rule == "clip" and not clip_tower:
            raise ValueError(
                f"{self.name}: relevance='clip' needs a CLIP vision tower, but {adapter.family}'s tower has no [CLS] "
                "(SigLIP) and no matching CLIP text tower ships with it (spec/models.md §5.2); use relevance='llm' "
                "(the default there): the instruction's language-model input embeddings against the projected tokens"
            )
        if rule == "llm" and not adapter.signals_per_image:
            raise ValueError(
                f"{self.name}: relevance='llm' is available on LLaVA-NeXT and OneVision; {adapter.family} uses the "
                "CLIP text tower (relevance='clip' or 'auto')"
            )
        return rule

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        keep = self.tokens if self.tokens is not None else max(1, num_visual // 4)
        check_tokens(self.name, keep, num_visual)
        return [Stage(layer=0, keep=None)]  # newline tokens (NeXT, OneVision) are kept on top of ``tokens``

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        needs = ("projected_features",) if self._rule == "llm" else ("projected_features", "post_layernorm_features")
        vision = ctx.require_vision(self.name, *needs)
        if vision.newline_mask is not None or self.budget_scope != "image" or self._rule != "clip":
            return self._select_images(ctx, vision)
        stage = replace(stage, keep=self.tokens if self.tokens is not None else max(1, ctx.num_visual // 4))
        texts = ctx.instructions
        if texts is None or self._clip is None:
            raise RuntimeError(f"{self.name}: no instruction texts or CLIP tower reached the selection (engine error)")
        ids = ctx.visual_ids
        device = vision.projected_features.device
        self._clip.to(device)
        projected = _take(vision.projected_features, ids.to(device))
        image_embeds = self._clip.project_image(_take(vision.post_layernorm_features, ids.to(device)))
        relevance = relevance_scores(image_embeds, self._clip.encode_texts(texts), self.normalize, self.theta)
        return dpp_select_projected(projected, relevance, stage.keep).to(ids.device)

    def _select_images(self, ctx: StageContext, vision) -> torch.Tensor:
        """Per image (or crop, ``budget_scope``): newline tokens kept, one DPP over the others with the
        relevance of ``image_relevance`` (``engine.vision.select_keeping_newlines``)."""
        from finepruner.engine.vision import image_candidates, select_keeping_newlines  # no import cycle

        texts = ctx.instructions
        if texts is None:
            raise RuntimeError(f"{self.name}: no instruction texts reached the selection (engine error)")
        device = vision.projected_features.device
        ids = ctx.visual_ids.to(device)
        projected = _take(vision.projected_features, ids)
        newline, crop = image_candidates(vision, ids)
        if self._rule == "clip":
            if self._clip is None:
                raise RuntimeError(f"{self.name}: no CLIP tower reached the selection (engine error)")
            self._clip.to(device)
            embeds = self._clip.project_image(_take(vision.post_layernorm_features, ids))
            text_embeds = self._clip.encode_texts(texts)
        else:
            if vision.embed_texts is None:
                raise RuntimeError(f"{self.name}: relevance='llm' needs the text embeddings of a family that packs "
                                   "crops (engine error)")
            embeds, text_embeds = projected, vision.embed_texts(texts)
        sign = self.relevance_sign if self.relevance_sign is not None else (-1 if self._rule == "clip" else 1)
        relevance = image_relevance(embeds, text_embeds, ~newline, sign, self.normalize, self.theta)

        def choose(rows: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
            units = rows[:, None]  # the units' own tokens only (no copy of each unit's whole sample)
            return dpp_select_projected(projected[units, candidates], relevance[units, candidates], count)

        kept = select_keeping_newlines(self.name, newline, crop, self.tokens, self.budget_scope, choose)
        return kept.to(ctx.visual_ids.device)


def image_relevance(
    embeds: torch.Tensor, text_embeds: list[torch.Tensor], valid: torch.Tensor, sign: int = -1,
    normalize: Normalize = "sample", theta: float | None = None,
) -> torch.Tensor:
    """CDPruner's relevance r [B, V] (float32) over each row's ``valid`` tokens (0 elsewhere).

    ``embeds`` [B, V, P] and each row's text embeddings [M_b, P] are L2-normalised;
    ``rel = sign * (E @ Tᵀ).mean(over text rows)``; min-max ``(rel - min + 1e-6) / (max - min)`` over the
    row's valid tokens (``"sample"``) or over all rows' (``"batch"``); a constant relevance (e.g. no text
    row) gives r = 1; then, with ``theta``, ``exp(θ / (2(1-θ)) · r)``. With sign -1, every token valid and
    CLIP embeddings this is ``relevance_scores``.
    """
    images = embeds.float()
    images = images / images.norm(dim=-1, keepdim=True)
    raw = []
    for row, text in enumerate(text_embeds):
        text = text.float().to(images.device)
        if text.shape[0] == 0:
            raw.append(images.new_zeros(images.shape[1]))
            continue
        text = text / text.norm(dim=-1, keepdim=True)
        raw.append((images[row] @ text.T).mean(dim=-1) * sign)
    rel = torch.stack(raw)
    valid = valid.to(rel.device)
    low = rel.masked_fill(~valid, math.inf)
    high = rel.masked_fill(~valid, -math.inf)
    if normalize == "sample":
        low, high = low.amin(dim=-1, keepdim=True), high.amax(dim=-1, keepdim=True)
    else:
        low, high = low.min(), high.max()
    spread = high - low
    rel = torch.where(spread > 0, (rel - low + 1e-6) / spread.clamp_min(torch.finfo(rel.dtype).tiny),
                      torch.ones_like(rel))
    if theta is not None:
        rel = torch.exp(theta / (2.0 * (1.0 - theta)) * rel)
    return rel.masked_fill(~valid, 0.0)


def _take(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``values`` [B, V, D] at ``ids`` [B, n]; ``values`` itself when ``ids`` is every token in order (the
    first stage: no copy of the features)."""
    if ids.shape[1] == values.shape[1] and bool((ids == torch.arange(ids.shape[1], device=ids.device)).all()):
        return values
    return values.gather(1, ids[..., None].expand(-1, -1, values.shape[-1]))


def shipped_clip_dir(model) -> Path | None:
    """The ``clip_text/`` folder of the checkpoint ``model`` was loaded from (a model, or the checkpoint's
    directory, for checks before loading), when it holds a CLIP text tower (a ``config.json``); None
    otherwise (e.g. a model built in memory, or a llava-hf checkpoint)."""
    if isinstance(model, str | Path):
        source = model
    else:
        source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source:
        return None
    folder = Path(str(source)).expanduser() / SHIPPED_CLIP_SUBDIR
    return folder.resolve() if (folder / "config.json").is_file() else None
