"""SparseVLM: kept sets and outputs against a plain reference of the spec, batches, cache, decode, errors."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.methods.base import PruningMethod, Selection, Stage
from finepruner.methods.sparsevlm import SCHEDULES, average_visual_tokens, visual_counts
from finepruner.methods.sparsevlm_recycling import density_noise
from finepruner.models.tiny import build_tiny_llava
from tests.conftest import PROMPTS, assert_row_equals_alone, noise_images, single

IMAGE = 4
NUM_VISUAL = 64
GEN = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
       "suppress_tokens": [IMAGE]}


def rotate(t):
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), -1)


def full_attention(lm, layer, hidden, positions):
    """[H, L, L] causal eager attention probabilities of ``layer`` on ``hidden`` [1, L, D]."""
    attn = layer.self_attn
    length = hidden.shape[1]
    cos, sin = lm.rotary_emb(hidden, positions[None])
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
    q = q * cos[:, None] + rotate(q) * sin[:, None]
    k = k * cos[:, None] + rotate(k) * sin[:, None]
    logits = (q @ k.transpose(-1, -2)) * attn.scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)[0]


def plain_cluster_merge(x, c, noise):
    """DPC-kNN as the spec words it, with loops; returns (merged [c, C], centres).

    The distances come from the same routine as the method's (exact pairwise differences): the tiny
    models' candidates are so alike that centre scores tie to 1e-8, below other summation orders."""
    n, width = x.shape
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / width**0.5
    density = [torch.exp(-(dist[i].sort().values[:c] ** 2).mean()) + noise[i] * 1e-6 for i in range(n)]
    delta = []
    for i in range(n):
        higher = [dist[i, j] for j in range(n) if density[j] > density[i]]
        delta.append(min(higher) if higher else dist.max())
    score = [delta[i] * density[i] for i in range(n)]
    # top-c by score with torch.topk, as the official code: exact ties occur (the 1e-6 noise is below
    # float32 resolution near density 1) and topk's order decides them there
    centres = torch.stack(score).topk(c).indices.tolist()
    members = [[] for _ in range(c)]
    for i in range(n):
        if i in centres:
            members[centres.index(i)].append(i)
            continue
        best = 0
        for j in range(1, c):
            if dist[centres[j], i] < dist[centres[best], i]:
                best = j
        members[best].append(i)
    merged = torch.stack([sum(x[i] for i in group) / (len(group) + 1e-6) for group in members])
    return merged, centres


def reference_sparsevlm(model, inputs, row, version, layers, keeps=None, heads=14, scale=None, bias=None,
                        seed=0):
    """SparseVLM on one unpadded sample, written plainly from the spec (full attention matrices).

    Returns (kept ids per stage, merged counts per stage, last-position logits)."""
    lm = model.model.language_model
    mask = inputs["attention_mask"][row].bool()
    ids = inputs["input_ids"][row][mask][None]
    key = hash(tuple(ids[0].tolist()))
    with torch.no_grad():
        hidden = model.model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"][row : row + 1]).pooler_output
        hidden[ids == IMAGE] = features[0]
        visual = (ids[0] == IMAGE).nonzero()[:, 0]
        count = len(visual)
        vis_ids = list(range(count))
        next_id = count
        text_offset = int(visual[-1]) + 1
        weights = (hidden[0, visual] @ hidden[0, text_offset:].T).softmax(-1).mean(0)
        raters = (weights > weights.mean()).nonzero()[:, 0]
        positions = torch.arange(hidden.shape[1])
        kept_sets, merged_counts = [], []
        for index, layer in enumerate(lm.layers):
            length = hidden.shape[1]
            additive = torch.full((length, length), float("-inf")).triu(1)[None, None]
            out = layer(hidden, attention_mask=additive,
                        position_embeddings=lm.rotary_emb(hidden, positions[None]))
            if index in layers:
                stage = layers.index(index)
                probs = full_attention(lm, layer, hidden, positions)
                start, end = int(visual[0]), int(visual[-1]) + 1
                rater_pos = end + raters
                if version == "2.0":
                    cos, sin = lm.rotary_emb(hidden, positions[None])
                    ones = torch.ones(1, 1, length, cos.shape[-1])
                    rope = ones * cos[:, None] + rotate(ones) * sin[:, None]
                    probs = probs / ((rope @ rope.transpose(-1, -2))[0] / cos.shape[-1] ** 0.5)
                    per_head = probs[:, rater_pos][:, :, start:end].sum((1, 2))
                    probs = probs[per_head.topk(heads).indices]
                relation = probs.mean(0)[rater_pos][:, start:end]
                scores = relation.mean(0)
                v = end - start
                if version == "1.0":
                    rank = int(torch.linalg.matrix_rank(relation.float()))
                    k = v if rank == v else min(int(rank * scale + bias), v - 1)
                else:
                    k = min(keeps[stage], v - 1)
                local = scores.topk(k).indices.sort().values
                kept_sets.append(torch.tensor([vis_ids[i] for i in local]))
                new_vis = out[:, start:end][:, local]
                merged_count = 0
                if version != "2.0" and k < v:
                    pruned = [i for i in range(v) if i not in set(local.tolist())]
                    n = int(len(pruned) * 0.3) + 1
                    order = torch.tensor(pruned)[scores[pruned].topk(n).indices]
                    merged_count = int(n / 10) + 1
                    merged, _ = plain_cluster_merge(out[0, start:end][order], merged_count,
                                                    density_noise(seed, key, stage, n))
                    new_vis = torch.cat([new_vis, merged[None]], 1)
                merged_counts.append(merged_count)
                vis_ids = [vis_ids[i] for i in local] + list(range(next_id, next_id + merged_count))
                next_id += merged_count
                out = torch.cat([out[:, :start], new_vis, out[:, end:]], 1)
                if version == "2.0":
                    positions = torch.cat([positions[:start], positions[start:end][local], positions[end:]])
                else:
                    positions = torch.arange(out.shape[1])
                visual = torch.arange(start, start + new_vis.shape[1])
            hidden = out
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    return kept_sets, merged_counts, logits


def check_against_reference(model, inputs, rows, layers, version, **params):
    with finepruner.apply(model, "sparsevlm", version=version, layers=layers, **params) as handle, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    ref_params = {k: params[k] for k in ("keeps", "heads", "scale", "bias", "seed") if k in params}
    if version == "1.0":
        ref_params.setdefault("scale", handle.method.scale)
        ref_params.setdefault("bias", handle.method.bias)
    if "keeps" not in ref_params and version != "1.0":
        ref_params["keeps"] = list(SCHEDULES[version][params.get("tokens", 192)])
    for row in rows:
        kept, merged, reference_logits = reference_sparsevlm(model, inputs, row, version, layers, **ref_params)
        for stage, ids in enumerate(kept):
            assert torch.equal(handle.kept[stage][row], ids), (row, stage)
            count = 0 if handle.merged[stage] is None else handle.merged[stage].shape[1]
            assert count == merged[stage]
        assert (logits[row] - reference_logits).abs().max().item() <= 1e-4
    return handle


@pytest.mark.parametrize(
    ("version", "params"),
    [
        ("1.5", {"keeps": [40, 20, 8]}),
        ("1.5", {"keeps": [56, 12, 3], "seed": 3}),
        ("1.5", {"keeps": [20, 60, 1]}),
        ("2.0", {"keeps": [40, 20, 8], "heads": 2}),
        ("2.0", {"keeps": [30, 10, 4], "heads": 3}),
    ],
)
def test_kept_sets_and_logits_equal_plain_reference(tiny_eager, batch, version, params):
    model, _ = tiny_eager
    check_against_reference(model, batch, range(3), [0, 1, 2], version, **params)


@pytest.mark.parametrize("tokens", [192, 64])
def test_v1_0_rank_rule_equals_plain_reference(tiny_eager, tokens):
    model, processor = tiny_eager
    for row in range(3):
        inputs = single(processor, row)
        check_against_reference(model, inputs, [0], [0, 1, 2], "1.0", tokens=tokens)


@pytest.fixture(scope="module")
def llava_shape():
    """576 visual tokens, 18 layers, 16 heads: the official schedules, layers and head count apply."""
    model, processor = build_tiny_llava(seed=2, qk_scale=8.0, attn_implementation="eager", grid=24, patch=4,
                                        text_layers=18, text_heads=16, text_hidden=64)
    inputs = processor(images=noise_images(2, size=96), text=PROMPTS[:2], return_tensors="pt", padding=True)
    return model, inputs


@pytest.mark.parametrize(("version", "tokens"), [("1.5", 192), ("1.5", 64), ("2.0", 128)])
def test_official_schedules_on_576_tokens(llava_shape, version, tokens):
    model, inputs = llava_shape
    handle = check_against_reference(model, inputs, range(2), [2, 6, 15], version, tokens=tokens)
    counts = visual_counts(SCHEDULES[version][tokens], 576, merge=version != "2.0")
    assert [k.shape[1] for k in handle.kept] == [k for k, _ in counts]
    assert handle.stats.visual_tokens[3] == sum(counts[0])


def test_official_budgets_average_near_n():
    for tokens, keeps in SCHEDULES["1.5"].items():
        counts = visual_counts(keeps, 576)
        # the official "Equal Tokens" counts the visual tokens after each layer (after pruning at 2, 6, 15)
        assert abs(average_visual_tokens([2, 6, 15], counts, 32, 576, after=True) - tokens) < 8, tokens
    assert visual_counts([300, 200, 110], 576) == [(300, 9), (200, 4), (110, 3)]
    assert average_visual_tokens([2, 6, 15], [(300, 9), (200, 4), (110, 3)], 32, 576) == (
        3 * 576 + 4 * 309 + 9 * 204 + 16 * 113) / 32


PRUNED = [
    {"layers": [0, 1, 2], "keeps": [40, 20, 8]},
    {"layers": [1, 2], "keeps": [33, 7], "seed": 4},
    {"layers": [0, 1, 2], "keeps": [40, 20, 8], "version": "2.0", "heads": 2},
    {"layers": [0, 2], "keeps": [20, 5], "version": "2.0", "heads": 4, "positions": "renumber"},
    {"layers": [0, 2], "keeps": [20, 5], "positions": "original"},
]


@pytest.mark.parametrize(("attn", "params"), [("sdpa", p) for p in PRUNED] + [("eager", PRUNED[0])])
def test_padded_batch_equals_each_sample_alone(tiny, tiny_eager, batch, attn, params):
    model, processor = tiny if attn == "sdpa" else tiny_eager
    with finepruner.apply(model, "sparsevlm", **params) as handle, torch.no_grad():
        together = model.generate(**batch, **GEN)
        kept, merged = [k.clone() for k in handle.kept], list(handle.merged)
        for row in range(len(PROMPTS)):
            alone = model.generate(**single(processor, row), **GEN)
            for stage, ids in enumerate(handle.kept):
                assert torch.equal(ids[0], kept[stage][row])
                if merged[stage] is not None:
                    assert torch.equal(handle.merged[stage][0], merged[stage][row])
            assert_row_equals_alone(alone, together, row)


def test_kv_cache_lengths_and_stats(tiny, batch):
    model, _ = tiny
    length = batch["input_ids"].shape[1]
    text = length - NUM_VISUAL
    new = GEN["max_new_tokens"]
    with finepruner.apply(model, "sparsevlm", layers=[0, 1, 2], keeps=[40, 20, 8]) as handle, torch.no_grad():
        out = model.generate(**batch, **GEN)
    # 64 -> 40 kept + int((int(24 * .3) + 1) / 10) + 1 = 1 merged; 41 -> 20 + 1; 21 -> 8 + 1
    assert handle.stats.visual_tokens == [64, 41, 21, 9]
    expected = [length, text + 41, text + 21, text + 9]
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [e + new - 1 for e in expected]
    for stage, (kept, merged) in enumerate(zip(handle.kept, handle.merged, strict=True)):
        assert torch.equal(kept, kept.sort(dim=1).values)
        assert merged.tolist() == [[NUM_VISUAL + stage]] * 3
        if stage:  # later stages keep from the previous stage's tokens, merged ones included
            previous = torch.cat([handle.kept[stage - 1], handle.merged[stage - 1]], 1)
            for row in range(3):
                assert set(kept[row].tolist()) <= set(previous[row].tolist())


def test_seed_is_explicit_and_global_rng_untouched(tiny, batch):
    model, _ = tiny
    state = torch.random.get_rng_state()
    with finepruner.apply(model, "sparsevlm", layers=[0, 1, 2], keeps=[40, 20, 8], seed=1), torch.no_grad():
        model(**batch)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(density_noise(1, 5, 0, 8), density_noise(1, 5, 0, 8))
    assert not torch.equal(density_noise(1, 5, 0, 8), density_noise(2, 5, 0, 8))


class FixedMerge(PruningMethod):
    """Keeps given visual ids and inserts the mean of the first two pruned tokens (engine insert path)."""

    name = "fixed_merge"

    def __init__(self, stages, positions):
        super().__init__(positions)
        self.fixed = stages

    def plan(self, num_layers, num_visual):
        return [Stage(layer=layer, keep=len(ids), insert=1) for layer, ids in self.fixed]

    def select(self, stage_index, stage, ctx):
        wanted = torch.tensor(self.fixed[stage_index][1])
        local = torch.stack([(ctx.visual_ids[r] == wanted[:, None]).nonzero()[:, 1]
                             for r in range(ctx.visual_ids.shape[0])]).sort(dim=1).values
        pruned = torch.stack([torch.tensor([i for i in range(ctx.num_visual) if i not in set(row.tolist())][:2])
                              for row in local])
        signals = ctx.signals
        positions = signals.visual_index.gather(1, pruned)
        tokens = signals.hidden.gather(1, positions[..., None].expand(-1, -1, signals.hidden.shape[-1]))
        return Selection(keep=local, insert=tokens.mean(1, keepdim=True), insert_from=pruned[:, :1])


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("stages", [[(2, list(range(0, 64, 4)))], [(0, list(range(5, 64, 3)))],
                                    [(1, list(range(0, 64, 2))), (3, [*range(0, 64, 8), 64])]])
def test_decode_with_inserted_tokens_equals_fresh_forward(tiny, batch, stages, positions):
    model, _ = tiny
    with finepruner.apply(model, FixedMerge(stages, positions)):
        out = model.generate(**batch, **GEN)
        prompt = batch["input_ids"].shape[1]
        for step in range(1, GEN["max_new_tokens"]):
            ids = out.sequences[:, : prompt + step]
            mask = torch.cat([batch["attention_mask"], torch.ones(ids.shape[0], step, dtype=torch.long)], 1)
            with torch.no_grad():
                fresh = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                              use_cache=False).logits[:, -1]
            finite = torch.isfinite(out.scores[step])
            assert (fresh[finite] - out.scores[step][finite]).abs().max().item() <= 1e-4


def test_inserted_token_positions(tiny, batch):
    """Renumber: contiguous after the kept visual tokens; original: the position of insert_from's token."""
    model, _ = tiny
    seen = {}

    class Probe(FixedMerge):
        def select(self, stage_index, stage, ctx):
            if stage_index == 1:
                seen[self.positions] = (ctx.signals.position_ids.clone(), ctx.signals.visual_index.clone())
            return super().select(stage_index, stage, ctx)

    stages = [(1, list(range(0, 64, 2))), (3, [*range(0, 64, 8), 64])]
    for positions in ("renumber", "original"):
        with finepruner.apply(model, Probe(stages, positions)), torch.no_grad():
            model(**batch)
    row = 1  # the longest prompt: no padding, positions 0..L-1
    first_visual = int((batch["input_ids"][row] == IMAGE).nonzero()[0, 0])
    ids, index = seen["renumber"]
    assert ids[row, index[row]].tolist() == list(range(first_visual, first_visual + 33))
    ids, index = seen["original"]
    # kept even ids keep their positions; the inserted token takes the position of visual id 1
    assert ids[row, index[row]].tolist() == [first_visual + 2 * i for i in range(32)] + [first_visual + 1]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"version": "3.0"}, "version='3.0' is unknown; pass version='1.0', '1.5' or '2.0'"),
        ({"version": 1.2}, "version='1.2' is unknown"),
        ({"tokens": 100}, "no version '1.5' schedule for tokens=100; pass tokens=192, 128, 96, 64, or keeps="),
        ({"tokens": 96, "version": "1.0"}, "no scale/bias for tokens=96; pass tokens=192, 128, 64, or scale="),
        ({"layers": [0, 1, 2], "keeps": [10, 5]}, "3 pruning layers .* but 2 top-k sizes"),
        ({"keeps": [10, 5, 2]}, "layers\\[i\\]=6 is out of range; allowed: integers 0..2"),
        ({"layers": [1, 0], "keeps": [10, 5]}, "strictly increasing"),
        ({"layers": [0, 1, 2], "keeps": [10, 5, 2], "version": "2.0"}, "selects heads=14 heads but the model has 4"),
        ({"scale": 2.0}, "scale=/bias= are for version '1.0'"),
        ({"keeps": [0, 1, 1], "layers": [0, 1, 2]}, "each must be an integer >= 1"),
    ],
)
def test_bad_parameters_raise_clear_errors(tiny, params, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        finepruner.apply(model, "sparsevlm", **params)
    assert "forward" not in vars(model.model.language_model)


def test_v1_0_batch_with_different_counts_is_refused(tiny, batch):
    model, _ = tiny
    with finepruner.apply(model, "sparsevlm", version="1.0", layers=[0, 1, 2], tokens=128):
        with pytest.raises(ValueError, match="different counts .*batch size 1"), torch.no_grad():
            model(**batch)


def test_registered_with_defaults():
    params = finepruner.methods.parameters("sparsevlm")
    assert params["tokens"] == 192 and params["version"] == "1.5"
    method = finepruner.methods.create("sparsevlm")
    assert method.positions == "renumber" and method.merge and method.layers == [2, 6, 15]
    method = finepruner.methods.create("sparsevlm", version="2.0")
    assert method.positions == "original" and not method.merge and method.heads == 14
    assert finepruner.methods.create("sparsevlm", version="1.0").layers == [2, 6, 15, 19]


def test_budget_mapping_refuses_budgets_far_from_every_official_schedule():
    """Scaled shapes (the toy's 144 tokens) take the nearest official schedule only when it is near:
    4 and 8 of 144 (16 and 32 of 576) would otherwise both run the 64-token schedule under their labels."""
    from finepruner.methods.sparsevlm import sparsevlm_mapping

    mapped = sparsevlm_mapping(16, 6, 144)
    assert mapped["keeps"] == [round(k * 144 / 576) for k in SCHEDULES["1.5"][64]]
    assert sparsevlm_mapping(30, 6, 144)["keeps"] == sparsevlm_mapping(32, 6, 144)["keeps"]  # 120 ~ 128
    for tokens in (4, 8):
        with pytest.raises(ValueError, match=rf"tokens={tokens} of 144 .*allowed here: about 16, 24, 32, 48"):
            sparsevlm_mapping(tokens, 6, 144)


def test_defaults_for_maps_a_budget_only_off_llava_15():
    """``SparseVLM.defaults_for``: the mapping replaces ``tokens`` on other shapes; LLaVA-1.5, explicit
    ``layers``/``keeps`` and version 1.0 keep the user's parameters; the given mapping is not modified."""
    from finepruner.methods.base import ModelShape
    from finepruner.methods.sparsevlm import SparseVLM, sparsevlm_mapping

    toy, llava = ModelShape(6, 8, 144), ModelShape(32, 32, 576)
    given = {"tokens": 16, "seed": 3}
    assert SparseVLM.defaults_for(toy, given) == {"seed": 3, **sparsevlm_mapping(16, 6, 144)}
    assert given == {"tokens": 16, "seed": 3}
    for params in ({"tokens": 64}, {"tokens": 16, "keeps": [9, 4, 2]}, {"tokens": 16, "layers": [1, 2, 3]},
                   {"tokens": 64, "version": "1.0"}, {}):
        shape = llava if params == {"tokens": 64} else toy
        assert SparseVLM.defaults_for(shape, params) == params
    with pytest.raises(ValueError, match="tokens=4 of 144"):
        SparseVLM.defaults_for(toy, {"tokens": 4})
