"""Report plots: one colour per method in every plot, x tick labels that do not overlap, and legends that
never cover a panel, a tick label or an axis label (checked on the rendered figures' bounding boxes)."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib import pyplot as plt
from matplotlib.colors import to_hex
from PIL import Image

from finepruner.bench.report import plot_png
from finepruner.report.colours import METHOD_COLOURS, method_colour, method_rgb
from finepruner.report.plots import CostPoint, budget_figure, cost_figure, label_styles, pareto_figure, plot_pareto
from finepruner.sweep.store import RunRecord

# Paper-convention TFLOPs per sample of toy-sized configurations: tiny values, long default tick labels
# ("0.000125", "0.000150", ... overlapped before the fix).
TOY_TFLOPS = {None: 3.0e-4, 4: 1.5e-4, 8: 1.539e-4, 16: 1.623e-4, 32: 1.8e-4, 48: 1.98e-4}


def record(i: int, method: str, tokens: int | None, bench: str = "gqa", value: float = 50.0,
           params: dict | None = None) -> RunRecord:
    params = dict(params or {})
    if tokens is not None:
        params["tokens"] = tokens
    return RunRecord(run_id=str(i), model_id="toy", method=method, tokens=tokens, heads=None, strategy=None,
                     benchmark=bench, label=method, params=params, settings={}, status="complete", run_dir=None,
                     answers_path=None, metric="accuracy", value=value, metrics={},
                     efficiency={"paper_tflops": TOY_TFLOPS[tokens] * (1.2 if method == "fastv" else 1.0)},
                     timing=None, config=None, code_version=None, claimed_by=None, started_at=None,
                     finished_at=None, error=None)


def grid(methods: list[str], benches: list[str], budgets=(4, 8, 16, 32, 48)) -> list[RunRecord]:
    out = [record(0, "vanilla", None, b, 70.0) for b in benches]
    for m, b, t in itertools.product(methods, benches, budgets):
        out.append(record(len(out), m, t, b, 30.0 + t / 2 + len(m)))
    return out


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def rendered(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_method_colour_is_fixed_per_method_and_stable_for_other_names():
    registered = list(METHOD_COLOURS)
    assert len({method_colour(m) for m in registered}) == len(registered)  # registered methods never share
    from finepruner import methods

    assert set(methods.available()) <= set(METHOD_COLOURS)  # a new method gets its own fixed colour
    assert method_colour("fastv") == method_colour("fastv K=3") == method_colour("fastv:score_impl=eager@64")
    assert method_colour("FastV") == METHOD_COLOURS["fastv"]
    assert method_colour("my_method") == method_colour("my_method tokens=3")  # hash of the method name
    assert method_colour("my_method") not in METHOD_COLOURS.values()
    assert method_rgb("vanilla") == (0, 0, 0) and to_hex([c / 255 for c in method_rgb("pdrop")]) == "#ff7f0e"


def test_variants_of_one_method_share_its_colour_and_differ_by_marker():
    styles = label_styles(["finepruner heads=8", "fastv", "finepruner heads=16"])
    assert styles["finepruner heads=8"]["color"] == styles["finepruner heads=16"]["color"]
    assert styles["finepruner heads=8"]["color"] == METHOD_COLOURS["finepruner"]
    assert styles["finepruner heads=8"]["marker"] != styles["finepruner heads=16"]["marker"]


def _line_colours(fig) -> dict[str, str]:
    return {line.get_label(): to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_a_method_has_the_same_colour_in_every_plot():
    # pdrop comes first here and fastv alone below: a colour cycle would give fastv two colours
    budget = budget_figure(grid(["pdrop", "fastv", "random"], ["gqa", "pope"]))
    pareto = pareto_figure(grid(["fastv"], ["gqa"]))
    scatter = {c.get_label(): to_hex(c.get_facecolor()[0]) for ax in pareto.axes for c in ax.collections}
    points = [CostPoint("random", 0.2, 20.0, 18.0, 22.0, "4"), CostPoint("fastv", 0.4, 60.0, 58.0, 62.0, "4")]
    cost = cost_figure(points, xlabel="GFLOPs", ylabel="accuracy",
                       reference=CostPoint("vanilla", 0.76, 65.0, 63.0, 67.0))
    cost_colours = {c.get_label(): to_hex(c.lines[0].get_color()) for c in cost.axes[0].containers}
    cost_colours.update(_line_colours(cost))  # the vanilla reference line
    fastv = METHOD_COLOURS["fastv"]
    assert _line_colours(budget)["fastv"] == scatter["fastv"] == cost_colours["fastv"] == fastv
    assert _line_colours(budget)["random"] == cost_colours["random"] == METHOD_COLOURS["random"]
    assert _line_colours(budget)["vanilla"] == cost_colours["vanilla"] == METHOD_COLOURS["vanilla"]


def test_bench_plot_uses_the_method_colour(tmp_path):
    # pdrop alone: a palette in order of appearance would draw it in the first colour (fastv's)
    entries = [{"status": "ok", "label": "pdrop@32", "budget": 32,
                "ratios": {"llm_flops": 0.5, "llm_time_median": 0.5}}]
    plot_png(entries, tmp_path / "bench.png")
    with Image.open(tmp_path / "bench.png") as image:
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert method_rgb("pdrop") in colours and method_rgb("fastv") not in colours


@pytest.mark.parametrize("benches", [["gqa"], ["gqa", "pope", "mme", "mmbench", "textvqa"]])
def test_x_tick_labels_do_not_overlap(benches):
    fig = pareto_figure(grid(["fastv", "pdrop", "random", "vispruner"], benches))
    renderer = rendered(fig)
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        assert len(boxes) >= 2
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), [t.get_text() for t in ax.get_xticklabels()]
        assert not ax.xaxis.get_offset_text().get_text()  # no "1e-4" multiplier beside the axis


def _covered(fig) -> list:
    """Bounding boxes a legend must not cover: every panel, tick label, axis label and title."""
    renderer = rendered(fig)
    boxes = []
    for ax in fig.axes:
        if not ax.axison:
            continue
        boxes.append(ax.get_window_extent(renderer))
        texts = [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()]
        boxes += [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
    return boxes


@pytest.mark.parametrize("benches", [["gqa"], ["gqa", "pope"], ["gqa", "pope", "mme", "mmbench", "textvqa"]])
def test_legend_never_covers_a_panel_or_an_axis_label(benches):
    methods = ["fastv", "pdrop", "random", "vispruner", "cdpruner", "sparsevlm", "finepruner", "dart"]
    for fig in (budget_figure(grid(methods, benches)), pareto_figure(grid(methods, benches))):
        legend = fig.legends[0].get_window_extent(rendered(fig))
        assert all(not legend.overlaps(box) for box in _covered(fig))


def test_cost_figure_legend_and_ticks():
    points = [CostPoint(m, x, 40.0 + x, 38.0 + x, 42.0 + x, str(t)) for m in ("fastv", "random", "vispruner")
              for x, t in ((0.204, 4), (0.218, 8), (0.246, 16), (0.305, 32))]
    fig = cost_figure(points, xlabel="GFLOPs", ylabel="accuracy", reference=CostPoint("vanilla", 0.757, 65, 63, 67))
    legend = fig.legends[0].get_window_extent(rendered(fig))
    assert all(not legend.overlaps(box) for box in _covered(fig))
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"fastv", "random", "vispruner", "vanilla"}


def test_saved_plot_includes_the_outside_legend(tmp_path):
    path = plot_pareto(grid(["fastv", "pdrop"], ["gqa"]), tmp_path / "p.png")
    with Image.open(path) as image:
        width, height = image.size
    assert width > 1.2 * height  # one 4 x 3.2 in panel plus the legend on its right
