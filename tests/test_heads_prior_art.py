"""Head-level prior art (spec methods_more.md §7, methods.md §2.3): SparseVLM v2.0 priority heads on the last
query (``sparsevlm_priority``) and HAWK's soft weighting with calibrated head weights (``weighting="hawk"``),
against plain references written from the spec."""

from __future__ import annotations

import json
import math

import pytest
import torch

import finepruner
import finepruner.heads as fh
from finepruner.methods.spec import parse_method_spec
from tests.conftest import IMAGE_TOKEN_ID, NUM_VISUAL, PROMPTS, assert_row_equals_alone, generate, single

# ------------------------------------------------------------------------------------------------------
# Plain references
# ------------------------------------------------------------------------------------------------------


def ref_priority(a: torch.Tensor, g: list[float] | None, heads: int | None) -> tuple[list[int], list[float]]:
    """v2.0 priority heads on one row: corrected = A / g; score_h = sum_j corrected; top-k, ties lowest index."""
    h, n = a.shape
    k = heads if heads is not None else int(h * 14 / 32 + 0.5)
    scores = [sum(float(a[i, j]) / (1.0 if g is None else g[j]) for j in range(n)) for i in range(h)]
    order = sorted(range(h), key=lambda i: (-scores[i], i))
    return sorted(order[:k]), scores


def ref_gravity(distance: int, dim: int, base: float) -> float:
    """The RoPE-only logit in closed form, (2/sqrt(d)) sum_i cos((m-n) theta_i) (methods.md pitfall 5)."""
    return 2.0 / math.sqrt(dim) * sum(math.cos(distance * base ** (-2 * i / dim)) for i in range(dim // 2))


def ref_hawk(a: torch.Tensor, w: list[float]) -> list[float]:
    """HAWK: sum_h w_h * A_h / ||A_h||_2 (a zero row contributes 0)."""
    h, n = a.shape
    out = [0.0] * n
    for i in range(h):
        norm = math.sqrt(sum(float(x) ** 2 for x in a[i]))
        for j in range(n):
            out[j] += w[i] * (float(a[i, j]) / norm if norm > 0 else 0.0)
    return out


def rope_tables(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard RoPE tables [B, L, d] (duplicated halves) for position ids [B, L]."""
    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * theta
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


def random_attn(h: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(h, n, generator=g) * 2, -1) * (torch.rand(h, 1, generator=g) + 0.1)


# ------------------------------------------------------------------------------------------------------
# sparsevlm_priority in finepruner.heads
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [4, 8, 32])
@pytest.mark.parametrize("heads", [None, 1, 3])
def test_priority_equals_reference(num_heads, heads):
    a = random_attn(num_heads, 24, seed=num_heads)
    g = (torch.rand(24, generator=torch.Generator().manual_seed(1)) * 3 + 0.2).tolist()
    detailed = fh.select_detailed(a, "sparsevlm_priority", heads=heads, gravity=torch.tensor(g))
    want, scores = ref_priority(a, g, heads)
    assert detailed.indices.tolist() == want
    torch.testing.assert_close(detailed.scores, torch.tensor(scores), rtol=1e-5, atol=1e-6)
    # without the correction the head ranking is exactly `sum`'s
    count = heads or fh.default_priority_heads(num_heads)
    assert torch.equal(fh.select(a, "sparsevlm_priority", heads=heads, gravity="none"),
                       fh.select(a, "sum", heads=count))


def test_priority_ties_batch_and_default_count():
    a = random_attn(8, 16, seed=3)
    a[3], a[6] = a[1], a[1]  # three equal heads
    g = torch.full((16,), 0.7)
    for k in range(1, 9):
        assert fh.select(a, "sparsevlm_priority", heads=k, gravity=g).tolist() == ref_priority(a, g.tolist(), k)[0]
    batch = torch.stack([random_attn(8, 16, seed=s) for s in range(3)])
    gravity = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) + 0.5
    out = fh.select_batch(batch, "sparsevlm_priority", heads=None, gravity=gravity)
    for b in range(3):
        assert out[b].tolist() == ref_priority(batch[b], gravity[b].tolist(), None)[0]
    shared = fh.select_batch(batch, "sparsevlm_priority", gravity=gravity[0])
    assert [x.tolist() for x in shared] == [ref_priority(batch[b], gravity[0].tolist(), None)[0] for b in range(3)]
    assert {h: fh.default_priority_heads(h) for h in (1, 4, 8, 28, 32, 40)} == {
        1: 1, 4: 2, 8: 4, 28: 12, 32: 14, 40: 18
    }


def test_rope_gravity_equals_closed_form_with_gaps():
    positions = torch.tensor([[0, 1, 2, 5, 9, 20, 33, 34], [3, 4, 7, 8, 12, 50, 70, 71]])
    cos, sin = rope_tables(positions, 16, 10000.0)
    keys = torch.tensor([[1, 2, 4], [0, 3, 5]])
    got = fh.rope_gravity(cos, sin, -1, keys)
    for b in range(2):
        for v in range(3):
            want = ref_gravity(int(positions[b, -1] - positions[b, keys[b, v]]), 16, 10000.0)
            assert abs(float(got[b, v]) - want) < 1e-4
    by_row = fh.rope_gravity(cos, sin, torch.tensor([6, 2]), keys)
    assert abs(float(by_row[1, 0]) - ref_gravity(int(positions[1, 2] - positions[1, 0]), 16, 10000.0)) < 1e-4
    assert abs(float(got[0, 0]) - float(fh.rope_gravity(cos, sin, 7, keys)[0, 0])) == 0
    assert abs(ref_gravity(0, 16, 10000.0) - 4.0) < 1e-9  # sqrt(d) on the diagonal


def test_priority_errors():
    a = random_attn(4, 8, seed=0)
    with pytest.raises(ValueError, match="rope_gravity"):
        fh.select(a, "sparsevlm_priority")  # the default correction needs the divisors
    with pytest.raises(ValueError, match=r"gravity must have shape \[8\]"):
        fh.select(a, "sparsevlm_priority", gravity=torch.ones(7))
    with pytest.raises(ValueError, match="finite and positive"):
        fh.select(a, "sparsevlm_priority", gravity=torch.zeros(8))
    with pytest.raises(ValueError, match="'rope', 'none' or a tensor"):
        fh.select(a, "sparsevlm_priority", gravity=2.0)
    with pytest.raises(ValueError, match="1 <= heads <= num_heads=4"):
        fh.select(a, "sparsevlm_priority", heads=5, gravity="none")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['g'\]; allowed: gravity, definitions"):
        fh.select(a, "sparsevlm_priority", g=1)
    with pytest.raises(ValueError, match="2 rows for a batch of 3"):
        fh.select_batch(torch.stack([a, a, a]), "sparsevlm_priority", gravity=torch.ones(2, 8))
    assert fh.strategy_info("sparsevlm_priority").heads == "optional"


# ------------------------------------------------------------------------------------------------------
# HAWK weighting and the weights of heads.json
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 4, 7])
def test_hawk_scores_equal_reference(num_heads):
    batch = torch.stack([random_attn(num_heads, 12, seed=s) for s in range(2)])
    batch[1, 0] = 0  # an all-zero head row contributes nothing
    w = torch.rand(num_heads, generator=torch.Generator().manual_seed(num_heads)).tolist()
    w[0] = 0.0 if num_heads > 1 else w[0]
    got = fh.hawk_scores(batch, w)
    for b in range(2):
        torch.testing.assert_close(got[b], torch.tensor(ref_hawk(batch[b], w)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fh.hawk_scores(batch[b], torch.tensor(w)), got[b])
    with pytest.raises(ValueError, match=f"num_heads={num_heads} weights"):
        fh.hawk_scores(batch, [1.0] * (num_heads + 1))
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        fh.hawk_scores(batch, [-1.0] * num_heads)


def make_head_set(num_heads: int = 4, strategy: str = "sum", layer: int = 1) -> fh.HeadSet:
    acc = fh.HeadStatsAccumulator(num_heads, strategy, num_visual=NUM_VISUAL, num_layers=4, layer=layer)
    acc.update(torch.stack([random_attn(num_heads, NUM_VISUAL, seed=s) for s in range(3)]))
    return acc.result()


def test_head_weights_are_l1_normalised_mean_scores_and_round_trip(tmp_path):
    plain = make_head_set()
    weighted = plain.with_weights(data="three random rows")
    assert weighted.weights == tuple(s / math.fsum(plain.scores) for s in plain.scores)
    assert abs(sum(weighted.weights) - 1) < 1e-12 and weighted.data == "three random rows"
    path = tmp_path / "heads.json"
    weighted.save(path)
    assert fh.load_head_set(path) == weighted
    plain.save(tmp_path / "plain.json")
    assert "weights" not in json.loads((tmp_path / "plain.json").read_text())  # unchanged without weights
    with pytest.raises(ValueError, match="largest scores are best.*'entropy'"):
        make_head_set(strategy="entropy").with_weights()
    data = json.loads(path.read_text())
    for bad in ([0.5, 0.5], [1, -1, 0, 0], [0, 0, 0, 0], "uniform"):
        (tmp_path / "bad.json").write_text(json.dumps({**data, "weights": bad}))
        with pytest.raises(ValueError, match="field 'weights'"):
            fh.load_head_set(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({**data, "data": 3}))
    with pytest.raises(ValueError, match="field 'data'"):
        fh.load_head_set(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------------
# The finepruner method on the tiny model
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_rows(tiny_eager, batch):
    """Layer 1 (K=2): eager attention of the last prompt token to the visual tokens [B, H, V], and the
    visual tokens' sequence positions [B, V]."""
    model, _ = tiny_eager
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    visual = torch.stack([(row == IMAGE_TOKEN_ID).nonzero()[:, 0] for row in batch["input_ids"]])
    a = out.attentions[1]
    return a[:, :, -1, :].gather(2, visual[:, None, :].expand(-1, a.shape[1], -1)), visual


def run(model, batch, **params):
    with finepruner.apply(model, "finepruner", **params) as handle, torch.no_grad():
        model(**batch)
    return handle


def test_priority_method_equals_reference(tiny, batch, eager_rows):
    model, _ = tiny
    rows, visual = eager_rows
    attn = model.model.language_model.layers[1].self_attn
    last = batch["input_ids"].shape[1] - 1
    handle = run(model, batch, tokens=12, strategy="sparsevlm_priority")
    for b in range(3):
        g = [ref_gravity(last - int(p), attn.head_dim, 10000.0) for p in visual[b]]
        chosen, _ = ref_priority(rows[b], g, None)  # 2 of 4 heads
        corrected = rows[b] / torch.tensor(g)
        want = corrected[chosen].mean(0).topk(12).indices.sort().values
        assert handle.heads[0][b].tolist() == chosen
        assert torch.equal(handle.kept[0][b], want)
    name, params = parse_method_spec("finepruner:tokens=12,strategy=sparsevlm_priority")
    with finepruner.apply(model, name, **params) as spec_handle, torch.no_grad():
        model(**batch)
    assert all(torch.equal(x, y) for x, y in zip(spec_handle.kept[0], handle.kept[0], strict=True))
    plain = run(model, batch, tokens=12, strategy="sparsevlm_priority", options={"gravity": "none"})
    summed = run(model, batch, tokens=12, strategy="sum", heads=2)
    assert all(torch.equal(x, y) for x, y in zip(plain.kept[0], summed.kept[0], strict=True))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hawk") / "heads.json"
    make_head_set().with_weights().save(path)
    return path


@pytest.mark.parametrize("heads", [None, 2])
def test_hawk_method_equals_reference(tiny, batch, eager_rows, weights_file, heads):
    model, _ = tiny
    rows, _ = eager_rows
    w = list(fh.load_head_set(weights_file).weights)
    if heads is not None:  # only the H largest weights count
        top = sorted(sorted(range(4), key=lambda h: (-w[h], h))[:heads])
        w = [w[h] if h in top else 0.0 for h in range(4)]
    handle = run(model, batch, tokens=10, weighting="hawk", heads_from=str(weights_file), heads=heads)
    for b in range(3):
        want = torch.tensor(ref_hawk(rows[b], w)).topk(10).indices.sort().values
        assert torch.equal(handle.kept[0][b], want)
        assert handle.heads[0][b].tolist() == [h for h in range(4) if w[h] > 0]


@pytest.mark.parametrize("mode", ["priority", "hawk"])
def test_padded_batch_equals_each_sample_alone(tiny, batch, weights_file, mode):
    model, processor = tiny
    params = ({"strategy": "sparsevlm_priority"} if mode == "priority"
              else {"weighting": "hawk", "heads_from": str(weights_file)})
    with finepruner.apply(model, "finepruner", tokens=12, **params) as handle:
        together = generate(model, batch)
        kept = handle.kept[0].clone()
        for row in range(len(PROMPTS)):
            alone = generate(model, single(processor, row))
            assert torch.equal(handle.kept[0][0], kept[row])
            assert_row_equals_alone(alone, together, row)


def test_bad_parameters_and_files(tiny, tmp_path, weights_file):
    model, _ = tiny
    no_weights = tmp_path / "plain.json"
    make_head_set().save(no_weights)
    other_layer = tmp_path / "layer2.json"
    make_head_set(layer=2).with_weights().save(other_layer)
    cases = [
        ({"weighting": "soft"}, r"weighting='soft'; allowed: \('none', 'hawk'\)"),
        ({"weighting": "hawk"}, "weighting='hawk' needs heads_from=heads.json with a 'weights' field"),
        ({"weighting": "hawk", "heads_from": str(weights_file), "aggregation": "softmax_weighted"},
         "does not apply with weighting='hawk'"),
        ({"weighting": "hawk", "heads_from": str(no_weights)}, "field 'weights' is missing"),
        ({"weighting": "hawk", "heads_from": str(other_layer)}, "field 'layer' is 2 in the file"),
        ({"weighting": "hawk", "heads_from": str(weights_file), "heads": 5}, "heads=5 is not allowed"),
        ({"strategy": "sparsevlm_priority", "options": {"gravity": "x"}},
         r"gravity='x'; allowed: \('rope', 'none'\)"),
        ({"strategy": "sparsevlm_priority", "heads": 5}, "heads=5 is not allowed; this model has 4 heads"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            finepruner.apply(model, "finepruner", tokens=8, **params)
