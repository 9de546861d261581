"""The pruned decoder loop: a replacement for the language model's ``forward`` (one instance).

It runs the same steps as transformers 5.24's ``LlamaModel.forward`` (embeddings, positions, rotary
embeddings, causal mask, layers, norm), with pruning stages between layers (``docs/architecture.md``):

* Prefill (the call that carries the ``<image>`` tokens): before each stage layer the method picks
  the visual tokens to keep; hidden states, position ids, rotary embeddings and the 2D padding mask
  are gathered, and a new causal mask is built for that segment with ``layer_idx`` so that it matches
  the layer's cache length. Kept tokens keep their order.
* Decode (later calls on the same cache): each segment gets its own mask (its kept prompt mask plus
  the new tokens' mask) and its own shifted positions.
* Everything else prunes nothing (a prompt whose plan has no stage, e.g. ``vanilla``; a call without
  images on a cache that no pruned prefill filled): it runs the class's own ``forward``, so it costs
  exactly what plain transformers costs (``docs/performance.md``, "vanilla path vs plain transformers").

Masks are always built with an explicit 2D mask and ``position_ids=None``: with gapped positions and
no mask, ``create_causal_mask`` would treat every gap as a packed-sequence boundary
(``toy_notes.md``, "Pitfalls"). Position ids are not passed to the layers (Llama layers only use the
rotary embeddings; FlashAttention would otherwise read gaps as packed sequences).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from finepruner.engine.signals import StageSignals, eager_last_query_attention, last_query_attention
from finepruner.engine.state import STATE_ATTRIBUTE, GenerationState, PruneStats, Segment
from finepruner.engine.units import Choice, Group, Unit, make_groups, make_units, pack_rows, rebuild, row_visual_totals
from finepruner.engine.vision import VisionSignals, stack_images
from finepruner.methods.base import Selection, StageContext

if TYPE_CHECKING:
    from finepruner.engine.handle import Handle


def _causal_mask(lm, hidden, mask2d, cache, layer_idx):
    """The 4D mask of one segment (``position_ids=None``: see the module docstring)."""
    return create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache,
                              position_ids=None, layer_idx=layer_idx)


def _clock(hidden: torch.Tensor, handle) -> float:
    """``perf_counter()``; on CUDA, after a synchronize when ``handle.synchronize_timing`` is set (bench)."""
    if hidden.is_cuda and getattr(handle, "synchronize_timing", False):
        torch.cuda.synchronize(hidden.device)
    return time.perf_counter()


def pruned_forward(
    lm,
    handle: Handle,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache: Cache | None = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    past_key_values: Cache | None = None,
    output_hidden_states: bool | None = None,
    output_attentions: bool | None = None,
    return_dict: bool | None = None,
    **kwargs,
) -> BaseModelOutputWithPast:
    """Forward of the language model ``lm`` with the pruning of ``handle``'s method.

    A call that prunes nothing (no image and no pruned cache, or a prompt whose plan has no stage, as
    with ``vanilla``) runs the language model's own forward (``type(lm).forward``) unchanged: the same
    kernels, allocations and outputs as plain transformers (``output_attentions`` included).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    cache = cache if cache is not None else past_key_values
    batch, length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
    image_mask, row_keys, image_counts = handle._take_pending(torch.Size((batch, length)))
    state: GenerationState | None = getattr(cache, STATE_ATTRIBUTE, None) if cache is not None else None
    if state is not None and cache.get_seq_length() == 0:  # a reused, emptied cache: forget the old run
        state = None
        setattr(cache, STATE_ATTRIBUTE, None)
    has_image = image_mask is not None and bool(image_mask.any())
    units = make_units(handle.adapter.image_spans(image_mask, image_counts), image_mask) if has_image else []
    if state is None and not (has_image and any(handle.plan(unit.count) for unit in units)):
        if has_image:
            _record_unpruned(lm, handle, batch, length, units)
        flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions,
                 "return_dict": return_dict}
        return type(lm).forward(lm, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                **{k: v for k, v in flags.items() if v is not None}, **kwargs)

    if output_attentions:
        raise ValueError(
            "output_attentions is not available while a finepruner method prunes this call; the engine computes "
            "the attention rows it needs itself (finepruner.engine.signals)"
        )
    use_cache = lm.config.use_cache if use_cache is None else use_cache
    output_hidden_states = (
        lm.config.output_hidden_states if output_hidden_states is None else output_hidden_states
    )
    if inputs_embeds is None:
        inputs_embeds = lm.embed_tokens(input_ids)
    if use_cache and cache is None:
        cache = DynamicCache(config=lm.config)
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError("finepruner needs a 2D attention mask (static/compiled caches are not supported)")
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(f"finepruner supports DynamicCache only, got {type(cache).__name__}")

    if has_image:
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("a prompt with images must start a new generation (the cache is not empty)")
        past = 0
    else:
        past = state.seen
    position_ids = handle.adapter.lm_positions(position_ids, batch, length, past, inputs_embeds.device)
    injections = handle.adapter.take_layer_injections(kwargs)  # e.g. Qwen3-VL deepstack (prefill only)

    if has_image:
        hidden, all_hidden = _prefill(lm, handle, inputs_embeds, attention_mask, position_ids, cache,
                                      use_cache, units, image_mask, row_keys, output_hidden_states, kwargs,
                                      injections)
    else:
        hidden, all_hidden = _decode(lm, handle.adapter, state, inputs_embeds, attention_mask, position_ids, cache,
                                     use_cache, output_hidden_states, kwargs)
    hidden = lm.norm(hidden)
    if all_hidden is not None:
        all_hidden.append(hidden)
    return BaseModelOutputWithPast(
        last_hidden_state=hidden,
        cache=cache,
        hidden_states=tuple(all_hidden) if all_hidden is not None else None,
    )


def _record_unpruned(lm, handle: Handle, batch: int, length: int, units: list[Unit]) -> None:
    """Statistics of a prefill with images whose plan has no stage (it runs the model's own forward):
    every decoder layer sees the whole prompt; signals captured for the prefill are consumed unused."""
    handle._discard_vision()
    handle._take_instructions(batch)
    num_visual = max(row_visual_totals(units, batch))
    layers = int(lm.config.num_hidden_layers)
    stats = PruneStats(sequence_length=[length] * layers, visual_tokens=[num_visual] * layers, batch=batch,
                       crops=handle._take_crops(), vision_grids=handle._taken_grids(),
                       config=handle.model.config)
    handle._record(kept=[], stats=stats, heads=[], attention=[], merged=[])


def _gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``positions`` [B, L] or [B, L, rows] (mRoPE) at the sequence indices ``index`` [B, k]."""
    if positions.dim() == 2:
        return positions.gather(1, index)
    return positions.gather(1, index[..., None].expand(-1, -1, positions.shape[-1]))


def _shifted(positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``positions`` [B, L(, rows)] minus a per-row ``shift`` [B]."""
    return positions - shift.view(-1, *[1] * (positions.dim() - 1))


def _run_layers(lm, adapter, hidden, segments, cache, use_cache, kwargs, all_hidden):
    """Run all layers without pruning; ``segments`` maps each segment's first layer to its
    (position_ids, mask2d) and must contain layer 0."""
    for index, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        if index in segments:
            position_ids, mask2d = segments[index]
            embeddings = adapter.rotary_embeddings(lm, hidden, position_ids)
            mask = _causal_mask(lm, hidden, mask2d, cache, index)
        if all_hidden is not None:
            all_hidden.append(hidden)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, cache=cache,
                       use_cache=use_cache, **kwargs)
    return hidden


def _decode(lm, adapter, state, hidden, attention_mask, position_ids, cache, use_cache, output_hidden_states,
            kwargs):
    """Tokens after a pruned prefill: per-segment masks and positions."""
    batch, length = hidden.shape[:2]
    expected = state.seen + length
    if attention_mask is not None and attention_mask.shape[1] != expected:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns; this pruned generation expects {expected}"
        )
    if attention_mask is not None:
        tail = attention_mask[:, state.prompt_length:]
    else:
        tail = None
    segments = {}
    for segment in state.segments:
        if segment.prompt_mask is None and tail is None:
            mask2d = None
        else:
            prompt = segment.prompt_mask
            if prompt is None:
                prompt = torch.ones(batch, segment.kept_length, dtype=torch.long, device=hidden.device)
            new = tail
            if new is None:
                new = torch.ones(batch, expected - state.prompt_length, dtype=prompt.dtype, device=hidden.device)
            mask2d = torch.cat([prompt.to(device=new.device, dtype=new.dtype), new], dim=1)
        shift = segment.position_shift.to(position_ids.device)  # a stage's device (device_map)
        segments[segment.start] = (_shifted(position_ids, shift), mask2d)
    all_hidden = [] if output_hidden_states else None
    hidden = _run_layers(lm, adapter, hidden, segments, cache, use_cache, kwargs, all_hidden)
    state.seen = expected
    return hidden, all_hidden


@dataclass
class _Tokens:
    """The prompt as it currently stands during a prefill: every stage gathers these together.

    ``source_index`` [B, L]: each token's index in the unpruned prompt (-1 for inserted tokens and
    re-padding slots); ``shift`` [B]: how much the renumbered positions lag the logical ones (0 with
    original positions). The visual tokens themselves are tracked per budget unit (``engine.units.Unit``);
    ``visual_index`` [B, V] (their positions) and ``visual_ids`` [B, V] (original ids 0..N-1, inserted
    tokens N, N+1, ...) are set only inside the batched path (``_apply_whole_batch``).
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    mask2d: torch.Tensor | None
    source_index: torch.Tensor
    visual_index: torch.Tensor | None
    visual_ids: torch.Tensor | None
    shift: torch.Tensor


def _keep(tokens: _Tokens, local: torch.Tensor, renumber: bool) -> _Tokens:
    """Keep every non-visual token and the visual tokens ``local`` [B, k] (indices into the current
    visual tokens), in their order; positions either kept or renumbered contiguously."""
    batch, length, width = tokens.hidden.shape
    keep_mask = torch.ones(batch, length, dtype=torch.bool, device=tokens.hidden.device)
    keep_mask.scatter_(1, tokens.visual_index, False)
    kept_positions = tokens.visual_index.gather(1, local)
    keep_mask.scatter_(1, kept_positions, True)
    keep_index = keep_mask.nonzero()[:, 1].view(batch, -1)
    position_ids = _gather_positions(tokens.position_ids, keep_index)
    shift = tokens.shift
    if renumber:
        position_ids = position_ids - (~keep_mask).cumsum(dim=1).gather(1, keep_index)
        shift = shift + (~keep_mask).sum(dim=1)
    return _Tokens(
        hidden=tokens.hidden.gather(1, keep_index[..., None].expand(-1, -1, width)),
        position_ids=position_ids,
        mask2d=tokens.mask2d.gather(1, keep_index) if tokens.mask2d is not None else None,
        source_index=tokens.source_index.gather(1, keep_index),
        visual_index=(keep_mask.cumsum(dim=1) - 1).gather(1, kept_positions),
        visual_ids=tokens.visual_ids.gather(1, local),
        shift=shift,
    )


def _insert(tokens: _Tokens, insert: torch.Tensor, positions: torch.Tensor | None, first_id: int,
            start: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> _Tokens:
    """Insert ``insert`` [B, c, D] right after the last kept visual token (at ``start`` [B, 1] when none is
    kept); they become visual tokens with ids ``first_id..``. Positions: ``positions`` [B, c] (original
    mode), or, when None (renumber mode), contiguous after the preceding token, with the following tokens
    shifted by c. ``valid`` [B, c] (``Selection.insert_valid``): False slots are padding, masked out and
    skipped by the renumbered positions (the following tokens shift by each sample's own count)."""
    batch, length, width = tokens.hidden.shape
    count = insert.shape[1]
    device = tokens.hidden.device
    if start is None:  # [B, 1] tokens up to and including the last visual one stay
        start = tokens.visual_index[:, -1:] + 1
    after = torch.arange(length, device=device)[None] >= start  # [B, L] tokens that move right by c
    target = torch.arange(length, device=device)[None] + count * after
    slots = start + torch.arange(count, device=device)[None]  # [B, c]

    def spread(values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        out = values.new_empty(batch, length + count, *values.shape[2:])
        out.scatter_(1, target.view(*target.shape, *[1] * (values.dim() - 2)).expand_as(values), values)
        out.scatter_(1, slots.view(*slots.shape, *[1] * (values.dim() - 2)).expand_as(fill), fill)
        return out

    position_ids = tokens.position_ids
    shift = tokens.shift
    if positions is None:
        if valid is None:
            offsets, added = torch.arange(count, device=device)[None], count
        else:  # padding slots take no position: each sample's tokens are contiguous, the text follows them
            offsets = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            added = valid.long().sum(dim=1, keepdim=True)
        positions = position_ids.gather(1, start - 1) + 1 + offsets
        position_ids = position_ids + added * after
        shift = shift - (added if valid is None else added[:, 0])
    mask2d = tokens.mask2d
    if valid is not None and mask2d is None:
        mask2d = torch.ones(batch, length, dtype=torch.long, device=device)
    if mask2d is not None:
        fill = torch.ones(batch, count, dtype=mask2d.dtype, device=device) if valid is None else valid.to(mask2d.dtype)
        mask2d = spread(mask2d, fill)
    new_ids = torch.arange(first_id, first_id + count, device=device).expand(batch, -1)
    return _Tokens(
        hidden=spread(tokens.hidden, insert.to(tokens.hidden.dtype)),
        position_ids=spread(position_ids, positions.to(position_ids.dtype)),
        mask2d=mask2d,
        source_index=spread(tokens.source_index, torch.full((batch, count), -1, dtype=torch.long, device=device)),
        visual_index=torch.cat([tokens.visual_index, slots], dim=1),
        visual_ids=torch.cat([tokens.visual_ids, new_ids], dim=1),
        shift=shift,
    )


@dataclass
class _StageResult:
    """What one stage did, for ``Handle``: kept and inserted ids per sample, heads per unit, attention."""

    kept: torch.Tensor
    merged: torch.Tensor | None
    heads: list[torch.Tensor] | None
    attention: torch.Tensor | None


def _group_plans(handle: Handle, groups: list[Group]) -> list[list]:
    """Each group's plan; all must prune at the same layers with the same signals (their keep counts may
    differ), since every sample runs the same decoder layers."""
    plans = [handle.plan(group.count) for group in groups]
    layout = [(s.layer, s.score_layer, s.last_query) for s in plans[0]]
    for group, plan in zip(groups[1:], plans[1:], strict=True):
        if [(s.layer, s.score_layer, s.last_query) for s in plan] != layout:
            raise ValueError(
                f"{handle.method.name}: its stages for images of {groups[0].count} and {group.count} visual tokens "
                "prune at different decoder layers; batch such images separately"
            )
    return plans


def _rows(tensor: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` restricted to the batch rows ``rows`` (all rows when None)."""
    if tensor is None or rows is None:
        return tensor
    return tensor.index_select(0, rows)


def _group_vision(handle: Handle, groups: list[Group], batch: int, inputs_embeds: torch.Tensor,
                  input_index: dict[int, torch.Tensor]) -> list[VisionSignals | None]:
    """Each group's vision signals (methods with ``needs_vision``): the captured ones when the batch is one
    group of whole samples on a family with per-sample budgets (LLaVA-1.5); on families with per-image
    budgets, per unit (image): its projected features as the language model receives them (its visual rows
    of ``inputs_embeds``, newline tokens included) and, on families that pack crops, the tower signals of
    its crops in its token order (``VisionCapture.take_images``: ``newline_mask``, ``crop_index``, the
    signals of ``ModelAdapter.vision_signals_supported``), stacked over the group's units."""
    if not handle.method.needs_vision:
        return [None] * len(groups)
    if not handle.adapter.per_image_budget:
        if len(groups) == 1 and groups[0].whole_batch:
            return [handle._take_vision(batch, groups[0].count)]
        handle._discard_vision()
        totals = [sum(u.count for u in g.units) for g in groups]
        raise ValueError(
            f"{handle.method.name} reads vision-side signals, which need the same number of image tokens in every "
            f"sample of a batch on {handle.adapter.family}; this batch mixes {sorted(set(totals))} (batch prompts "
            "with the same number of images)"
        )
    prompts = handle._take_prompt_ids()
    images = handle._take_image_vision() if handle.adapter.signals_per_image else None
    handle._discard_vision()
    image_of = _encoded_image_of(groups, batch, len(images)) if images is not None else {}
    embed = _text_embedder(handle)
    signals = []
    for group in groups:
        if images is None:
            group_signals = VisionSignals()
        else:
            group_signals = stack_images([_unit_image(images, image_of, unit) for unit in group.units])
        group_signals.projected_features = torch.stack([inputs_embeds[u.row, input_index[id(u)]] for u in group.units])
        group_signals.patches_per_image = group.count
        group_signals.image_token_id = handle.adapter.image_token_id
        group_signals.prompt_ids = [prompts[u.row] for u in group.units] if prompts else None
        group_signals.embed_texts = embed
        signals.append(group_signals)
    return signals


def _encoded_image_of(groups: list[Group], batch: int, encoded: int) -> dict[int, int]:
    """Each unit's index (by ``id``) among the encoded images: row-major order, or, when ``generate`` repeats
    every sample k times (beams, several returned sequences), the image of the sample's first copy."""
    units = sorted((u for g in groups for u in g.units), key=lambda u: (u.row, u.image))
    if len(units) == encoded:
        return {id(u): i for i, u in enumerate(units)}
    per_row = [0] * batch
    for unit in units:
        per_row[unit.row] += 1
    for repeat in range(2, batch + 1):
        if batch % repeat:
            continue
        blocks = [per_row[start:start + repeat] for start in range(0, batch, repeat)]
        if all(len(set(b)) == 1 for b in blocks) and sum(b[0] for b in blocks) == encoded:
            offsets = [0]
            for block in blocks:
                offsets.append(offsets[-1] + block[0])
            return {id(u): offsets[u.row // repeat] + u.image for u in units}
    raise RuntimeError(
        f"{encoded} images were encoded for {len(units)} images in the prompts' <image> tokens; the vision signals "
        "cannot be matched to the images"
    )


def _unit_image(images: list[VisionSignals], image_of: dict[int, int], unit: Unit) -> VisionSignals:
    """The captured signals of one unit's image, checked against its token count."""
    image = images[image_of[id(unit)]]
    if image.patches_per_image != unit.count:
        raise RuntimeError(
            f"the encoded image's layout has {image.patches_per_image} tokens but its <image> span in sample "
            f"{unit.row} has {unit.count}; the vision signals do not match the prompt"
        )
    return image


def _text_embedder(handle: Handle):
    """``VisionSignals.embed_texts``: texts -> their token embeddings in the language model's input space,
    tokenized (no special tokens) with the processor bound at ``apply``."""
    tokenizer = handle._tokenizer
    embeddings = handle.adapter.llava_model.get_input_embeddings()

    def embed(texts: list[str]) -> list[torch.Tensor]:
        if tokenizer is None:
            raise RuntimeError(
                f"{handle.method.name} embeds the instruction text with the language model's tokenizer: pass "
                "processor= to finepruner.apply"
            )
        out = []
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                out.append(embeddings(torch.tensor(ids, dtype=torch.long, device=embeddings.weight.device)))
        return out

    return embed


def _prefill(lm, handle, hidden, attention_mask, position_ids, cache, use_cache, units, image_mask, row_keys,
             output_hidden_states, kwargs, injections=None):
    """A prompt with images: run the layers and prune at every stage of the method's plan."""
    batch, length, width = hidden.shape
    device = hidden.device
    groups = make_groups(units, batch)
    plans = _group_plans(handle, groups)
    stages = plans[0]
    stage_at = {stage.layer: i for i, stage in enumerate(stages)}
    # score layers that run before their stage: their input is kept for the signals, and their keys are
    # reused (from the cache, after RoPE; without a cache, the k_proj output captured while they run)
    key_layers = {s.score_layer for s in stages if s.score_layer is not None and s.score_layer < s.layer}
    cached_keys = cache is not None and use_cache  # then the cache holds them (after RoPE): no hook
    renumber = handle.renumber
    score_impl = getattr(handle.method, "score_impl", "cheap")

    tokens = _Tokens(hidden, position_ids, attention_mask, torch.arange(length, device=device).expand(batch, -1),
                     None, None, torch.zeros(batch, dtype=torch.long, device=device))
    prefill = _PrefillInput(inputs_embeds=hidden, mask2d=attention_mask, image_mask=image_mask,
                            visual_index={id(u): u.index for u in units}, row_keys=row_keys)
    row_counters = row_visual_totals(units, batch)  # ids of inserted tokens follow each sample's visual tokens
    segments = [Segment(0, attention_mask, length, tokens.shift)]
    saved_inputs: dict[int, tuple] = {}
    saved_keys: dict[int, torch.Tensor] = {}
    stats = PruneStats(batch=batch, score_impl=score_impl, config=handle.model.config, crops=handle._take_crops(),
                       vision_grids=handle._taken_grids())
    results: list[_StageResult] = []
    started = _clock(hidden, handle)
    vision = _group_vision(handle, groups, batch, hidden, prefill.visual_index)
    instructions = handle._take_instructions(batch)  # instruction texts (methods with needs_instructions)
    stats.selection_seconds += _clock(hidden, handle) - started
    all_hidden = [] if output_hidden_states else None
    adapter = handle.adapter
    embeddings = adapter.rotary_embeddings(lm, hidden, position_ids)
    mask = _causal_mask(lm, hidden, attention_mask, cache, 0)

    for index, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        if index in stage_at:
            stage_index = stage_at[index]
            stage = stages[stage_index]
            started = _clock(tokens.hidden, handle)
            tokens, prefill = _on_device(tokens, prefill, units, tokens.hidden.device)  # device_map: layer's device
            score_input = keys = rotated = rows = None
            if stage.score_layer is not None:
                score_input = saved_inputs.pop(stage.score_layer, None) or (tokens.hidden, embeddings, tokens.mask2d)
                keys = saved_keys.pop(stage.score_layer, None)
                if cached_keys and stage.score_layer < index:
                    rotated = _cached_keys(cache, stage.score_layer, tokens.hidden.shape[1])
            reuse = score_impl == "cheap"  # "recompute": project the score layer's keys again (float32 RoPE)
            if stage.score_layer is not None and stage.last_query:
                source, source_embeddings, source_mask = score_input
                if score_impl == "eager":  # recomputes q and k on purpose: it shows that approach's cost
                    rows = eager_last_query_attention(lm.layers[stage.score_layer], source, source_embeddings,
                                                      source_mask)
                else:
                    rows = last_query_attention(lm.layers[stage.score_layer], source, source_embeddings,
                                                source_mask, keys=keys if reuse else None,
                                                rotated_keys=rotated if reuse else None)
                rows = rows.to(tokens.hidden.device)
                stats.score_lengths.append(source.shape[1])
                stats.score_keys_reused.append(reuse and (keys is not None or rotated is not None))
            stage_signals = _StageInputs(lm=lm, tokens=tokens, prefill=prefill, score_layer=stage.score_layer,
                                         score_input=score_input, keys=keys, rotated=rotated, rows=rows)
            choices = [
                _select_group(handle, group, plan[stage_index], stage_index, stage_signals, vision[g],
                              instructions, width)
                for g, (group, plan) in enumerate(zip(groups, plans, strict=True))
            ]
            stats.selection_seconds += _clock(tokens.hidden, handle) - started
            tokens, result = _apply_choices(tokens, groups, choices, renumber, row_counters, rows, batch)
            results.append(result)
            segments.append(Segment(index, tokens.mask2d, tokens.hidden.shape[1], tokens.shift))
            embeddings = adapter.rotary_embeddings(lm, tokens.hidden, tokens.position_ids)
            mask = _causal_mask(lm, tokens.hidden, tokens.mask2d, cache, index)
        hidden = tokens.hidden
        if index in key_layers:
            saved_inputs[index] = (hidden, embeddings, tokens.mask2d)
        stats.sequence_length.append(hidden.shape[1])
        stats.visual_tokens.append(max(row_visual_totals(units, batch)))
        if all_hidden is not None:
            all_hidden.append(hidden)
        capture = None
        if index in key_layers and not cached_keys:  # keep the keys it computes (score_keys)
            capture = layer.self_attn.k_proj.register_forward_hook(
                lambda module, args, output, index=index: saved_keys.__setitem__(index, output)
            )
        try:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, cache=cache,
                           use_cache=use_cache, **kwargs)
        finally:
            if capture is not None:
                capture.remove()
        if injections is not None:  # added to the visual tokens still present (their source rows)
            hidden = injections.after_layer(index, hidden, tokens.source_index)
        tokens.hidden = hidden

    if cache is not None:
        if 0 in stage_at:  # the stage before layer 0 replaces the unpruned first segment
            segments = segments[1:]
        setattr(cache, STATE_ATTRIBUTE, GenerationState(prompt_length=length, segments=segments, seen=length))
    handle._record(kept=[r.kept for r in results], stats=stats, heads=[r.heads for r in results],
                   attention=[r.attention for r in results], merged=[r.merged for r in results])
    return hidden, all_hidden


def _on_device(tokens: _Tokens, prefill: _PrefillInput, units: list[Unit], device: torch.device):
    """The prefill's state on ``device``, the device of the hidden states at this stage (with a
    ``device_map`` the layers may sit on several devices; on one device nothing moves)."""
    if tokens.position_ids.device == device:
        return tokens, prefill
    for unit in units:
        unit.index, unit.ids, unit.row_ids = unit.index.to(device), unit.ids.to(device), unit.row_ids.to(device)
    prefill.visual_index = {key: value.to(device) for key, value in prefill.visual_index.items()}
    mask2d = None if tokens.mask2d is None else tokens.mask2d.to(device)
    moved = _Tokens(tokens.hidden, tokens.position_ids.to(device), mask2d, tokens.source_index.to(device), None,
                    None, tokens.shift.to(device))
    inputs = _PrefillInput(
        inputs_embeds=prefill.inputs_embeds.to(device),
        mask2d=None if prefill.mask2d is None else prefill.mask2d.to(device),
        image_mask=prefill.image_mask.to(device), visual_index=prefill.visual_index, row_keys=prefill.row_keys,
    )
    return moved, inputs


@dataclass
class _PrefillInput:
    """The prefill's input as layer 0 received it: embeddings, padding mask, the [B, L] mask of all visual
    tokens, each unit's visual positions (keyed by ``id(unit)``) and the per-sample seeding keys."""

    inputs_embeds: torch.Tensor
    mask2d: torch.Tensor | None
    image_mask: torch.Tensor
    visual_index: dict[int, torch.Tensor]
    row_keys: list[int]


@dataclass
class _StageInputs:
    """The signals a stage computed once for the whole batch, before each group selects."""

    lm: object
    tokens: _Tokens
    prefill: _PrefillInput
    score_layer: int | None
    score_input: tuple | None
    keys: torch.Tensor | None
    rotated: torch.Tensor | None
    rows: torch.Tensor | None  # [B, heads, L] last-query attention


def _one_row(positions: torch.Tensor) -> torch.Tensor:
    """[B, L] positions for ``StageSignals``: as they are (1-D), or the largest of the mRoPE rows."""
    return positions if positions.dim() == 2 else positions.amax(dim=-1)


def _unit_key(row_keys: list[int], unit: Unit) -> int:
    """A unit's seeding key: its sample's key (first image), combined with the image index after it."""
    return row_keys[unit.row] if unit.image == 0 else hash((row_keys[unit.row], unit.image))


def _select_group(handle: Handle, group: Group, stage, stage_index: int, inputs: _StageInputs,
                  vision: VisionSignals | None, instructions: list[str] | None, width: int):
    """Run the method's ``select`` for one group (its units as the batch); returns the checked
    ``(keep, insert, insert_from, insert_valid)``."""
    tokens = inputs.tokens
    device = tokens.hidden.device
    rows = None if group.whole_batch else torch.tensor(group.rows, device=device)
    visual_index = torch.stack([unit.index for unit in group.units])
    attention = None
    if inputs.rows is not None:
        source = _rows(inputs.rows, rows)
        attention = source.gather(2, visual_index[:, None, :].expand(-1, source.shape[1], -1))
    score_input = None
    if inputs.score_input is not None:
        score_hidden, (cos, sin), score_mask = inputs.score_input
        score_input = (_rows(score_hidden, rows), (_rows(cos, rows), _rows(sin, rows)), _rows(score_mask, rows))
    signals = StageSignals(
        lm=inputs.lm, hidden=_rows(tokens.hidden, rows), position_ids=_rows(_one_row(tokens.position_ids), rows),
        mask2d=_rows(tokens.mask2d, rows), visual_index=visual_index, source_index=_rows(tokens.source_index, rows),
        inputs_embeds=_rows(inputs.prefill.inputs_embeds, rows), input_mask2d=_rows(inputs.prefill.mask2d, rows),
        input_visual_index=torch.stack([inputs.prefill.visual_index[id(u)] for u in group.units]),
        input_image_mask=_rows(inputs.prefill.image_mask, rows),
        score_layer=inputs.score_layer, score_input=score_input, score_keys=_rows(inputs.keys, rows),
        score_rotated_keys=_rows(inputs.rotated, rows), memo=group.memo,
    )
    context = StageContext(
        attention=attention, visual_ids=torch.stack([unit.ids for unit in group.units]),
        row_keys=[_unit_key(inputs.prefill.row_keys, unit) for unit in group.units], vision=vision,
        signals=signals, instructions=None if instructions is None else [instructions[u.row] for u in group.units],
    )
    choice = handle.method.select(stage_index, stage, context)
    return (*_unpack_selection(choice, stage, stage_index, len(group.units), width, handle.method.name, device),
            context.heads)


def _apply_choices(tokens: _Tokens, groups: list[Group], choices: list, renumber: bool, row_counters: list[int],
                   rows_attention: torch.Tensor | None, batch: int) -> tuple[_Tokens, _StageResult]:
    """Apply every group's selection to the sequence; the units are updated to their new tokens."""
    if len(groups) == 1 and groups[0].whole_batch:
        return _apply_whole_batch(tokens, groups[0], choices[0], renumber, row_counters, rows_attention)
    units: list[Unit] = []
    unit_choices: list[Choice] = []
    heads: dict[int, torch.Tensor] = {}
    any_heads = False
    for group, (local, insert, insert_from, valid, group_heads) in zip(groups, choices, strict=True):
        any_heads |= group_heads is not None
        for u, unit in enumerate(group.units):
            units.append(unit)
            unit_choices.append(Choice(
                keep=local[u], insert=None if insert is None else insert[u],
                insert_from=None if insert_from is None else insert_from[u],
                valid=None if valid is None else valid[u],
            ))
            if group_heads is not None:
                heads[id(unit)] = group_heads[u]
    order = sorted(range(len(units)), key=lambda i: (units[i].row, units[i].image))
    units = [units[i] for i in order]
    unit_choices = [unit_choices[i] for i in order]
    attention = None
    if rows_attention is not None:  # per sample, over its current visual tokens in sequence order
        per_row: list[torch.Tensor | None] = [None] * batch
        for row in range(batch):
            index = [u.index for u in units if u.row == row]
            if index:
                per_row[row] = rows_attention[row][:, torch.cat(index)].transpose(0, 1)
        attention = pack_rows(per_row, 0.0, batch).transpose(1, 2)
    built = rebuild(tokens.hidden, tokens.position_ids, tokens.mask2d, tokens.source_index, tokens.shift, units,
                    unit_choices, renumber, row_counters)
    kept_rows: list[torch.Tensor | None] = [None] * batch
    merged_rows: list[torch.Tensor | None] = [None] * batch
    for unit, kept, inserted in zip(units, built.kept_row_ids, built.inserted_row_ids, strict=True):
        kept_rows[unit.row] = kept if kept_rows[unit.row] is None else torch.cat([kept_rows[unit.row], kept])
        if inserted is not None:
            merged_rows[unit.row] = inserted if merged_rows[unit.row] is None else torch.cat(
                [merged_rows[unit.row], inserted])
    device = tokens.hidden.device
    empty = torch.empty(0, dtype=torch.long, device=device)
    kept = pack_rows([k if k is not None else empty for k in kept_rows], -1, batch)
    merged = None
    if any(m is not None for m in merged_rows):
        merged = pack_rows([m if m is not None else empty for m in merged_rows], -1, batch)
    result = _StageResult(kept=kept, merged=merged, attention=attention,
                          heads=[heads[id(u)] for u in units] if any_heads else None)
    new_tokens = _Tokens(built.hidden, built.position_ids, built.mask2d, built.source_index, None, None, built.shift)
    return new_tokens, result


def _apply_whole_batch(tokens: _Tokens, group: Group, choice, renumber: bool, row_counters: list[int],
                       rows_attention: torch.Tensor | None) -> tuple[_Tokens, _StageResult]:
    """One group of whole samples in batch order (every LLaVA-1.5 batch): batched gathers, every row keeps
    the same count, nothing is re-padded."""
    local, insert, insert_from, insert_valid, heads = choice
    visual_index = torch.stack([unit.index for unit in group.units])
    visual_ids = torch.stack([unit.ids for unit in group.units])
    attention = None
    if rows_attention is not None:
        attention = rows_attention.gather(2, visual_index[:, None, :].expand(-1, rows_attention.shape[1], -1))
    current = _Tokens(tokens.hidden, tokens.position_ids, tokens.mask2d, tokens.source_index, visual_index,
                      visual_ids, tokens.shift)
    if insert is not None and not renumber:  # merged tokens take their centre's position
        insert_positions = _gather_positions(tokens.position_ids, visual_index.gather(1, insert_from))
    current = _keep(current, local, renumber)
    kept = current.visual_ids
    merged = None
    if insert is not None:
        anchor = None if local.shape[1] else visual_index[:, :1]  # nothing kept: where the span began
        first_id = group.units[0].next_id
        current = _insert(current, insert, None if renumber else insert_positions, first_id, anchor, insert_valid)
        merged = current.visual_ids[:, -insert.shape[1]:]
        for row in range(len(row_counters)):
            row_counters[row] += insert.shape[1]
    for row, unit in enumerate(group.units):
        unit.index, unit.ids = current.visual_index[row], current.visual_ids[row]
        unit.row_ids = unit.ids + unit.offset * (unit.ids < unit.count)
        unit.next_id += 0 if insert is None else insert.shape[1]
    result = _StageResult(kept=kept, merged=merged, heads=heads, attention=attention)
    return _Tokens(current.hidden, current.position_ids, current.mask2d, current.source_index, None, None,
                   current.shift), result


def _cached_keys(cache: DynamicCache | None, layer: int, length: int) -> torch.Tensor | None:
    """Layer ``layer``'s keys after RoPE [B, kv_heads, L, head_dim] from this prefill's cache, when it holds
    exactly the ``length`` current tokens (no stage lies between that layer and the current one)."""
    if cache is None or layer >= len(cache.layers):
        return None
    keys = getattr(cache.layers[layer], "keys", None)
    return keys if isinstance(keys, torch.Tensor) and keys.shape[2] == length else None


def _unpack_selection(choice, stage, stage_index, batch, width, name, device):
    """``(keep, insert, insert_from, insert_valid)`` of a method's answer, checked against the stage's
    declared counts."""
    if isinstance(choice, Selection):
        local, insert, insert_from, valid = choice.keep, choice.insert, choice.insert_from, choice.insert_valid
    else:
        local, insert, insert_from, valid = choice, None, None, None
    local, insert, insert_from, valid = (None if t is None else t.to(device)
                                         for t in (local, insert, insert_from, valid))
    if local.ndim != 2 or local.shape[0] != batch or (stage.keep is not None and local.shape[1] != stage.keep):
        raise RuntimeError(
            f"{name} selected {tuple(local.shape)} tokens at stage {stage_index}; expected {(batch, stage.keep)}"
        )
    if insert is not None and insert.shape[1] == 0:
        insert = insert_from = valid = None
    count = 0 if insert is None else insert.shape[1]
    if insert is not None and (insert.ndim != 3 or insert.shape[0] != batch or insert.shape[2] != width):
        raise RuntimeError(f"{name} inserted {tuple(insert.shape)} hidden states; expected [{batch}, c, {width}]")
    if stage.insert is not None and count != stage.insert:
        raise RuntimeError(f"{name} inserted {count} tokens at stage {stage_index}; the plan says {stage.insert}")
    if insert is not None and (insert_from is None or tuple(insert_from.shape) != (batch, count)):
        raise RuntimeError(f"{name}: Selection.insert_from must be [{batch}, {count}] with Selection.insert")
    if valid is not None and (insert is None or tuple(valid.shape) != (batch, count)):
        raise RuntimeError(f"{name}: Selection.insert_valid must be [{batch}, {count}] with Selection.insert")
    if valid is not None:
        valid = valid.to(device=insert.device, dtype=torch.bool)
        if bool(valid.all()):
            valid = None  # no padding slot: the plain path
    return local, insert, insert_from, valid
