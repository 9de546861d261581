"""``apply``: attach a pruning method to a model instance, and the ``Handle`` that undoes it."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from finepruner.engine.loop import pruned_forward
from finepruner.engine.state import PruneStats
from finepruner.engine.vision import RECEIVED_PREFIX, VisionCapture, VisionSignals
from finepruner.methods import PruningMethod, Stage, create
from finepruner.methods.base import ModelShape, check_shape
from finepruner.models.adapters import adapter_for
from finepruner.models.instructions import as_tokenizer, decode_instructions, repeat_for_batch

_HANDLE_ATTRIBUTE = "_finepruner_handle"


class Handle:
    """A method applied to one model; a context manager. ``remove()`` restores the model exactly.

    After a forward or ``generate`` (results of the most recent prefill):

    * ``kept``: one LongTensor per pruning stage, [batch, n_kept], sorted indices into the prompt's
      visual tokens (0..575 for LLaVA-1.5): the tokens the stage kept. Methods that merge tokens
      (SparseVLM) give each merged token the id N, N+1, ... (N = visual tokens per sample) in order of
      creation, so a later stage that keeps a merged token lists an id >= N after the real ones;
      ``kept[s][kept[s] < N]`` are the original tokens.
    * ``merged``: per stage, [batch, c] ids of the tokens the stage inserted after its kept visual
      tokens (None when it inserted none); the visual tokens after stage s are ``kept[s]`` then ``merged[s]``.
    * ``stats``: a ``PruneStats`` with the tokens entering every decoder layer.
    * ``heads``: per stage, the heads chosen for each sample (None for methods that do not select heads).
    * ``attention``: per stage, the [batch, heads, n_visual] float32 last-query attention to the visual
      tokens that the stage scored with (None for stages without an attention signal), for plots.
    * ``instructions``: each sample's instruction text as the method received it
      (``StageContext.instructions``; None for methods without ``needs_instructions``).

    Instruction texts (methods with ``needs_instructions``, e.g. CDPruner): per prefill, the explicit texts
    of ``set_instructions`` when given, else each sample's prompt decoded with the processor bound at
    ``apply(..., processor=...)`` (``finepruner.models.instructions.decode_instructions``).
    """

    def __init__(self, model: nn.Module, method: PruningMethod, processor=None) -> None:
        self.model = model
        self.method = method
        self.adapter = adapter_for(model)
        self.kept: list[torch.Tensor] = []
        self.stats: PruneStats | None = None
        self.heads: list[list[torch.Tensor] | None] = []
        self.attention: list[torch.Tensor | None] = []
        self.merged: list[torch.Tensor | None] = []
        self.instructions: list[str] | None = None
        self._plans: dict[int, list[Stage]] = {}
        # this call's (visual-token mask, per-sample keys, visual tokens per image or None)
        self._pending: tuple[torch.Tensor | None, list[int], list[int] | None] | None = None
        self._hook = None
        self._tower_hook = None
        # crops the vision tower encoded for the current images (PruneStats.crops); a tower call after a
        # prefill took the count starts a new one (generate(use_cache=False) reuses the same encoding)
        self._crops: int | None = None
        self._crops_taken = False
        self._grids: list[tuple[int, int, int]] = []
        self._vision: VisionCapture | None = None  # vision-side hooks for methods with ``needs_vision``
        # generate(use_cache=False) passes the same pre-encoded images (``mm_encoder_outputs``) to every
        # step, which re-prunes the whole prompt: the signals taken at the first step serve the later ones
        self._encoder_outputs = None  # this call's mm_encoder_outputs
        # (their source, the signals: one VisionSignals, or one per image on families that pack crops)
        self._vision_taken: tuple[weakref.ref, VisionSignals | list[VisionSignals] | None] | None = None
        self._prompt_ids: list[list[int]] | None = None
        # this prefill's (explicit texts or None, prompt ids) for methods with ``needs_instructions``
        self._instructions: tuple[list[str] | None, list[list[int]]] | None = None
        # the tokenizer that decodes each sample's instruction (processor= of apply; a method's own otherwise)
        self._tokenizer = as_tokenizer(processor, "processor")
        if self._tokenizer is None:
            self._tokenizer = method.bound_tokenizer()
        # validate the parameters against the model now, before any expensive work
        self._check_vision_signals()
        #: whether kept tokens are renumbered (the method's ``positions`` as the family defines it)
        self.renumber = self.adapter.renumbers(method)
        self._check_budget(processor)
        method.bind_model(model)
        self._plans.clear()  # a bound method may plan differently (e.g. per crop on LLaVA-NeXT)

    def _check_budget(self, processor) -> None:
        """The method's plan and model checks at ``apply`` (``methods.base.check_shape``, ``spec/models.md``
        §5.1). A fixed count (LLaVA-1.5: 576 per sample): every check, at that count. Variable counts (Qwen,
        LLaVA-NeXT, OneVision): only what no image the processor can produce fits, from the smallest image's
        count (``budget_floor``) to the largest (``budget_bound``); each
        image's own count is checked by :meth:`plan` at its prefill, before the language model runs."""
        adapter = self.adapter
        bound = adapter.budget_bound(processor)
        smallest = min(bound, adapter.budget_floor(processor)) if adapter.per_image_budget else 1
        check_shape(self.method, ModelShape(adapter.num_layers, adapter.num_heads, bound,
                                            variable=adapter.per_image_budget, min_visual=smallest))

    def _check_vision_signals(self) -> None:
        """A ValueError when the method reads a vision-side signal this model family does not provide."""
        supported = self.adapter.vision_signals_supported()
        needs = self.method.required_vision(self.model)
        if supported is None or not needs:
            return
        # a per-layer name (``received_attention@l``, set by a method bound to a model before) is the
        # family's ``received_attention`` at that layer
        generic = {"received_attention" if name.startswith(RECEIVED_PREFIX) else name for name in needs}
        missing = sorted(generic - supported)
        if missing:
            raise ValueError(
                f"{self.method.name} reads the vision signal(s) {', '.join(missing)}, which finepruner does not "
                f"provide on {self.adapter.family} ({self.adapter.vision_unsupported_reason()}); available there: "
                f"{', '.join(sorted(supported)) or 'none'}"
            )

    # -- installation -------------------------------------------------------------------------
    def _install(self) -> None:
        lm = self.adapter.language_model
        if getattr(lm, _HANDLE_ATTRIBUTE, None) is not None:
            raise RuntimeError("a finepruner method is already applied to this model; remove() it first")
        if "forward" in vars(lm):
            raise RuntimeError("the language model's forward is already replaced by other code")
        lm.forward = functools.partial(pruned_forward, lm, self)
        setattr(lm, _HANDLE_ATTRIBUTE, self)
        self._hook = self.adapter.llava_model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)
        self._tower_hook = self.adapter.vision_tower.register_forward_pre_hook(self._count_crops, with_kwargs=True)
        needs = set(self.method.needs_vision)
        supported = self.adapter.vision_signals_supported()
        # families with per-image budgets give projected features from the language model's input itself
        if needs and (supported is None or needs - {"projected_features"}):
            self._vision = self.adapter.make_vision_capture(self.method.needs_vision)

    def remove(self) -> None:
        """Restore the model: the original forward, no hooks, no attributes left behind."""
        lm = self.adapter.language_model
        if getattr(lm, _HANDLE_ATTRIBUTE, None) is self:
            del lm.forward
            delattr(lm, _HANDLE_ATTRIBUTE)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._tower_hook is not None:
            self._tower_hook.remove()
            self._tower_hook = None
        if self._vision is not None:
            self._vision.remove()
            self._vision = None
        self._vision_taken = self._encoder_outputs = None

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- engine interface ---------------------------------------------------------------------
    def plan(self, num_visual: int) -> list[Stage]:
        """The method's stages for ``num_visual`` visual tokens per sample (per image on families with
        variable counts; cached, validated). A refused count there names the image's count in the error."""
        if num_visual not in self._plans:
            try:
                stages = self.method.plan(self.adapter.num_layers, num_visual)
            except ValueError as err:
                if not self.adapter.per_image_budget:
                    raise
                raise ValueError(
                    f"{err} [an image of {num_visual} visual tokens in this batch: on {self.adapter.family} "
                    "budgets apply to each image's own count, checked at its prefill]"
                ) from None
            self._plans[num_visual] = sorted(stages, key=lambda s: s.layer)
        return self._plans[num_visual]

    def _check_image_counts(self, counts: Sequence[int] | None) -> None:
        """Plan every image count of a prefill now (before its images are encoded where the counts are known
        from the inputs, and before the language model runs): a budget one image cannot take raises here."""
        for count in dict.fromkeys(counts or ()):
            self.plan(int(count))

    def set_instructions(self, texts: Sequence[str] | None) -> None:
        """Instruction texts (one per sample, used as given) for the next prefill only; they take precedence
        over decoding the prompt. For beams or several returned sequences pass one text per prompt."""
        self.method.set_instructions(texts)

    def _capture_inputs(self, module, args, kwargs):
        """Pre-hook on the multimodal model: remember the image-token mask and per-sample keys of this call
        (and, for methods with ``needs_instructions``, each sample's instruction text). On families with
        per-image budgets the images are encoded here, as ``generate`` does before its prefill, so that each
        image's token count is known (the call then receives ``mm_encoder_outputs`` instead of pixels)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._prompt_ids = None
        self._instructions = None
        self._encoder_outputs = kwargs.get("mm_encoder_outputs")
        encoded_any = any(v is not None for v in (kwargs.get("mm_encoder_outputs") or {}).values())
        if kwargs.get("pixel_values") is None and not encoded_any:
            self._pending = None  # no image in this call (e.g. a decode step)
            return None
        self._pending = None
        counts = None
        if self.adapter.per_image_budget and kwargs.get("pixel_values") is not None:
            self._check_image_counts(self.adapter.image_token_counts(kwargs))  # Qwen: from image_grid_thw
        changed = self.adapter.prepare_prefill(module, kwargs)  # e.g. Qwen: explicit 3-D positions
        if changed is not None:
            kwargs = changed
        if self.adapter.per_image_budget:
            encoded = (self._encoder_outputs or {}).get("image")
            if encoded is None and kwargs.get("pixel_values") is not None:
                encoded = self.adapter.encode_images(module, kwargs)
                changed = {**kwargs, "pixel_values": None,
                           "mm_encoder_outputs": {**(self._encoder_outputs or {}), "image": encoded}}
                self._encoder_outputs = changed["mm_encoder_outputs"]
            if encoded is not None:
                counts = [int(features.shape[0]) for features in encoded.pooler_output]
                self._check_image_counts(counts)
        image_mask = self.adapter.image_mask(input_ids, kwargs.get("inputs_embeds"))
        keys: list[int] = []
        prompts: list[list[int]] = []  # each sample's prompt tokens, padding removed (for needs_vision)
        if input_ids is not None and image_mask is not None and bool(image_mask.any()):
            attention_mask = kwargs.get("attention_mask")
            for row, ids in enumerate(input_ids.tolist()):
                if attention_mask is not None:
                    ids = [t for t, m in zip(ids, attention_mask[row].tolist(), strict=True) if m]
                keys.append(hash(tuple(ids)))
                prompts.append(ids)
        explicit = self.method.take_instructions()  # set for this prefill only
        if self.method.needs_instructions:
            if explicit is None:
                self._check_decodable(prompts)
            self._instructions = (explicit, prompts)  # decoded by _take_instructions, in the selection time
        self._prompt_ids = prompts or None
        self._pending = (image_mask, keys, counts)
        return (args, changed) if changed is not None else None

    def _check_decodable(self, prompts: list[list[int]]) -> None:
        """A clear error, before the model runs, when this prefill's instructions cannot be decoded: no
        processor bound at ``apply``, or no ``input_ids`` with ``<image>`` tokens in the call."""
        name = self.method.name
        if self._tokenizer is None:
            raise RuntimeError(
                f"{name} needs each sample's instruction text: pass processor= to finepruner.apply (the LLaVA "
                "processor or tokenizer, to decode it from the prompt), or call handle.set_instructions([...]) "
                "before each generate"
            )
        if not prompts:
            raise RuntimeError(
                f"{name} needs each sample's instruction text, but this call has no input_ids with <image> "
                "tokens to decode it from; call handle.set_instructions([...]) before the call"
            )

    def _take_pending(self, shape: torch.Size) -> tuple[torch.Tensor | None, list[int], list[int] | None]:
        """The image mask, per-sample keys and per-image token counts (None on families with per-sample
        budgets) captured for this call (consumed), or (None, [], None) when the LM is called alone."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is None or tuple(pending[0].shape) != tuple(shape):
            return None, [], None
        image_mask, keys, counts = pending
        if not keys:
            keys = list(range(shape[0]))
        return image_mask, keys, counts

    def _count_crops(self, module, args, kwargs) -> None:
        """Pre-hook on the vision tower: count the crops (images, or anyres base + tiles) it encodes; towers
        that encode every image at its own grid (Qwen) count images and record their patch grids."""
        if self._crops_taken or self._crops is None:
            self._crops, self._crops_taken, self._grids = 0, False, []
        grids = self.adapter.tower_grids(args, kwargs)
        if grids is not None:
            self._crops += len(grids)
            self._grids.extend(grids)
            return
        pixels = args[0] if args else kwargs.get("pixel_values")
        if isinstance(pixels, torch.Tensor):
            self._crops += int(pixels.shape[0])

    def _take_crops(self) -> int | None:
        """Crops encoded for this prefill's images (None when the tower did not run under this handle)."""
        self._crops_taken = True
        return self._crops

    def _taken_grids(self) -> list[tuple[int, int, int]] | None:
        """The patch grids of the crops ``_take_crops`` counted (towers with per-image grids), else None."""
        return list(self._grids) if self._grids else None

    def _discard_vision(self) -> None:
        """Drop the vision signals captured for this prefill (a prefill that does not use them)."""
        if self._vision is not None:
            self._vision.reset()

    def _take_prompt_ids(self) -> list[list[int]] | None:
        """This prefill's prompt ids per sample, padding removed (consumed)."""
        prompt_ids, self._prompt_ids = self._prompt_ids, None
        return prompt_ids

    def _take_vision(self, batch: int, num_visual: int) -> VisionSignals | None:
        """The vision signals captured while this prefill's images were encoded (consumed), or None when
        the method declares no ``needs_vision``."""
        if self._vision is None:
            return None
        prompt_ids, self._prompt_ids = self._prompt_ids, None
        source = _encoded_images(self._encoder_outputs)
        if source is not None and self._vision_taken is not None and self._vision_taken[0]() is source:
            return self._vision_taken[1]  # the same encoded images again (a no-cache generate step)
        signals = self._vision.take(batch, num_visual, prompt_ids)
        self._vision_taken = (weakref.ref(source), signals) if source is not None else None
        return signals

    def _take_image_vision(self) -> list[VisionSignals] | None:
        """Families that pack crops: the signals of this prefill's encoded images, one ``VisionSignals`` per
        image in encoding order (``VisionCapture.take_images``, consumed); None without a capture (the method
        reads only projected features) or when no image was encoded under the handle."""
        if self._vision is None:
            return None
        source = _encoded_images(self._encoder_outputs)
        if source is not None and self._vision_taken is not None and self._vision_taken[0]() is source:
            return self._vision_taken[1]  # the same encoded images again (a no-cache generate step)
        images = self._vision.take_images()
        self._vision_taken = (weakref.ref(source), images) if source is not None else None
        return images

    def _take_instructions(self, batch: int) -> list[str] | None:
        """This prefill's instruction texts for a batch of ``batch`` rows (consumed), or None when the
        method declares no ``needs_instructions``. ``generate`` may repeat every sample for beams after the
        texts were given: each text is then repeated the same way."""
        pending, self._instructions = self._instructions, None
        if pending is None:
            if self.method.needs_instructions:
                raise RuntimeError(f"{self.method.name}: no instruction texts were captured for this prefill "
                                   "(the language model was called without LlavaModel)")
            return None
        explicit, prompts = pending
        texts = explicit if explicit is not None else decode_instructions(
            self._tokenizer, prompts, self.adapter.image_token_id, self.adapter.instruction_stop)
        texts = repeat_for_batch(texts, batch)
        if explicit is not None and len(explicit) != batch and len(prompts) == batch:
            repeat = batch // len(explicit)
            if any(prompts[row] != prompts[row - row % repeat] for row in range(batch)):
                raise ValueError(
                    f"{len(explicit)} instruction texts for a batch of {batch} rows that are not {len(explicit)} "
                    f"prompts each repeated {repeat} times; pass one text per sample"
                )
        self.instructions = texts
        return texts

    def _record(self, kept, stats, heads, attention, merged=None) -> None:
        self.kept, self.stats, self.heads, self.attention = kept, stats, heads, attention
        self.merged = merged if merged is not None else [None] * len(kept)


def apply(model: nn.Module, method: str | PruningMethod, /, *, processor=None, **params) -> Handle:
    """Apply a pruning method to ``model`` in place and return its ``Handle``.

    ``method`` is a registered name (``finepruner.methods.available()``) with its parameters as
    keywords, or a method instance. ``processor`` (the LLaVA processor or tokenizer that builds the
    prompts, as ``finepruner.load_model`` returns it) is bound to the handle: methods that read the
    instruction text (``needs_instructions``, e.g. CDPruner) get each sample's text decoded from its
    prompt; pass it at every entry point that has it (other methods ignore it). Example::

        with finepruner.apply(model, "fastv", tokens=64, K=2, processor=processor) as handle:
            out = model.generate(**inputs, max_new_tokens=16)
        handle.kept[0]   # [batch, 64] indices of the kept visual tokens
    """
    if isinstance(method, str):
        method = create(method, **params)
    elif params:
        raise ValueError("parameters go to the method's constructor when a method instance is passed")
    handle = Handle(model, method, processor)
    handle._install()
    return handle


def _encoded_images(mm_encoder_outputs) -> object | None:
    """The pre-encoded image output inside ``generate``'s ``mm_encoder_outputs`` (held weakly by the
    handle, so that it is freed with the generation), or None."""
    if not isinstance(mm_encoder_outputs, dict):
        return None
    encoded = mm_encoder_outputs.get("image")
    try:
        weakref.ref(encoded)
    except TypeError:
        return None
    return encoded

