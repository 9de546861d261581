"""``finepruner.calibrate`` on the families whose images have their own visual-token counts (LLaVA-NeXT,
Qwen2.5-VL): each sample's last-query attention row is scored on its own count, the head set stores no
count (it matches any image), and the scores equal a plain reference from the model's eager attentions."""

from __future__ import annotations

import pytest
import torch

import finepruner
from finepruner.calibrate import calibrate
from finepruner.eval import benchmarks
from finepruner.eval.runner import Generator
from finepruner.models.adapters import adapter_for
from finepruner.models.tiny_families import build_tiny_llava_next, build_tiny_qwen2_5_vl
from tests.eval_fixtures import make_pope

BUILDERS = {"llava_next": build_tiny_llava_next, "qwen2_5_vl": build_tiny_qwen2_5_vl}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_pope(root)
    return [s for s in benchmarks.get("pope").load(root) if s.has_image][:4]


def reference_sums(model, processor, samples, layer: int) -> torch.Tensor:
    """Mean over samples of each head's attention mass from the last prompt token on the sample's visual
    tokens at decoder ``layer`` (strategy ``sum``), from a plain eager forward, one sample at a time."""
    generator = Generator(model, processor)
    adapter = adapter_for(model)
    rows = []
    model.set_attn_implementation("eager")
    try:
        for sample in samples:
            inputs = generator.model_inputs([generator.build_prompt(sample.text, True)],
                                            [generator.prepare_image(sample)])
            with torch.no_grad():
                attn = model(**inputs, output_attentions=True, use_cache=False).attentions[layer][0].float()
            visual = adapter.image_mask(inputs["input_ids"], None)[0]
            assert int(visual.sum()) > 0
            rows.append(attn[:, -1, visual].sum(-1))
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack(rows).double().mean(0)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_calibrate_scores_each_sample_on_its_own_count(family, samples, tmp_path):
    torch.set_num_threads(1)
    model, processor = BUILDERS[family](seed=0, qk_scale=8.0)[:2]
    head_set = calibrate(model, processor, samples, K=2, batch_size=3, progress=False)
    assert head_set.num_visual is None and head_set.n_samples == len(samples)
    expected = reference_sums(model, processor, samples, layer=1)
    assert torch.allclose(torch.tensor(head_set.scores, dtype=torch.float64), expected, atol=1e-5)
    # the head set is usable on the same model (no count to disagree with)
    head_set.save(tmp_path / "heads.json")
    with finepruner.apply(model, "finepruner", tokens=4, heads=2, heads_from=str(tmp_path / "heads.json"),
                          processor=processor) as handle:
        assert handle.method.guidance.strategy == "calibrated"
