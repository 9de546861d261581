"""CDPruner: kept sets against a plain reference of the spec (§5.2, §7.9), the CLIP text side, errors."""

from __future__ import annotations

import math

import pytest
import torch

import finepruner
from finepruner.methods.cdpruner import dpp_greedy, instruction_from_prompt
from finepruner.models.clip_text import build_tiny_clip_text, load_clip_text, save_tiny_clip_checkpoint
from tests.conftest import GEN, NUM_VISUAL, PROMPTS, assert_row_equals_alone, assert_same_generation, generate, single

#: The instruction of each of conftest's PROMPTS, as the tiny tokenizer decodes it.
INSTRUCTIONS = [
    "what color is the circle?",
    "how many red objects are there in this image? answer using a single word.",
    "is there a square?",
]


@pytest.fixture(scope="module")
def clip():
    return build_tiny_clip_text(32, seed=3, max_positions=8)  # short segments: texts span several


def reference_text_embeds(clip, text: str) -> torch.Tensor:
    """Official segmenting, one segment at a time: tokenise, zero-pad to a multiple of 77 (here the tiny
    model's max_position_embeddings), encode each segment."""
    size = clip.text_model.config.max_position_embeddings
    encoded = clip.tokenizer(text)
    ids, mask = list(encoded["input_ids"]), list(encoded["attention_mask"])
    while len(ids) % size:
        ids.append(0)
        mask.append(0)
    rows = []
    for start in range(0, len(ids), size):
        with torch.no_grad():
            out = clip.text_model(input_ids=torch.tensor([ids[start:start + size]]),
                                  attention_mask=torch.tensor([mask[start:start + size]]))
        rows.append(out.text_embeds[0])
    return torch.stack(rows)


def reference_dpp(kernel: torch.Tensor, count: int) -> list[int]:
    """Chen et al.'s fast greedy MAP, one sample, written with plain loops."""
    size = kernel.shape[0]
    gains = [float(kernel[i, i]) for i in range(size)]
    vectors: list[torch.Tensor] = []
    chosen: list[int] = []
    for _ in range(count):
        best = None
        for i in range(size):  # first index on ties
            if i not in chosen and (best is None or gains[i] > gains[best]):
                best = i
        row = kernel[best].clone()
        for past in vectors:
            row = row - past[best] * past
        e = row / math.sqrt(gains[best])
        vectors.append(e)
        gains = [g - float(x) ** 2 for g, x in zip(gains, e, strict=True)]
        chosen.append(best)
    return sorted(chosen)


def reference_cdpruner(model, clip, inputs, texts, tokens, normalize="sample", theta=None) -> list[list[int]]:
    """The spec's §5.2 pseudo-code, from an eager run of the vision tower (no hooks)."""
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        features = out.hidden_states[-2][:, 1:]
        projected = model.model.multi_modal_projector(features)
        image_embeds = model.model.vision_tower.post_layernorm(features).float() @ clip.visual_projection.weight.T
    normed = (projected / projected.norm(dim=-1, keepdim=True)).float()
    relevance = []
    for row, text in enumerate(texts):
        e = image_embeds[row] / image_embeds[row].norm(dim=-1, keepdim=True)
        t = reference_text_embeds(clip, text)
        t = t / t.norm(dim=-1, keepdim=True)
        relevance.append((-(e @ t.T)).mean(dim=-1))
    relevance = torch.stack(relevance)
    if normalize == "sample":
        low, high = relevance.min(dim=1, keepdim=True).values, relevance.max(dim=1, keepdim=True).values
    else:
        low, high = relevance.min(), relevance.max()
    relevance = (relevance - low + 1e-6) / (high - low)
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    kept = []
    for row in range(len(texts)):
        similarity = normed[row] @ normed[row].T
        kernel = relevance[row][:, None] * similarity * relevance[row][None, :]
        kept.append(reference_dpp(kernel, tokens))
    return kept


def test_instruction_text_from_prompt():
    llava = "\nWhat is on the table?\nAnswer the question using a single word or phrase. ASSISTANT:"
    assert instruction_from_prompt(llava) == "What is on the table?"
    mmbench = "\nHint\nQuestion?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly. "
    mmbench += "ASSISTANT:"
    assert instruction_from_prompt(mmbench) == "Hint\nQuestion?\nA. x\nB. y"
    assert instruction_from_prompt(" describe the image ") == "describe the image"


@pytest.mark.parametrize("tokens", [1, 8, 20, 40, 60])
def test_kept_set_equals_plain_reference(tiny, batch, clip, tokens):
    model, processor = tiny
    with finepruner.apply(model, "cdpruner", tokens=tokens, clip_text=clip, processor=processor) as handle:
        with torch.no_grad():
            model(**batch)
    # the prompt-derived instructions (decoded by the engine), and a two-segment text (15 tokens > 8) among them
    assert handle.instructions == INSTRUCTIONS
    assert reference_text_embeds(clip, INSTRUCTIONS[1]).shape[0] == 2
    assert handle.kept[0].tolist() == reference_cdpruner(model, clip, batch, INSTRUCTIONS, tokens)


@pytest.mark.parametrize(("normalize", "theta"), [("batch", None), ("sample", 0.5), ("batch", 0.8)])
def test_options_equal_reference(tiny, batch, clip, normalize, theta):
    model, _ = tiny
    method = finepruner.methods.create("cdpruner", tokens=16, clip_text=clip, normalize=normalize, theta=theta)
    with finepruner.apply(model, method) as handle, torch.no_grad():
        method.set_instructions(INSTRUCTIONS)
        model(**batch)
    assert handle.kept[0].tolist() == reference_cdpruner(model, clip, batch, INSTRUCTIONS, 16, normalize, theta)


def test_relevance_changes_the_selection(tiny, batch, clip):
    model, _ = tiny
    kept = []
    for text in ("what color is the circle ?", "is there a red square at the top left ?"):
        with finepruner.apply(model, "cdpruner", tokens=16, clip_text=clip) as handle, torch.no_grad():
            handle.method.set_instructions([text] * 3)
            model(**batch)
        kept.append(handle.kept[0])
    assert not torch.equal(kept[0], kept[1])


def test_dpp_greedy_equals_log_det_greedy():
    """Greedy MAP by definition: each pick maximises det(L_S) (float64, small budgets)."""
    torch.manual_seed(0)
    x = torch.randn(3, 30, 12, dtype=torch.float64)
    r = torch.rand(3, 30, dtype=torch.float64) + 0.1
    kernel = r[:, :, None] * (x @ x.transpose(1, 2)) * r[:, None, :]
    kept = dpp_greedy(kernel, 8)
    for row in range(3):
        chosen: list[int] = []
        for _ in range(8):
            dets = [torch.linalg.det(kernel[row][chosen + [j]][:, chosen + [j]]).item() if j not in chosen
                    else -math.inf for j in range(30)]
            chosen.append(max(range(30), key=lambda j: dets[j]))
        assert kept[row].tolist() == sorted(chosen)


def test_dpp_exhausted_rank_still_returns_distinct_tokens():
    torch.manual_seed(1)
    x = torch.randn(2, 10, 2)  # rank 2: the official loop would produce NaNs after two picks
    kept = dpp_greedy(x @ x.transpose(1, 2), 10)
    assert kept.tolist() == [list(range(10))] * 2
    kept = dpp_greedy(x @ x.transpose(1, 2), 5)
    assert all(len(set(row)) == 5 for row in kept.tolist())


def test_keep_all_equals_transformers(tiny, batch, clip):
    model, processor = tiny
    reference = generate(model, batch)
    with finepruner.apply(model, "cdpruner", tokens=NUM_VISUAL, clip_text=clip, processor=processor) as handle:
        pruned = generate(model, batch)
    assert_same_generation(pruned, reference)
    assert handle.stats.visual_tokens == [NUM_VISUAL] * 4


def test_padded_batch_equals_each_sample_alone_and_kv_lengths(tiny, batch, clip):
    model, processor = tiny
    new = GEN["max_new_tokens"]
    text = batch["input_ids"].shape[1] - NUM_VISUAL
    with finepruner.apply(model, "cdpruner", tokens=12, clip_text=clip, processor=processor) as handle:
        together = generate(model, batch)
        kept = handle.kept[0].clone()
        assert [layer.keys.shape[2] for layer in together.cache.layers] == [text + 12 + new - 1] * 4
        assert handle.stats.visual_tokens == [12] * 4
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert torch.equal(handle.kept[0][0], kept[row])
            assert_row_equals_alone(alone, together, row)


def test_beams_repeat_instructions_and_signals(tiny, batch, clip):
    model, processor = tiny
    with finepruner.apply(model, "cdpruner", tokens=10, clip_text=clip) as handle:
        handle.method.set_instructions(INSTRUCTIONS)
        generate(model, batch)
        plain = handle.kept[0].clone()
        handle.method.set_instructions(INSTRUCTIONS)
        generate(model, batch, num_beams=2, num_return_sequences=2)
    assert torch.equal(handle.kept[0], plain.repeat_interleave(2, dim=0))


def test_clip_model_path_loads_a_local_checkpoint(tmp_path, tiny, batch):
    directory = save_tiny_clip_checkpoint(tmp_path / "clip", 32, seed=4)
    loaded = load_clip_text(directory)
    assert loaded.segment_length == 16
    assert loaded.visual_projection.weight.shape == (16, 32)
    ids = loaded.tokenizer("is there a square ?")["input_ids"]
    assert ids[0] == loaded.tokenizer.bos_token_id and ids[-1] == loaded.tokenizer.eos_token_id
    model, processor = tiny
    with finepruner.apply(model, "cdpruner", tokens=16, clip_model=str(directory), processor=processor) as handle:
        with torch.no_grad():
            model(**batch)
    assert handle.method.describe()["clip_model"] == str(directory)
    assert handle.kept[0].tolist() == reference_cdpruner(model, loaded, batch, INSTRUCTIONS, 16)


def test_clip_tower_shipped_in_the_model_folder_is_the_default(tmp_path, tiny, batch, monkeypatch):
    model, processor = tiny
    directory = save_tiny_clip_checkpoint(tmp_path / "checkpoint" / "clip_text", 32, seed=4)
    monkeypatch.setattr(model, "name_or_path", str(tmp_path / "checkpoint"))
    with finepruner.apply(model, "cdpruner", tokens=16, processor=processor) as handle, torch.no_grad():
        model(**batch)
    assert handle.method.describe()["clip_model"] == str(directory.resolve())
    assert handle.kept[0].tolist() == reference_cdpruner(model, load_clip_text(directory), batch, INSTRUCTIONS, 16)


def test_missing_clip_text_model_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="needs CLIP's text tower: pass clip_model=PATH.*has no clip_text/ tower"):
        finepruner.apply(model, "cdpruner", tokens=16)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        finepruner.apply(model, "cdpruner", tokens=16, clip_model="openai/clip-vit-large-patch14-336")
    assert "forward" not in vars(model.model.language_model)


def test_missing_instruction_is_a_clear_error(tiny, batch, clip):
    model, _ = tiny
    calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with finepruner.apply(model, "cdpruner", tokens=16, clip_text=clip), torch.no_grad():
            with pytest.raises(RuntimeError, match="pass processor= to finepruner.apply.*set_instructions"):
                model(**batch)
    finally:
        hook.remove()
    assert not calls  # raised before any forward: the vision tower never ran


def test_deprecated_tokenizer_parameter_still_decodes(tiny, batch, clip):
    model, processor = tiny
    with pytest.warns(DeprecationWarning, match="pass processor= to finepruner.apply"):
        method = finepruner.methods.create("cdpruner", tokens=16, clip_text=clip, tokenizer=processor)
    with finepruner.apply(model, method) as handle, torch.no_grad():
        model(**batch)
    assert handle.instructions == INSTRUCTIONS
    assert handle.kept[0].tolist() == reference_cdpruner(model, clip, batch, INSTRUCTIONS, 16)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tokens": 65}, "tokens=65 is not allowed.*1..64"),
        ({"tokens": 8, "normalize": "global"}, "normalize='global'"),
        ({"tokens": 8, "theta": 1.0}, "theta=1.0"),
    ],
)
def test_bad_parameters(tiny, clip, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "cdpruner", clip_text=clip, **params)
