"""The ``finepruner`` model of lmms-eval 0.7.x: any lmms-eval image task, on a pruned model of any family.

Spec ``eval_protocol.md`` §15.3-15.4. Installed with ``pip install finepruner[lmms]``, the package's entry
point (group ``lmms_eval.models``, :func:`finepruner.integrations.lmms_eval_models`) registers the model in
lmms-eval's model registry; then::

    lmms-eval --model finepruner --model_args pretrained=PATH,method=fastv,tokens=64 \\
        --tasks mme,gqa --batch_size 8 --output_path logs/
    accelerate launch --num_processes=8 -m lmms_eval --model finepruner ...    # data parallel

``model_args`` are :data:`finepruner.integrations.runtime.MODEL_KEYS` (``pretrained``, ``method``,
``dtype``, ``device``, ``image_aspect_ratio``, ``layout``, ``stats_path``, ...) and every parameter of the
method (``tokens=64,K=2``, lists as ``layers=[2,6,15]``); ``processor.NAME=VALUE`` goes to the processor.
A bad argument is a ``ValueError`` raised before the weights are read. The model is "simple" (it receives
``doc_to_text``'s text and builds the family's own prompt: LLaVA-1.5's ``vicuna_v1`` string, else the
processor's chat template). Decoding is greedy; a task's ``max_new_tokens`` and ``until`` are honoured, and
a task asking for sampling or beams is answered greedily with a warning (recorded in the statistics).

Statistics: after the generation requests of a run, rank 0 writes ``<output_path>/<model>/
<time>_finepruner_stats.json`` beside lmms-eval's ``<time>_results.json`` (``<model>`` is lmms-eval's own
sanitised ``pretrained`` value; ``stats_path=FILE`` overrides): per task the mean kept visual tokens per
stage, layer-averaged visual tokens and prefill FLOPs per sample, and one row per document.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms

from finepruner.integrations.runtime import ModelArgs, PrunedModel, Request, greedy_conflicts

#: lmms-eval's default ``max_new_tokens`` for a task that sets none (its stock LLaVA wrapper's).
DEFAULT_MAX_NEW_TOKENS = 1024


def _log() -> Any:
    from loguru import logger

    return logger


def cli_output_path(argv: list[str] | None = None) -> str | None:
    """The ``--output_path`` of the lmms-eval command line this process runs (None if there is none)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.output_path


class FinePruner(lmms):
    """lmms-eval model: a checkpoint pruned by a finepruner method
    (:class:`~finepruner.integrations.runtime.PrunedModel`)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.args = ModelArgs.from_kwargs({"pretrained": pretrained, **kwargs})
        self.runtime = PrunedModel(self.args)
        self.ignored_gen_kwargs: dict[str, dict[str, Any]] = {}
        self._stats_file: Path | None = None

    # -- the interface lmms-eval reads -----------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def device(self) -> Any:
        return self.runtime.device

    @property
    def model(self) -> Any:
        return self.runtime.model

    @property
    def tokenizer(self) -> Any:
        return self.runtime.generator.tokenizer

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the finepruner model answers generate_until tasks only (every LLaVA benchmark is one); "
            "loglikelihood/multiple-choice tasks are not supported")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the finepruner model does not support multi-round generation tasks")

    def _request(self, instance: Any) -> Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        gen_kwargs = dict(gen_kwargs or {})
        conflicts = greedy_conflicts(gen_kwargs)
        if conflicts and task not in self.ignored_gen_kwargs:
            self.ignored_gen_kwargs[task] = conflicts
            _log().warning(f"finepruner: task {task} asks for {conflicts}; decoding greedily")
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        def visuals() -> list[Any]:  # decoded when the request's batch runs
            return list(doc_to_visual(self.task_dict[task][split][doc_id]) or []) if doc_to_visual else []

        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        return Request(text=context, images=visuals, max_new_tokens=max_new_tokens, until=list(until),
                       group=f"{task}/{split}", key={"task": task, "doc_id": doc_id})

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Answers in request order; batches are consecutive requests of one task (``--batch_size``)."""
        converted = [self._request(r) for r in requests]
        answers = self.runtime.answer(converted, progress=self.rank == 0)
        self._write_stats()
        return answers

    # -- statistics ------------------------------------------------------------------------------------
    def stats_path(self) -> Path | None:
        """``stats_path=`` if given, else ``<--output_path>/<lmms-eval's model folder>/<time>_finepruner_stats.json``
        (a new name per model instance: runs of one ``--config`` file do not overwrite each other)."""
        if self.args.stats_path:
            return Path(self.args.stats_path)
        if self._stats_file is None:
            output = cli_output_path()
            if output is None:
                return None
            from lmms_eval.utils import sanitize_model_name

            folder = Path(output) / sanitize_model_name(self.args.pretrained)
            stamp = time.strftime("%Y%m%d_%H%M%S")
            path, n = folder / f"{stamp}_finepruner_stats.json", 1
            while path.exists():
                path, n = folder / f"{stamp}_{n}_finepruner_stats.json", n + 1
            self._stats_file = path
        return self._stats_file

    def _gathered_samples(self) -> list[dict[str, Any]] | None:
        """Every rank's sample rows on rank 0 (None on the other ranks), padding duplicates removed."""
        samples = self.runtime.samples
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                gathered: list[Any] = [None] * self.world_size if self.rank == 0 else None  # type: ignore[assignment]
                dist.gather_object(samples, gathered, dst=0)
                if self.rank != 0:
                    return None
                samples = [row for part in gathered for row in part]
            elif self.rank != 0:
                return None
        seen, unique = set(), []
        for row in samples:
            key = (row.get("task"), row.get("doc_id"))
            if key not in seen:
                seen.add(key)
                unique.append(row)
        return sorted(unique, key=lambda r: (str(r.get("task")), r.get("doc_id") or 0))

    def _write_stats(self) -> None:
        samples = self._gathered_samples()
        if samples is None:
            return
        record = self.runtime.stats(samples)
        record["world_size"] = self.world_size
        record["ignored_gen_kwargs"] = self.ignored_gen_kwargs
        path = self.stats_path()
        if path is None:
            _log().warning("finepruner: no --output_path or stats_path=, pruning statistics not written; per task: "
                           + str({t: {k: v for k, v in s.items() if k.startswith("mean_")}
                                  for t, s in record["tasks"].items()}))
            return
        PrunedModel.write_stats(record, path)
        _log().info(f"finepruner: pruning statistics written to {path}")
