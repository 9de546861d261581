"""The engine's instruction path: each sample's instruction text reaches any method that declares
``needs_instructions`` (``StageContext.instructions``), decoded with the processor bound at ``apply``."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods import PruningMethod, Stage, StageContext
from finepruner.models.instructions import decode_instructions
from tests.conftest import PROMPTS, noise_images

#: The instruction of each of conftest's PROMPTS, as the tiny tokenizer decodes it.
INSTRUCTIONS = [
    "what color is the circle?",
    "how many red objects are there in this image? answer using a single word.",
    "is there a square?",
]


class Recorder(PruningMethod):
    """Keeps the first visual tokens at two stages and records what each stage was handed."""

    name = "recorder"
    needs_instructions = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str] | None] = []

    def plan(self, num_layers: int, num_visual: int) -> list[Stage]:
        return [Stage(layer=0, keep=num_visual // 2), Stage(layer=2, keep=num_visual // 4)]

    def select(self, stage_index: int, stage: Stage, ctx: StageContext) -> torch.Tensor:
        self.seen.append(ctx.instructions)
        return torch.arange(stage.keep).expand(ctx.visual_ids.shape[0], -1)


class Blind(Recorder):
    name = "blind"
    needs_instructions = False


def run(model, inputs, **generate):
    with torch.no_grad():
        if generate:
            model.generate(**inputs, max_new_tokens=2, do_sample=False, **generate)
        else:
            model(**inputs)


def test_each_sample_gets_its_instruction_in_order(tiny, batch):
    model, processor = tiny
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # left padded, prompts of different lengths
    method = Recorder()
    with finepruner.apply(model, method, processor=processor) as handle:
        run(model, batch)
        assert method.seen == [INSTRUCTIONS, INSTRUCTIONS]  # both stages, per sample, in batch order
        assert handle.instructions == INSTRUCTIONS
        order = [2, 0, 1]
        shuffled = processor(images=[noise_images(3)[i] for i in order], text=[PROMPTS[i] for i in order],
                             return_tensors="pt", padding=True)
        method.seen.clear()
        run(model, shuffled)
    assert method.seen[0] == [INSTRUCTIONS[i] for i in order]


def test_methods_without_the_need_get_none(tiny, batch):
    model, processor = tiny
    method = Blind()
    with finepruner.apply(model, method, processor=processor) as handle:
        run(model, batch)
    assert method.seen == [None, None] and handle.instructions is None


def test_explicit_texts_take_precedence_for_one_prefill(tiny, batch):
    model, processor = tiny
    method = Recorder()
    with finepruner.apply(model, method, processor=processor) as handle:
        handle.set_instructions(["a", "b", "c"])
        run(model, batch)
        run(model, batch)  # the explicit texts were for one prefill: decoded again
        method.set_instructions(["x", "y", "z"])  # the method's own call is the same path
        run(model, batch)
    assert [seen for seen in method.seen[::2]] == [["a", "b", "c"], INSTRUCTIONS, ["x", "y", "z"]]


def test_beams_repeat_the_texts_like_the_samples(tiny, batch):
    model, processor = tiny
    method = Recorder()
    with finepruner.apply(model, method, processor=processor) as handle:
        run(model, batch, num_beams=2, num_return_sequences=2)
        assert handle.instructions == [t for t in INSTRUCTIONS for _ in range(2)]
        handle.set_instructions(["a", "b", "c"])
        run(model, batch, num_beams=2)
        assert handle.instructions == ["a", "a", "b", "b", "c", "c"]
        handle.set_instructions(["a", "b", "c", "d"])
        with pytest.raises(ValueError, match="4 instruction texts for a batch of 6"):
            run(model, batch, num_beams=2)
        handle.set_instructions(["a"])  # divides the batch, but the rows are three different prompts
        with pytest.raises(ValueError, match="1 instruction texts for a batch of 3 rows that are not 1 prompts"):
            run(model, batch)


def test_missing_processor_is_a_clear_error_before_any_forward(tiny, batch):
    model, _ = tiny
    calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with finepruner.apply(model, Recorder()) as handle:
            with pytest.raises(RuntimeError, match=r"recorder needs each sample's instruction text: pass processor="):
                run(model, batch)
            assert not calls  # the vision tower never ran
            handle.set_instructions(INSTRUCTIONS)  # explicit texts need no processor
            run(model, batch)
            assert handle.instructions == INSTRUCTIONS
    finally:
        hook.remove()


def test_bad_processor_and_texts_are_clear_errors(tiny, batch):
    model, _ = tiny
    with pytest.raises(TypeError, match="processor: int has no decode"):
        finepruner.apply(model, Recorder(), processor=3)
    assert "forward" not in vars(model.model.language_model)  # nothing was installed
    with finepruner.apply(model, Recorder()) as handle:
        with pytest.raises(TypeError, match="expected a list of strings"):
            handle.set_instructions("what color is the circle?")
        with pytest.raises(TypeError, match="every text must be a str"):
            handle.set_instructions(["a", None, "c"])


def test_decoding_matches_the_prompt_tails(tiny, batch):
    _, processor = tiny
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert decode_instructions(processor.tokenizer, ids, image_token_id) == INSTRUCTIONS
