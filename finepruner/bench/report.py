"""Rendering of bench results: a markdown table and a PNG plot of time ratio vs FLOPs ratio (Pillow)."""

from __future__ import annotations

from pathlib import Path

from finepruner.bench.runner import PLAIN


def _ms(summary: dict | None, stat: str = "median") -> str:
    return "-" if not summary else f"{1000 * summary[stat]:.1f}"


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = (
    "variant", "avg vis", "vision ms", "prefill ms med/min", "LLM ms med/min", "decode ms/tok",
    "select ms (% van.)", "peak MiB", "KV MiB", "LLM GFLOPs", "paper TFLOPs", "time/van. (LLM)",
    "FLOPs/van. (LLM)", "time÷FLOPs med/min",
)


def plain_line(entries: list[dict]) -> str:
    """One line: vanilla's prefill, decode-per-token and peak-memory ratios over plain transformers, measured
    in the same rounds (ratio of medians; min, and median of the per-round ratios, in brackets; CPU time
    too where measured); "" when either did not run."""
    vanilla = next((e for e in entries if e["label"] == "vanilla" and e["status"] == "ok"), None)
    comparison = (vanilla or {}).get("vs_plain")
    if not comparison:
        return ""

    def part(name: str, key: str) -> str | None:
        r = comparison.get(key)
        if not r:
            return None
        return f"{name} {r['median']:.3f} (min {r['min']:.3f}, per-round {r['paired_median']:.3f})"

    parts = [part("prefill", "prefill_s"), part("decode/token", "decode_s_per_token"),
             part("peak memory", "peak_memory_bytes"), part("CPU-time prefill", "prefill_cpu_s"),
             part("CPU-time decode/token", "decode_cpu_s_per_token")]
    return (f"vanilla / plain transformers over {comparison['rounds']} rounds: "
            + "; ".join(p for p in parts if p) + "\n")


def markdown_table(entries: list[dict]) -> str:
    """One row per variant (``plain`` = plain transformers, nothing applied); then the vanilla / plain
    ratios (``plain_line``); skipped variants are listed under the table with their reason."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    skipped = []
    for e in entries:
        if e["status"] != "ok":
            skipped.append(f"- `{e['label']}`: {e['status']}")
            continue
        r = e.get("ratios") or {}
        flops = e.get("flops") or {}
        sel = e["selection_s"]
        row = [
            e["label"],
            f"{e['average_visual_tokens']:.1f}",
            _ms(e["vision_s"]),
            f"{_ms(e['prefill_s'])} / {_ms(e['prefill_s'], 'min')}",
            f"{_ms(e['llm_s'])} / {_ms(e['llm_s'], 'min')}",
            _ms(e["decode_s_per_token"]),
            f"{1000 * sel['median']:.2f} ({_fmt(r.get('selection_pct_of_vanilla_prefill'), 2)}%)",
            f"{e['peak_memory_bytes']['median'] / 2**20:.1f}",
            f"{e['kv_cache_bytes'] / 2**20:.2f}",
            f"{flops.get('language_model', 0) / 1e9:.1f}",
            f"{flops.get('paper_tflops_per_sample', 0):.4g}",
            _fmt(r.get("llm_time_median")),
            _fmt(r.get("llm_flops")),
            f"{_fmt(r.get('llm_time_over_flops_median'))} / {_fmt(r.get('llm_time_over_flops_min'))}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    comparison = plain_line(entries)
    if comparison:
        lines += ["", comparison.rstrip("\n")]
    if skipped:
        lines += ["", "Not run:", *skipped]
    return "\n".join(lines) + "\n"


def plot_png(entries: list[dict], path: str | Path, title: str = "") -> None:
    """Scatter of measured LLM-prefill time ratio (y) against the FLOPs ratio (x), both vs vanilla, with
    the y = x line; one colour per method. Drawn with Pillow (no matplotlib needed)."""
    from PIL import Image, ImageDraw

    size, margin = 640, 60
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    points = [(e["ratios"]["llm_flops"], e["ratios"]["llm_time_median"], e) for e in entries
              if e["status"] == "ok" and e.get("ratios") and e["ratios"].get("llm_flops") is not None
              and e["label"] != PLAIN]
    top = max([1.0] + [max(x, y) for x, y, _ in points]) * 1.05

    def xy(x: float, y: float) -> tuple[float, float]:
        span = size - 2 * margin
        return margin + span * x / top, size - margin - span * y / top

    draw.rectangle([xy(0, top), xy(top, 0)], outline="black")
    draw.line([xy(0, 0), xy(top, top)], fill=(170, 170, 170))
    for tick in (0.25, 0.5, 0.75, 1.0):
        x0, y0 = xy(tick, 0)
        draw.line([(x0, y0), (x0, y0 + 5)], fill="black")
        draw.text((x0 - 10, y0 + 8), f"{tick:g}", fill="black")
        x1, y1 = xy(0, tick)
        draw.line([(x1 - 5, y1), (x1, y1)], fill="black")
        draw.text((x1 - 35, y1 - 6), f"{tick:g}", fill="black")
    draw.text((size / 2 - 90, size - 25), "FLOPs ratio vs vanilla (LLM prefill)", fill="black")
    draw.text((5, 10), "time ratio vs vanilla (LLM prefill, median)  " + title, fill="black")
    from finepruner.report.colours import method_rgb  # the method's colour in every plot

    colours: dict[str, tuple[int, int, int]] = {}
    for x, y, e in points:
        method = e["label"].split("@")[0]
        colour = colours.setdefault(method, method_rgb(method))
        cx, cy = xy(x, y)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        if e.get("budget"):
            draw.text((cx + 5, cy - 12), str(e["budget"]), fill=colour)
    for row, (method, colour) in enumerate(colours.items()):
        draw.rectangle([margin + 10, margin + 10 + 16 * row, margin + 20, margin + 20 + 16 * row], fill=colour)
        draw.text((margin + 25, margin + 8 + 16 * row), method, fill="black")
    image.save(path)


def ratio_table(entries: list[dict], time_over_flops_max: float = 1.15, selection_pct_max: float = 3.0) -> str:
    """Ratios against vanilla and the efficiency targets (``docs/performance.md``): LLM-prefill time ratio
    / FLOPs ratio <= ``time_over_flops_max`` (median, and min in brackets), selection <= ``selection_pct_max``
    % of the vanilla prefill, peak memory <= vanilla's. ``score_impl=eager`` variants are shown but not
    held to the targets (they exist to show that cost)."""
    head = ("variant", "avg vis", "LLM time ratio med (min)", "LLM FLOPs ratio", "time÷FLOPs med (min)",
            "TTFT ratio ÷ total FLOPs ratio", "decode ratio (FLOPs)", "selection % vanilla prefill",
            "peak mem ratio", "KV ratio", "targets")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        r = e.get("ratios")
        if e["status"] != "ok" or not r or e["label"] in ("vanilla", PLAIN):
            continue
        checks = []
        if "score_impl=eager" not in e["label"]:
            checks.append("time" if (r["llm_time_over_flops_median"] or 0) > time_over_flops_max else "")
            checks.append("select" if r["selection_pct_of_vanilla_prefill"] > selection_pct_max else "")
            checks.append("memory" if (r["peak_memory"] or 0) > 1.0 else "")
            missed = [c for c in checks if c]
            verdict = "met" if not missed else "missed: " + ", ".join(missed)
        else:
            verdict = "(not a target)"
        row = [
            e["label"], f"{e['average_visual_tokens']:.1f}",
            f"{_fmt(r['llm_time_median'])} ({_fmt(r['llm_time_min'])})", _fmt(r["llm_flops"]),
            f"{_fmt(r['llm_time_over_flops_median'])} ({_fmt(r['llm_time_over_flops_min'])})",
            _fmt(r["prefill_time_over_flops_median"]),
            f"{_fmt(r.get('decode_time_median'))} ({_fmt(r.get('decode_flops'))})",
            _fmt(r["selection_pct_of_vanilla_prefill"], 2), _fmt(r["peak_memory"]), _fmt(r["kv_cache"]), verdict,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
