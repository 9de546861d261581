"""``finepruner bench``: every method and budget side by side, in one process, interleaved over rounds.

Methodology (``docs/performance.md``):

* One model, one set of synthetic inputs; each *variant* (a method, its parameters and a budget) is
  applied, run (a prefill, then ``decode_steps`` single-token steps on the same cache) and removed.
  After ``warmup`` unrecorded rounds, ``rounds`` rounds run every variant, the order rotated by one
  place each round; median and min over rounds are reported.
* ``plain`` is the model with nothing applied (plain transformers), run in the same rounds as every
  variant: ``vanilla_vs_plain`` gives vanilla's prefill, decode and peak-memory ratios over it (the
  engine's own overhead), as ratios of medians, of mins and the median of the per-round ratios.
* ``prefill`` = time to first token: one ``model(**inputs, logits_to_keep=1)`` call with the pixels
  (vision tower, projector, language model, selection, LM head on the last token). ``vision`` = from
  the vision tower's pre-hook to the projector's forward hook, minus the time of the method's vision
  capture hooks (those count as selection). ``llm`` = prefill - vision. ``decode`` = mean per step.
  On CUDA every boundary is synchronised.
* ``selection`` = ``PruneStats.selection_seconds`` (engine: vision signals taken, attention signals,
  ``select``) + the method's vision capture hooks.
* ``peak memory``: CUDA ``max_memory_allocated`` over the run minus the allocation before it; on CPU
  the increase of the process's peak RSS over its RSS before the run, with the peak reset before each
  run (``/proc/self/clear_refs`` = 5, Linux) after ``malloc_trim(0)`` returned freed heap memory; where
  ``clear_refs`` is not writable, ``ru_maxrss`` deltas (only new highs show).
* ``kv bytes``: the sum of the cache tensors' ``nbytes`` right after the prefill.
* CPU time (``prefill_cpu_s``, ``decode_cpu_s_per_token``; CPU devices only): ``time.process_time`` of
  the same spans, all threads of the process; less disturbed than wall time by other processes on a
  shared machine (it still includes their cache and memory-bandwidth interference).
* FLOPs: ``PruneStats.flops`` (``finepruner.bench.flops``) of the variant's last prefill.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import finepruner
from finepruner import methods
from finepruner.bench.flops import TFLOP, shape_dict
from finepruner.bench.shapes import synthetic_crops, synthetic_visual_tokens
from finepruner.engine.state import PruneStats
from finepruner.methods.base import ModelShape
from finepruner.methods.spec import parse_method_spec
from finepruner.models.adapters import adapter_for

DEFAULT_BUDGETS = (64, 128, 192)
#: Default budgets by visual tokens per image (LLaVA-1.5's 576; the toy model's 144; the tiny shape's 64;
#: LLaVA-NeXT's 2,928 of a 672-px square, ``next-medium``/``llava-next-7b``: 320/640/960, the papers'
#: 5 x 64/128/192 of 2,880); other counts get ``default_budgets``' proportional choice.
BUDGETS_BY_VISUAL: dict[int, tuple[int, ...]] = {576: DEFAULT_BUDGETS, 144: (16, 32, 64), 64: (8, 16, 32),
                                                 2928: (320, 640, 960)}
#: Label (and ``method``) of the reference run without any method applied: plain transformers.
PLAIN = "plain"


@dataclass
class Variant:
    """One configuration: ``method`` with ``params`` (``tokens`` included when a budget applies)."""

    label: str
    method: str
    params: dict = field(default_factory=dict)
    budget: int | None = None


def parse_method(text: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` (``finepruner.methods.spec``); unknown names raise,
    listing the registered methods."""
    name, params = parse_method_spec(text)
    methods.get(name)
    return name, params


def default_budgets(num_visual: int) -> tuple[int, ...]:
    """``BUDGETS_BY_VISUAL[num_visual]``, else 1/9, 2/9 and 1/3 of the visual tokens (64/128/192 of 576)."""
    if num_visual in BUDGETS_BY_VISUAL:
        return BUDGETS_BY_VISUAL[num_visual]
    return tuple(sorted({max(1, round(num_visual * f)) for f in (1 / 9, 2 / 9, 1 / 3)}))


def build_variants(specs: Sequence[str], budgets: Sequence[int]) -> list[Variant]:
    """Plain transformers and vanilla first, then every method spec at every budget (``tokens=N``)."""
    variants = [Variant(PLAIN, PLAIN), Variant("vanilla", "vanilla")]
    for spec in specs:
        name, params = parse_method(spec)
        if name == "vanilla":
            continue
        for budget in budgets:
            variants.append(Variant(f"{spec}@{budget}", name, {**params, "tokens": budget}, budget))
    return variants


def attention_scored() -> tuple[str, ...]:
    """Registered methods scored with the engine's last-query attention, where ``score_impl`` applies
    (``PruningMethod.scores_attention``)."""
    return tuple(name for name in methods.available() if methods.get(name).scores_attention)


def default_methods() -> list[str]:
    """Every registered method (vanilla is always run as the reference)."""
    return [name for name in methods.available() if name != "vanilla"]


# -- measurement helpers ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter()


class _Memory:
    """Peak memory increase of one run (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm_reset"
        self._libc = None
        if device.type != "cuda":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:
                self.method = "ru_maxrss_delta"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        gc.collect()
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.method == "rss_hwm_reset":
            self._base = self._status("VmRSS")
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.method == "rss_hwm_reset":
            return max(0, self._status("VmHWM") - self._base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


def _timed_hooks(handle, device: torch.device, total: list[float]) -> None:
    """Wrap the handle's vision-capture hooks so that their time accumulates into ``total[0]``."""
    capture = getattr(handle, "_vision", None)
    for removable in getattr(capture, "_hooks", []) or []:
        hooks = removable.hooks_dict_ref()
        if hooks is None or removable.id not in hooks:
            continue
        original = hooks[removable.id]

        def timed(*args, _original=original, **kwargs):
            started = _now(device)
            try:
                return _original(*args, **kwargs)
            finally:
                total[0] += _now(device) - started

        hooks[removable.id] = timed


def kv_cache_bytes(cache) -> int:
    """Bytes held by a ``DynamicCache``'s key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.nbytes
    return total


# -- one run of one variant ---------------------------------------------------------------------------
def _cpu_clock(device: torch.device) -> float | None:
    """Process CPU time (every thread), or None on accelerators (where it says nothing about the work)."""
    return time.process_time() if device.type == "cpu" else None


def _elapsed(start: float | None, end: float | None, per: int = 1) -> float | None:
    return None if start is None or end is None else (end - start) / max(1, per)


def unpruned_stats(model, inputs: dict) -> PruneStats:
    """The ``PruneStats`` of a prefill in which every decoder layer sees the whole prompt (what vanilla
    records; used for the plain-transformers run, which has no handle)."""
    adapter = adapter_for(model)
    batch, length = inputs["input_ids"].shape
    layers = adapter.num_layers
    visual = synthetic_visual_tokens(model, inputs)
    return PruneStats(sequence_length=[length] * layers, visual_tokens=[visual] * layers, batch=batch,
                      config=model.config, crops=synthetic_crops(inputs))


def run_variant(model, inputs: dict, variant: Variant, params: dict, decode_steps: int, memory: _Memory,
                instruction: str | None = None) -> dict:
    """Apply ``variant`` (nothing for ``PLAIN``), time one prefill and ``decode_steps`` decode steps, remove it."""
    device = inputs["input_ids"].device
    batch = inputs["input_ids"].shape[0]
    adapter = adapter_for(model)
    vision_marks: list[float] = []
    capture_total = [0.0]
    hooks = [
        adapter.vision_tower.register_forward_pre_hook(lambda *a: vision_marks.append(_now(device))),
        adapter.projector.register_forward_hook(lambda *a: vision_marks.append(_now(device))),
    ]
    handle = None
    try:
        if variant.method != PLAIN:
            handle = finepruner.apply(model, variant.method, **params)
            handle.synchronize_timing = True
            _timed_hooks(handle, device, capture_total)
            if instruction is not None and getattr(handle.method, "needs_instructions", False):
                handle.method.set_instructions([instruction] * batch)  # the synthetic prompt's text
        memory.start()
        with torch.inference_mode():
            cpu_started, started = _cpu_clock(device), _now(device)
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            prefill, cpu_prefilled = _now(device) - started, _cpu_clock(device)
            cache = getattr(out, "cache", None) or out.past_key_values
            kv_bytes = kv_cache_bytes(cache)
            token = out.logits[:, -1:].argmax(-1)
            mask = inputs["attention_mask"]
            del out
            last = adapter.decode_positions(inputs)  # Qwen-VL: decode calls need explicit 3-D positions
            cpu_decode_started, decode_started = _cpu_clock(device), _now(device)
            for index in range(decode_steps):
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                positions = {} if last is None else {"position_ids": last + index + 1}
                step = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1,
                             **positions)
                token = step.logits[:, -1:].argmax(-1)
            decode = (_now(device) - decode_started) / max(1, decode_steps)
            cpu_decoded = _cpu_clock(device)
            del cache, token, mask
        peak = memory.stop()
        stats = handle.stats if handle is not None else unpruned_stats(model, inputs)
        if stats.crops is None:  # the synthetic inputs' crops (all images alike, none padded)
            stats.crops = synthetic_crops(inputs)
    finally:
        if handle is not None:
            handle.remove()
        for hook in hooks:
            hook.remove()
    vision = (vision_marks[-1] - vision_marks[0] - capture_total[0]) if len(vision_marks) >= 2 else 0.0
    return {
        "prefill_s": prefill,
        "vision_s": vision,
        "llm_s": prefill - vision,
        "decode_s_per_token": decode if decode_steps else None,
        "prefill_cpu_s": _elapsed(cpu_started, cpu_prefilled),
        "decode_cpu_s_per_token": _elapsed(cpu_decode_started, cpu_decoded, decode_steps) if decode_steps else None,
        "selection_s": stats.selection_seconds + capture_total[0],
        "peak_memory_bytes": peak,
        "kv_cache_bytes": kv_bytes,
        "stats": stats,
    }


# -- the benchmark ------------------------------------------------------------------------------------
TIMED = ("prefill_s", "vision_s", "llm_s", "decode_s_per_token", "selection_s", "peak_memory_bytes",
         "prefill_cpu_s", "decode_cpu_s_per_token")
#: The measures compared between vanilla and plain transformers (``vanilla_vs_plain``).
PLAIN_COMPARED = ("prefill_s", "llm_s", "decode_s_per_token", "peak_memory_bytes", "prefill_cpu_s",
                  "decode_cpu_s_per_token")


def _summary(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "values": values}


def method_params(variant: Variant, num_heads: int, extra: Callable[[str], dict] | None,
                  num_layers: int = 32, num_visual: int = 576) -> dict:
    """The parameters a variant is applied with: ``extra``'s (CDPruner: a CLIP text tower), overridden by
    the variant's own, completed by the method's ``defaults_for`` for this shape (``finepruner``: H = heads/4;
    SparseVLM on shapes other than LLaVA-1.5: ``methods.sparsevlm.sparsevlm_mapping``)."""
    params = dict(extra(variant.method)) if extra is not None else {}
    params.update(variant.params)
    if variant.method == PLAIN:
        return params
    return methods.get(variant.method).defaults_for(ModelShape(num_layers, num_heads, num_visual), params)


def run_bench(
    model,
    inputs: dict,
    variants: Sequence[Variant],
    rounds: int = 7,
    warmup: int = 1,
    decode_steps: int = 8,
    extra_params: Callable[[str], dict] | None = None,
    instruction: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run every variant ``warmup + rounds`` times, interleaved; returns one result dict per variant
    (``status`` "ok" or "skipped: reason"), in the order given, with ratios against vanilla (and, on the
    vanilla entry, ``vs_plain``: its ratios over the ``PLAIN`` variant, when both ran)."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r}: at least one recorded round is needed")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: allowed: 0 or more warm-up rounds")
    if not isinstance(decode_steps, int) or decode_steps < 0:
        raise ValueError(f"decode_steps={decode_steps!r}: allowed: 0 (no decode) or more")
    device = inputs["input_ids"].device
    adapter = adapter_for(model)
    num_visual = synthetic_visual_tokens(model, inputs)  # per sample (one image): 2,928 on next-medium
    memory = _Memory(device)
    runnable: list[tuple[Variant, dict]] = []
    results: dict[str, dict] = {}
    for variant in variants:
        params = method_params(variant, adapter.num_heads, extra_params, adapter.num_layers, num_visual)
        entry = {"label": variant.label, "method": variant.method, "budget": variant.budget,
                 "params": {k: v for k, v in params.items() if _jsonable(v)}}
        try:
            if variant.method != PLAIN:
                finepruner.apply(model, variant.method, **params).remove()  # validates the plan
        except (ValueError, RuntimeError, TypeError, FileNotFoundError) as err:
            entry["status"] = f"skipped: {err}"
            results[variant.label] = entry
            continue
        entry["status"] = "ok"
        entry["runs"] = []
        results[variant.label] = entry
        runnable.append((variant, params))
    total = warmup + rounds
    for round_index in range(total):
        shift = round_index % max(1, len(runnable))
        order = runnable[shift:] + runnable[:shift]
        for variant, params in order:
            try:
                run = run_variant(model, inputs, variant, params, decode_steps, memory, instruction)
            except (ValueError, RuntimeError) as err:
                results[variant.label]["status"] = f"failed: {err}"
                runnable = [r for r in runnable if r[0] is not variant]
                continue
            if round_index >= warmup:
                results[variant.label]["runs"].append(run)
        if log is not None:
            log(f"round {round_index + 1}/{total} done{' (warm-up)' if round_index < warmup else ''}")
    return summarise(list(results.values()), memory.method)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def summarise(entries: list[dict], memory_method: str) -> list[dict]:
    """Medians, mins, FLOPs, the ratios against vanilla and vanilla's against plain transformers."""
    runs_of = {entry["label"]: entry.get("runs") or [] for entry in entries}
    for entry in entries:
        runs = entry.pop("runs", None)
        if not runs:
            if entry["status"] == "ok":
                entry["status"] = "failed: no recorded run"
            continue
        for key in TIMED:
            entry[key] = _summary([run[key] for run in runs])
        entry["peak_memory_method"] = memory_method
        entry["kv_cache_bytes"] = runs[-1]["kv_cache_bytes"]
        stats = runs[-1]["stats"]
        flops = stats.flops or {}
        entry["visual_tokens"] = list(stats.visual_tokens)
        entry["sequence_length"] = list(stats.sequence_length)
        entry["average_visual_tokens"] = stats.average_visual_tokens
        entry["flops"] = {k: v for k, v in flops.items() if k != "layers"}
    vanilla = next((e for e in entries if e["label"] == "vanilla" and e["status"] == "ok"), None)
    for entry in entries:
        if entry["status"] != "ok" or vanilla is None:
            continue
        entry["ratios"] = _ratios(entry, vanilla)
    plain = next((e for e in entries if e["label"] == PLAIN and e["status"] == "ok"), None)
    if vanilla is not None and plain is not None:
        vanilla["vs_plain"] = plain_comparison(runs_of[PLAIN], runs_of["vanilla"])
    return entries


def plain_comparison(plain_runs: Sequence[dict], vanilla_runs: Sequence[dict]) -> dict:
    """Vanilla over plain transformers for every measure of ``PLAIN_COMPARED``: ratio of the medians, of
    the mins, and the median of the per-round ratios (round i of vanilla over round i of plain; the two
    run next to each other in every round, so a load change between rounds cancels out)."""
    comparison: dict[str, Any] = {"rounds": min(len(plain_runs), len(vanilla_runs))}
    for key in PLAIN_COMPARED:
        pairs = [(p[key], v[key]) for p, v in zip(plain_runs, vanilla_runs) if p.get(key) and v.get(key) is not None]
        if not pairs:
            comparison[key] = None
            continue
        plain_values, vanilla_values = [p for p, _ in pairs], [v for _, v in pairs]
        comparison[key] = {
            "median": statistics.median(vanilla_values) / statistics.median(plain_values),
            "min": min(vanilla_values) / min(plain_values),
            "paired_median": statistics.median(v / p for p, v in pairs),
        }
    return comparison


def _ratios(entry: dict, vanilla: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    ratios: dict[str, Any] = {}
    for stat in ("median", "min"):
        llm = ratio(entry["llm_s"][stat], vanilla["llm_s"][stat])
        ttft = ratio(entry["prefill_s"][stat], vanilla["prefill_s"][stat])
        ratios[f"llm_time_{stat}"] = llm
        ratios[f"prefill_time_{stat}"] = ttft
        if entry.get("decode_s_per_token") and vanilla.get("decode_s_per_token"):
            ratios[f"decode_time_{stat}"] = ratio(entry["decode_s_per_token"][stat],
                                                  vanilla["decode_s_per_token"][stat])
    llm_flops = ratio(entry["flops"].get("language_model"), vanilla["flops"].get("language_model"))
    total_flops = ratio(entry["flops"].get("total"), vanilla["flops"].get("total"))
    ratios["llm_flops"] = llm_flops
    ratios["total_flops"] = total_flops
    ratios["decode_flops"] = ratio(entry["flops"].get("decode_step"), vanilla["flops"].get("decode_step"))
    for stat in ("median", "min"):
        ratios[f"llm_time_over_flops_{stat}"] = ratio(ratios[f"llm_time_{stat}"], llm_flops)
        ratios[f"prefill_time_over_flops_{stat}"] = ratio(ratios[f"prefill_time_{stat}"], total_flops)
    ratios["selection_pct_of_vanilla_prefill"] = 100.0 * entry["selection_s"]["median"] / vanilla["prefill_s"]["median"]
    ratios["peak_memory"] = ratio(entry["peak_memory_bytes"]["median"], vanilla["peak_memory_bytes"]["median"])
    ratios["kv_cache"] = ratio(entry["kv_cache_bytes"], vanilla["kv_cache_bytes"])
    return ratios


def environment(device: torch.device) -> dict:
    """Where the numbers come from (recorded in the JSON)."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def result_document(entries: list[dict], model, meta: dict) -> dict:
    """The JSON document: metadata, shapes, vanilla over plain transformers and every variant."""
    vanilla = next((e for e in entries if e["label"] == "vanilla"), {})
    return {"meta": meta, "shapes": shape_dict(model.config), "tflop": TFLOP,
            "vanilla_vs_plain": vanilla.get("vs_plain"), "variants": entries}
