"""The engine on Qwen2.5-VL (and Qwen2-VL): 3-D mRoPE positions, images at their own resolution.

References are plain transformers (``spec/models.md`` §7.2): ``generate`` without a method, the language
model run by hand on the kept tokens with their gathered 3-D positions, eager attentions per sample.
Inputs come from ``finepruner.models.qwen_processor`` (equal to the official processor, tested in
``tests/test_qwen_processor.py``).
"""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods import available
from finepruner.methods import get as method_class
from finepruner.methods.base import ModelShape, PruningMethod, Stage
from finepruner.models.adapters import Qwen2_5_VLAdapter, Qwen2VLAdapter, adapter_for, families
from finepruner.models.tiny_families import build_tiny_qwen2_5_vl, build_tiny_qwen2_vl, qwen_inputs, tiny_image

QUESTIONS = ["what color is the circle ?", "how many red objects are there ?", "which one is on the left ?",
             "what is the color of the sky ?"]
#: 24, 9, 12 + 8 visual tokens and a text-only row (168x112 -> grid 8x12; 84x84 -> 6x6; 112x84; 56x112).
IMAGES = [[tiny_image(168, 112, 1)], [tiny_image(84, 84, 2)], [tiny_image(112, 84, 3), tiny_image(56, 112, 4)], []]
COUNTS = [[24], [9], [12, 8], []]


class QwenFamily:
    def __init__(self, name: str, attn: str) -> None:
        build = build_tiny_qwen2_5_vl if name == "qwen2_5_vl" else build_tiny_qwen2_vl
        self.name = name
        self.model, self.processor = build(seed=0, attn=attn, qk_scale=8.0)
        self.image_token = int(self.model.config.image_token_id)

    def prompt(self, row: int) -> str:
        content = [{"type": "image"} for _ in IMAGES[row]] + [{"type": "text", "text": QUESTIONS[row]}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def inputs(self, rows: list[int] | None = None) -> dict:
        rows = list(range(len(QUESTIONS))) if rows is None else rows
        return qwen_inputs(self.processor, [self.prompt(r) for r in rows], [IMAGES[r] for r in rows])

    def generate(self, inputs: dict, **extra):
        options = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
                   "suppress_tokens": [self.image_token], **extra}
        with torch.no_grad():
            return self.model.generate(**inputs, **options)


_CACHE: dict[tuple[str, str], QwenFamily] = {}


def family(name: str = "qwen2_5_vl", attn: str = "sdpa") -> QwenFamily:
    if (name, attn) not in _CACHE:
        torch.set_num_threads(2)
        _CACHE[(name, attn)] = QwenFamily(name, attn)
    return _CACHE[(name, attn)]


def assert_same(pruned, reference, atol: float = 1e-5) -> None:
    assert torch.equal(pruned.sequences, reference.sequences)
    for x, y in zip(pruned.scores, reference.scores, strict=True):
        finite = torch.isfinite(x) & torch.isfinite(y)
        assert (x[finite] - y[finite]).abs().max().item() <= atol


def assert_row_alone(together, alone, row: int, atol: float = 1e-4) -> None:
    new = len(alone.scores)
    start = together.sequences.shape[1] - len(together.scores)
    assert torch.equal(together.sequences[row, start:start + new], alone.sequences[0, -new:])
    for step, scores in enumerate(alone.scores):
        diff = (scores[0] - together.scores[step][row]).nan_to_num(0.0, 0.0, 0.0)
        assert diff.abs().max().item() <= atol


class KeepAll(PruningMethod):
    name = "keep_all"

    def __init__(self, layers: tuple[int, ...]) -> None:
        super().__init__(None)
        self.layers = layers

    def plan(self, num_layers, num_visual):
        return [Stage(layer=layer, keep=num_visual) for layer in self.layers]

    def select(self, stage_index, stage, ctx):
        return torch.arange(ctx.num_visual).expand(ctx.visual_ids.shape[0], -1)


class EveryOther(PruningMethod):
    """Keeps every ``step``-th current visual token of each image at each stage layer."""

    name = "every_other"
    default_positions = "renumber"  # refused when explicit; on Qwen the default becomes original positions

    def __init__(self, layers: tuple[int, ...], step: int = 2, positions: str | None = None) -> None:
        super().__init__(positions)
        self.layers, self.step = layers, step

    def plan(self, num_layers, num_visual):
        stages, count = [], num_visual
        for layer in self.layers:
            count = len(range(0, count, self.step))
            stages.append(Stage(layer=layer, keep=count))
        return stages

    def select(self, stage_index, stage, ctx):
        return torch.arange(0, ctx.num_visual, self.step)[: stage.keep].expand(ctx.visual_ids.shape[0], -1)


def test_the_qwen_families_are_registered():
    assert {"qwen2_5_vl", "qwen2_vl"} <= set(families())
    assert isinstance(adapter_for(family().model), Qwen2_5_VLAdapter)
    assert isinstance(adapter_for(family("qwen2_vl").model), Qwen2VLAdapter)


def test_the_batch_has_the_expected_counts_and_grids():
    inputs = family().inputs()
    per_row = (inputs["input_ids"] == family().image_token).sum(dim=1).tolist()
    assert per_row == [sum(c) for c in COUNTS]
    assert (inputs["image_grid_thw"].prod(-1) // 4).tolist() == [c for row in COUNTS for c in row]


# -- equivalence with plain transformers ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["vanilla", "keep_all_0", "keep_all_2", "keep_all_0_2"])
def test_keep_all_equals_transformers(name, attn, method):
    fam = family(name, attn)
    inputs = fam.inputs()
    reference = fam.generate(inputs)
    if method == "vanilla":
        applied = finepruner.apply(fam.model, "vanilla")
    else:
        layers = {"keep_all_0": (0,), "keep_all_2": (2,), "keep_all_0_2": (0, 2)}[method]
        applied = finepruner.apply(fam.model, KeepAll(layers))
    with applied:
        assert_same(fam.generate(inputs), reference)


def _methods_on(fam: QwenFamily) -> list[str]:
    supported = adapter_for(fam.model).vision_signals_supported()
    usable = []
    for name in available():
        try:
            method = method_class(name)(**_params(name, fam))
            needs = method.required_vision(fam.model)
        except (ValueError, TypeError):  # a method whose parameters or signals do not fit this family
            continue
        if set(needs) <= supported:
            usable.append(name)
    return usable


def _params(name: str, fam: QwenFamily) -> dict:
    adapter = adapter_for(fam.model)
    shape = ModelShape(adapter.num_layers, adapter.num_heads, 8)
    base = {"vanilla": {}, "pdrop": {"layers": [1, 2], "ratios": [0.5, 0.5]},
            "sparsevlm": {"layers": [0, 1, 2], "keeps": [7, 5, 3]},
            "dart": {"tokens": 4, "pivot_text_tokens": 2}}.get(name, {"tokens": 4})
    return method_class(name).defaults_for(shape, base)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["fastv", "pdrop", "random", "finepruner", "divprune", "vispruner", "cdpruner",
                                    "dart"])
def test_keep_all_budgets_through_methods_equal_transformers(attn, method):
    """A method asked to keep every token of the smallest image takes its pruning path and changes nothing."""
    fam = family("qwen2_5_vl", attn)
    inputs = fam.inputs([1])  # 9 visual tokens
    reference = fam.generate(inputs)
    params = {"pdrop": {"layers": [1, 2], "ratios": [1.0, 1.0]},
              "dart": {"tokens": 9, "pivot_text_tokens": 2, "count_pivots_in_budget": True}}.get(method, {"tokens": 9})
    params = method_class(method).defaults_for(ModelShape(4, 4, 9), params)
    with finepruner.apply(fam.model, method, processor=fam.processor, **params) as handle:
        assert_same(fam.generate(inputs), reference)
    assert handle.stats.sequence_length[-1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_padded_batch_of_different_images_equals_each_sample_alone(name):
    fam = family(name)
    inputs = fam.inputs()
    tested = []
    # Qwen2-VL shares the code path (its tower differs): the in-LLM baseline and the tower-signal ports
    methods = _methods_on(fam) if name == "qwen2_5_vl" else ["fastv", "vispruner", "cdpruner"]
    for method in methods:
        if method == "pool":
            continue
        with finepruner.apply(fam.model, method, processor=fam.processor, **_params(method, fam)) as handle:
            together = fam.generate(inputs)
            kept = [k.clone() for k in handle.kept]
            for row in range(len(QUESTIONS)):
                alone = fam.generate(fam.inputs([row]))
                assert_row_alone(together, alone, row)
                if not IMAGES[row]:
                    assert all(bool((k[row] == -1).all()) for k in kept)
                    continue
                for stage, alone_kept in enumerate(handle.kept):
                    if alone_kept.shape[1]:
                        width = alone_kept.shape[1]
                        assert torch.equal(kept[stage][row, :width], alone_kept[0]), (method, row, stage)
        tested.append(method)
    if name == "qwen2_5_vl":
        assert {"fastv", "pdrop", "sparsevlm", "random", "finepruner", "dart", "divprune", "vispruner",
                "cdpruner"} <= set(tested)


@pytest.mark.parametrize("layers", [(0,), (2,), (1, 3), (0, 2)])
def test_each_decode_step_equals_fresh_forward(layers):
    """Cached decode logits == a no-cache forward over the prompt plus the generated tokens, whose 3-D
    positions the model computes on the full sequence (the engine re-prunes the same kept set)."""
    fam = family()
    inputs = fam.inputs()
    with finepruner.apply(fam.model, EveryOther(layers)):
        out = fam.generate(inputs)
        prompt = inputs["input_ids"].shape[1]
        for step in range(1, len(out.scores)):
            ids = out.sequences[:, : prompt + step]
            ones = torch.ones(ids.shape[0], step, dtype=torch.long)
            mask = torch.cat([inputs["attention_mask"], ones], 1)
            types = torch.cat([inputs["mm_token_type_ids"], 0 * ones], 1)
            extra = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
            with torch.no_grad():
                fresh = fam.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                                  **extra).logits[:, -1]
            finite = torch.isfinite(out.scores[step])
            assert (fresh[finite] - out.scores[step][finite]).abs().max().item() <= 1e-4


def _full_positions(fam: QwenFamily, inputs: dict) -> torch.Tensor:
    """[3, B, L] mRoPE rows of the unpruned prompt (the model's own ``get_rope_index``)."""
    rows, _ = fam.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs.get("image_grid_thw"),
                                             attention_mask=inputs["attention_mask"])
    return rows


@pytest.mark.parametrize("row", [0, 2])
def test_layer0_pruning_equals_the_language_model_on_the_kept_tokens(row):
    """Pre-LLM pruning == plain transformers' language model run on the kept tokens' embeddings with their
    original 3-D positions (gathered columns of ``get_rope_index`` on the full prompt), at every step."""
    fam = family()
    inputs = fam.inputs([row])
    with finepruner.apply(fam.model, EveryOther((0,))) as handle:
        out = fam.generate(inputs)
    kept_ids = handle.kept[0][0]
    positions = _full_positions(fam, inputs)
    with torch.no_grad():
        embeds = fam.model.model.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(fam.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                             .pooler_output)
    image = (inputs["input_ids"][0] == fam.image_token).nonzero()[:, 0]
    embeds[0, image] = features
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[image] = False
    keep[image[kept_ids]] = True
    prompt_embeds, prompt_positions = embeds[:, keep], positions[:, :, keep]
    generated = out.sequences[0, inputs["input_ids"].shape[1]:]
    last = prompt_positions[:, :, -1:]
    for step in range(len(out.scores)):
        new = fam.model.model.get_input_embeddings()(generated[:step])[None]
        step_positions = last + torch.arange(1, step + 1).view(1, 1, -1)
        with torch.no_grad():
            hidden = fam.model.model.language_model(
                inputs_embeds=torch.cat([prompt_embeds, new], 1),
                position_ids=torch.cat([prompt_positions, step_positions], 2), use_cache=False).last_hidden_state
            logits = fam.model.lm_head(hidden[:, -1])
        finite = torch.isfinite(out.scores[step])
        assert (logits[finite] - out.scores[step][finite]).abs().max().item() <= 1e-4


def test_kept_tokens_keep_their_original_positions_and_decode_continues():
    """The positions the layers use after a stage are the unpruned ``get_rope_index`` columns of the kept
    tokens; ``positions="renumber"`` (explicit) is refused with the reason."""
    fam = family()
    inputs = fam.inputs([0])
    seen = []
    rotary = fam.model.model.language_model.rotary_emb
    hook = rotary.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    try:
        with finepruner.apply(fam.model, EveryOther((2,))) as handle:
            fam.generate(inputs, max_new_tokens=2)
    finally:
        hook.remove()
    full = _full_positions(fam, inputs)
    image = (inputs["input_ids"][0] == fam.image_token).nonzero()[:, 0]
    keep = torch.ones(full.shape[2], dtype=torch.bool)
    keep[image] = False
    keep[image[handle.kept[0][0]]] = True
    assert torch.equal(seen[0], full)  # layer 0: the whole prompt
    assert torch.equal(seen[1], full[:, :, keep])  # after the stage: the kept columns
    assert torch.equal(seen[2], full[:, :, -1:] + 1) and torch.equal(seen[3], full[:, :, -1:] + 1)  # decode
    with pytest.raises(ValueError, match="positions='renumber' is not defined on qwen2_5_vl"):
        finepruner.apply(fam.model, "pdrop", positions="renumber")


def test_fastv_keeps_the_top_tokens_of_each_image_by_eager_attention():
    fam = family("qwen2_5_vl", "eager")
    budget = 4
    for row in range(3):
        inputs = fam.inputs([row])
        with torch.no_grad():
            attentions = fam.model(**inputs, output_attentions=True).attentions
        image = (inputs["input_ids"][0] == fam.image_token).nonzero()[:, 0]
        scores = attentions[1][0, :, -1, image].float().mean(dim=0)
        expected, offset = [], 0
        for count in COUNTS[row]:
            expected.append(scores[offset:offset + count].topk(budget).indices.sort().values + offset)
            offset += count
        with finepruner.apply(fam.model, "fastv", tokens=budget, K=2) as handle, torch.no_grad():
            fam.model(**inputs)
        assert handle.kept[0][0].tolist() == torch.cat(expected).tolist()


def test_ratio_and_budget_errors_per_image():
    fam = family()
    inputs = fam.inputs()
    with finepruner.apply(fam.model, "fastv", ratio=0.5, K=1) as handle, torch.no_grad():
        fam.model(**inputs)
    assert (handle.kept[0] >= 0).sum(dim=1).tolist() == [12, round(9 * 0.5), 6 + 4, 0]
    with finepruner.apply(fam.model, "fastv", tokens=10) as handle, pytest.raises(ValueError, match="tokens=10"):
        handle.model(**fam.inputs([1]))  # 9 visual tokens in this image


def test_rope_deltas_are_set_afresh_for_every_prefill():
    fam = family()
    with finepruner.apply(fam.model, "fastv", tokens=4, K=2), torch.no_grad():
        fam.model(**fam.inputs([0]))
        first = fam.model.model.rope_deltas.clone()
        fam.model(**fam.inputs([1]))
        second = fam.model.model.rope_deltas.clone()
    assert not torch.equal(first, second)
    reference, _ = fam.model.model.get_rope_index(**{k: v for k, v in fam.inputs([1]).items()
                                                      if k in ("input_ids", "mm_token_type_ids", "image_grid_thw",
                                                               "attention_mask")})
    assert second.tolist() == [[int(reference.max()) + 1 - fam.inputs([1])["input_ids"].shape[1]]]


def test_gapped_positions_without_mask_or_cache_are_not_read_as_packed_sequences():
    """FastV keeps original (gapped) 3-D positions; a call without attention_mask and without cache must
    equal the same call with an all-ones mask (transformers would treat the gaps as sequence boundaries if
    the engine built masks from position ids, ``spec/models.md`` §7.1)."""
    fam = family()
    inputs = fam.inputs([0])
    bare = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with finepruner.apply(fam.model, "fastv", tokens=4, K=2), torch.no_grad():
        without = fam.model(**bare, use_cache=False).logits[:, -1]
        masked = fam.model(**inputs, use_cache=False).logits[:, -1]
    assert (without - masked).abs().max().item() <= 1e-5
