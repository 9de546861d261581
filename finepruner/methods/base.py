"""The contract between pruning methods and the engine.

A method is a small object that (1) plans its stages for a model shape: where it prunes and how many
visual tokens each stage keeps, and which signal it needs; and (2) selects, at each stage, which of the
current visual tokens to keep. Methods never touch hidden states, masks, positions or caches: the
engine (``finepruner.engine.loop``) does that (``DESIGN.md``, "Contracts").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from finepruner.models.instructions import check_texts

if TYPE_CHECKING:
    from torch import nn

    from finepruner.engine.signals import StageSignals
    from finepruner.engine.vision import VisionSignals

Positions = Literal["original", "renumber"]
POSITION_MODES: tuple[str, ...] = ("original", "renumber")


@dataclass(frozen=True)
class ModelShape:
    """What a method's plan and defaults depend on: decoder layers, attention heads per layer and
    visual tokens per sample (e.g. read from a checkpoint's ``config.json``, no weights loaded).

    ``variable``: the family's images have their own counts (Qwen, LLaVA-NeXT, OneVision; ``spec/models.md``
    §5.1); ``num_visual`` is then the largest image's count and ``min_visual`` the smallest's, and budgets
    that depend on the count are checked per image at its prefill (``check_shape``)."""

    num_layers: int
    num_heads: int
    num_visual: int
    variable: bool = False
    min_visual: int = 1


@dataclass(frozen=True)
class Stage:
    """One pruning point.

    Attributes:
        layer: the decoder layer whose *input* is pruned; 0 prunes before the language model,
            ``k`` prunes after ``k`` decoder layers have run.
        keep: visual tokens kept by this stage (per sample, all images of a prompt together).
        score_layer: decoder layer whose q/k projections give the last-query attention signal, or
            None when the method needs no attention signal.
        last_query: with a ``score_layer``, whether the engine fills ``StageContext.attention`` with the
            last-query row; False for methods that ask ``StageContext.signals`` for other rows instead.
        insert: tokens the stage inserts right after the kept visual tokens (``Selection.insert``, e.g.
            SparseVLM's merged tokens); None when the count is only known at selection time.

    ``keep`` may be None when the count is only known at selection time (data-dependent budgets); the
    selection must then still give every sample of a batch the same count.
    """

    layer: int
    keep: int | None
    score_layer: int | None = None
    last_query: bool = True
    insert: int | None = 0


@dataclass
class StageContext:
    """What a method sees at one stage of one prefill.

    Attributes:
        attention: [B, heads, V] float32 attention of the last prompt token to the current visual
            tokens (None unless the stage asked for it with ``score_layer``).
        visual_ids: [B, V] original indices (0..N-1) of the current visual tokens.
        row_keys: one integer per sample derived from its prompt tokens, for batch-invariant seeding.
        heads: filled by methods that select heads: one LongTensor of head indices per sample.
        vision: vision-side signals (``finepruner.engine.vision``) of this prefill, indexed by original
            visual ids; None unless the method declares ``needs_vision``.
        signals: language-side signals of this stage, computed on demand (``engine.signals.StageSignals``:
            hidden states, positions, the prefill input, attention rows of chosen queries).
        instructions: each sample's instruction text, in batch order (``finepruner.models.instructions``:
            the explicit texts of ``set_instructions``, else decoded from the prompt with the processor
            bound at ``apply``); None unless the method declares ``needs_instructions``.

    Visual ids of tokens inserted by earlier stages (``Selection.insert``) are ``N, N+1, ...`` in
    order of creation (N = visual tokens per sample), so ids stay increasing along the sequence.
    """

    attention: torch.Tensor | None
    visual_ids: torch.Tensor
    row_keys: list[int]
    heads: list[torch.Tensor] | None = field(default=None)
    vision: VisionSignals | None = field(default=None)
    signals: StageSignals | None = field(default=None)
    instructions: list[str] | None = field(default=None)

    @property
    def num_visual(self) -> int:
        return self.visual_ids.shape[1]

    def require_vision(self, method: str, *names: str, projector: bool = False) -> VisionSignals:
        """This prefill's vision signals, checked to hold ``names`` (and the projector, for methods that
        project merged or pooled features); a missing one raises naming ``method``."""
        if self.vision is None:
            raise RuntimeError(f"{method}: no vision signals reached the selection (engine error)")
        self.vision.require(method, *names)
        if projector and self.vision.project is None:
            raise RuntimeError(f"{method}: merged tokens need the model's projector (engine error)")
        return self.vision


@dataclass
class Selection:
    """A stage's choice when it also inserts tokens (``Stage.insert``).

    Attributes:
        keep: [B, k] sorted indices into the current visual tokens to keep.
        insert: [B, c, D] hidden states inserted right after the kept visual tokens (before the text);
            they count as visual tokens in later stages. None: nothing inserted.
        insert_from: [B, c] index into the current visual tokens whose position id an inserted token
            takes with ``positions="original"`` (e.g. its cluster centre); with ``"renumber"`` inserted
            tokens take the next contiguous positions after the kept visual tokens.
        insert_valid: [B, c] bool, for samples that insert fewer tokens than others (data-dependent counts,
            e.g. adaptive PruMerge): False marks a padding slot, masked out of attention and skipped by the
            renumbered positions, so each sample sees only its own tokens. None: every slot is a token.
    """

    keep: torch.Tensor
    insert: torch.Tensor | None = None
    insert_from: torch.Tensor | None = None
    insert_valid: torch.Tensor | None = None


class PruningMethod:
    """Base class of all methods. Subclasses set ``name`` and ``default_positions`` and implement
    ``plan`` and ``select``; their ``__init__`` keyword arguments are the method's parameters."""

    name: ClassVar[str] = ""
    #: Position ids of kept tokens after pruning: the method's official default.
    default_positions: ClassVar[Positions] = "original"
    #: Vision-side signals the method reads (names from ``finepruner.engine.vision.VISION_SIGNALS``).
    needs_vision: ClassVar[tuple[str, ...]] = ()
    #: Whether the method reads each sample's instruction text (``StageContext.instructions``); the engine
    #: then needs ``apply(..., processor=...)`` or explicit texts (``set_instructions``) at every prefill.
    needs_instructions: ClassVar[bool] = False
    #: Whether the method's stages rank tokens by the engine's last-query attention and take a
    #: ``score_impl`` option (``fastv``, ``pdrop``, ``finepruner``); ``finepruner bench --eager-scoring``.
    scores_attention: ClassVar[bool] = False
    #: Explicit instruction texts for the next prefill (``set_instructions``), consumed by the engine.
    _explicit_instructions: list[str] | None = None

    def __init__(self, positions: Positions | None = None) -> None:
        if positions is not None and positions not in POSITION_MODES:
            raise ValueError(f"{self.name}: positions={positions!r}; allowed: {POSITION_MODES}")
        self.positions: Positions = positions or self.default_positions
        self._explicit_positions = positions is not None

    @property
    def explicit_positions(self) -> bool:
        """Whether ``positions`` was given (not the method's default): families with 3-D positions refuse an
        explicit ``"renumber"`` and keep original positions otherwise (``ModelAdapter.renumbers``)."""
        return getattr(self, "_explicit_positions", False)

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        """Stages for a model with ``num_layers`` decoder layers and ``num_visual`` visual tokens per
        sample, sorted by layer. Raise ``ValueError`` when the parameters do not fit the model."""
        raise NotImplementedError

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor | Selection:
        """Indices into the current visual tokens to keep: LongTensor [B, stage.keep], sorted; or a
        ``Selection`` when the stage also inserts tokens."""
        raise NotImplementedError

    def check_model(self, num_heads: int, num_layers: int, num_visual: int) -> None:
        """Further validation against the model (e.g. head counts, calibration files); default: none."""

    def bind_counts(self, variable: bool) -> None:
        """Called by ``apply`` before validation: ``variable`` is True on families whose images have their own
        visual-token counts (Qwen, LLaVA-NeXT, OneVision: ``plan`` gets each image's count at its prefill),
        False where the count is fixed (LLaVA-1.5). A method whose budget is a schedule for one count maps it
        here (SparseVLM: onto each image's count); default: none."""

    def check_counts(self, num_layers: int, smallest: int, largest: int) -> None:
        """Validation at ``apply`` on families whose images have variable visual-token counts
        (``spec/models.md`` §5.1): raise ``ValueError`` only for parameters that fit *no* count in
        ``smallest..largest`` (each image's own count is checked by ``plan`` at its prefill). Default:
        ``plan`` at ``largest``, else at the counts of ``count_ladder`` (budgets bounded above, below or on
        both sides by the count); when none fits, the error at ``largest``."""
        try:
            self.plan(num_layers, largest)
            return
        except ValueError as err:
            refused = err
        for count in count_ladder(smallest, largest):
            try:
                self.plan(num_layers, count)
                return
            except ValueError:
                continue
        raise refused

    def required_vision(self, model: nn.Module) -> tuple[str, ...]:
        """The vision signals the method will read on ``model`` (checked at ``apply`` before ``bind_model``);
        default: ``needs_vision``."""
        return tuple(self.needs_vision)

    def bind_model(self, model: nn.Module) -> None:
        """Called by ``apply`` once the plan is validated, with the model the method is applied to: resolve
        model-side resources (CDPruner: the CLIP text tower shipped in the model's folder); default: none."""

    def bound_tokenizer(self):
        """A tokenizer the method was constructed with (CDPruner's deprecated ``tokenizer=``), used to decode
        the instructions when ``apply`` gets no ``processor``; default None."""
        return None

    def set_instructions(self, texts: Sequence[str] | None) -> None:
        """Instruction texts for the next prefill only: one per sample, or one per prompt when ``generate``
        repeats samples (beams); used as given and taking precedence over decoding the prompt. None clears
        them. ``Handle.set_instructions`` is the same call."""
        self._explicit_instructions = None if texts is None else check_texts(texts)

    def take_instructions(self) -> list[str] | None:
        """The explicit texts for this prefill, consumed (the engine calls this once per prefill)."""
        texts, self._explicit_instructions = self._explicit_instructions, None
        return texts

    def describe(self) -> dict:
        """Parameters as a JSON-serialisable dict (recorded with every run)."""
        described: dict = {"method": self.name}
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            if hasattr(value, "as_dict"):
                described.update(value.as_dict())
            else:
                described[key] = value
        return described

    @classmethod
    def defaults_for(cls, shape: ModelShape, params: Mapping) -> dict:
        """``params`` completed with what makes the method runnable on a model of ``shape`` (values the
        user gave win; e.g. ``finepruner``'s head count, SparseVLM's schedule off LLaVA-1.5). Used by
        ``finepruner bench``, the toy grid and the demo; ``apply`` never calls it. Default: ``params``."""
        return dict(params)


def require_default_features(method: str, model: nn.Module, why: str) -> None:
    """Methods that read the patch grid need LLaVA's ``vision_feature_select_strategy="default"`` (the
    [CLS] row dropped from the projected features); raises ``ValueError`` saying ``why``."""
    strategy = getattr(model.config, "vision_feature_select_strategy", None)
    if strategy != "default":
        raise ValueError(f"{method}: vision_feature_select_strategy={strategy!r}; {method} needs 'default' ({why})")


def text_after_visual(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [B, T], valid [B, T])`` in the prefill input of every real text token after the
    selection's last visual token (the instruction and the template tail; padding and other images' visual
    tokens are not valid, ``spec/models.md`` §5.2); rows with fewer such tokens are padded (valid False).
    SparseVLM rates the visual tokens from them; ``finepruner``'s ``query="instruction"`` ranks from them."""
    signals = ctx.signals
    visual, length = signals.input_visual_index, signals.inputs_embeds.shape[1]
    last = visual[:, -1:]
    span = max(1, length - 1 - int(last.min()))
    text = last + 1 + torch.arange(span, device=visual.device)[None]
    valid = text < length
    text = text.clamp(max=length - 1)
    if signals.input_mask2d is not None:
        valid &= signals.input_mask2d.gather(1, text).bool()
    if signals.input_image_mask is not None:
        valid &= ~signals.input_image_mask.gather(1, text)
    return text, valid


def check_shape(method: PruningMethod, shape: ModelShape) -> None:
    """The checks ``apply`` runs before any prefill (``finepruner.engine.handle.Handle``), from the model's
    shape alone: with a fixed count (LLaVA-1.5) the plan at ``num_visual`` and ``check_model``; with
    ``shape.variable`` only what no image of ``min_visual..num_visual`` tokens fits
    (``PruningMethod.check_counts``), each image's own count being checked at its prefill. Calls
    ``bind_counts`` first. Raises ``ValueError``."""
    method.bind_counts(shape.variable)
    if shape.variable:
        method.check_counts(shape.num_layers, min(shape.min_visual, shape.num_visual), shape.num_visual)
    else:
        method.plan(shape.num_layers, shape.num_visual)
    method.check_model(shape.num_heads, shape.num_layers, shape.num_visual)


def count_ladder(smallest: int, largest: int, steps_per_octave: int = 8) -> list[int]:
    """Visual-token counts from ``smallest`` to ``largest`` (both included) in geometric steps of
    ``2 ** (1 / steps_per_octave)`` (every integer where the steps are below 1): the counts
    ``PruningMethod.check_counts`` tries by default."""
    smallest, largest = max(1, int(smallest)), max(1, int(largest))
    counts, value = {smallest, largest}, float(smallest)
    while value < largest:
        counts.add(int(round(value)))
        value = max(value + 1.0, value * 2 ** (1 / steps_per_octave))
    return sorted(c for c in counts if smallest <= c <= largest)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, in ascending index order (original token order)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def check_layer(method: str, name: str, value: int, low: int, high: int) -> None:
    """Raise a ValueError unless ``low <= value <= high``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{method}: {name}={value!r} is out of range; allowed: integers {low}..{high}")


def check_tokens(method: str, tokens: int, num_visual: int, low: int = 1) -> None:
    """Raise a ValueError unless ``low <= tokens <= num_visual``."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not low <= tokens <= num_visual:
        raise ValueError(
            f"{method}: tokens={tokens!r} is not allowed; this model has {num_visual} visual tokens per "
            f"sample, so tokens must be an integer in {low}..{num_visual}"
        )
