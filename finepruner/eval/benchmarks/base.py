"""The benchmark interface (spec ``eval_protocol.md`` sections 1 and 3-12).

A benchmark declares its files (relative to its folder under the data root, i.e. LLaVA's
``playground/data/eval`` layout), how to build its samples (prompt text, image), its
``max_new_tokens`` and its scorer. The runner knows nothing of any one benchmark.

Scoring is in the lm-evaluation-harness / lmms-eval shape (``finepruner.eval.aggregation``):
``question_results`` matches the answers to the questions and calls ``process_results(question,
answer)`` for each, which returns ``{metric: value}``; ``aggregation()`` maps every metric to a function
over the list of its values; ``metrics_from`` builds the scorer's output (headline, breakdowns) from
those values only, and ``score`` is ``metrics_from(question_results(...))``. ``units`` gives the
resampling units of a metric for the paired statistics (``finepruner.sweep.stats``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from finepruner.eval.aggregation import Aggregation, QuestionResults, Units
from finepruner.eval.errors import DataError, NoQuestionScores
from finepruner.eval.io import answer_key, read_jsonl

#: LLaVA's short-answer suffix (spec section 1, table of prompt suffixes).
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclass
class Sample:
    """One question as the runner sees it.

    ``text`` is the USER message after ``<image>\\n`` (suffix included); ``prompt`` is what LLaVA saves
    in the answers file's ``prompt`` field; ``extra`` holds additional answer fields (MMBench's
    ``round_id``, ``options``, ``option_char``).
    """

    question_id: Any
    prompt: str
    text: str
    image: Path | None = None
    image_b64: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return answer_key(self.question_id, self.prompt)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_b64 is not None

    @property
    def image_ref(self) -> str:
        return str(self.image) if self.image is not None else f"<base64 image of {self.question_id}>"

    def open_image(self) -> Image.Image:
        """The sample's image as RGB; raises ``OSError``/``ValueError`` when unreadable."""
        if self.image is not None:
            with Image.open(self.image) as img:
                return img.convert("RGB")
        if self.image_b64 is not None:
            with Image.open(io.BytesIO(base64.b64decode(self.image_b64))) as img:
                return img.convert("RGB")
        raise ValueError(f"sample {self.question_id} has no image")


def result(
    bench: Benchmark, *, scored: bool, headline: str | None = None, value: float | None = None, **details: Any
) -> dict[str, Any]:
    """A metrics dict with the common header; ``scored=False`` marks "not scored here" explicitly."""
    out: dict[str, Any] = {"benchmark": bench.name, "split": bench.split, "scored": scored}
    if scored:
        out["headline"] = {"metric": headline, "value": value}
    else:
        out["status"] = "not scored here"
    out.update(details)
    return out


class Benchmark:
    """Base class; subclasses set the class attributes and implement :meth:`process_results`,
    :meth:`aggregation`, :meth:`question_results` and :meth:`metrics_from` (and :meth:`load` when the
    question file is not LLaVA's ``model_vqa_loader`` JSONL)."""

    name: ClassVar[str] = ""
    #: Folder under the data root (LLaVA's name).
    subdir: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("default",)
    max_new_tokens: ClassVar[int] = 128
    #: split -> {file key: path relative to the benchmark folder}.
    default_files: ClassVar[Mapping[str, Mapping[str, str]]] = {}
    #: split -> file keys needed to run inference / to score (checked before the model loads).
    inference_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    scoring_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    description: ClassVar[str] = ""
    #: The reported metric: a key of :meth:`aggregation` (the store's ``metric``).
    headline: ClassVar[str] = ""

    def __init__(self, split: str | None = None, files: Mapping[str, str] | None = None) -> None:
        self.split = split or self.splits[0]
        if self.split not in self.splits:
            raise ValueError(
                f"benchmark {self.name!r} has no split {self.split!r}; valid: {list(self.splits)}"
            )
        self.files: dict[str, str] = dict(self.default_files.get(self.split, {}))
        for key, value in (files or {}).items():
            if key not in self.files:
                raise ValueError(
                    f"benchmark {self.name!r} ({self.split}) has no file key {key!r}; "
                    f"valid: {sorted(self.files)}"
                )
            self.files[key] = str(value)

    @property
    def spec(self) -> str:
        """``name`` or ``name:split`` as accepted by the registry and the CLI."""
        return self.name if self.split == self.splits[0] else f"{self.name}:{self.split}"

    def folder(self, data_root: str | Path) -> Path:
        return Path(data_root) / self.subdir

    def path(self, data_root: str | Path, key: str) -> Path:
        """The path of file ``key``; absolute overrides are used as given."""
        p = Path(self.files[key]).expanduser()
        return p if p.is_absolute() else self.folder(data_root) / p

    def check(self, data_root: str | Path, *, inference: bool = True, scoring: bool = True) -> None:
        """Raise :class:`DataError` listing every missing path this benchmark needs."""
        root = Path(data_root)
        if not root.is_dir():
            problem = "is a file, not a directory" if root.exists() else "not found"
            raise DataError(f"data root {problem}: {root} (expected LLaVA's playground/data/eval layout)")
        keys: list[str] = []
        if inference:
            keys += self.inference_keys.get(self.split, ())
        if scoring:
            keys += self.scoring_keys.get(self.split, ())
        missing = [
            f"{key}: {self.path(root, key)}"
            for key in dict.fromkeys(keys)
            if not self.path(root, key).exists()
        ]
        if missing:
            raise DataError(f"{self.spec}: missing " + "; ".join(missing))

    def load(self, data_root: str | Path) -> list[Sample]:
        """All samples of the split, in question-file order. Default: LLaVA's question JSONL
        (``files["questions"]``) with images under ``files["images"]``."""
        return load_llava_questions(self.path(data_root, "questions"), self.path(data_root, "images"))

    def answer_identity(self, answer: Mapping[str, Any]) -> Any:
        """What makes an answer unique in this benchmark (two answers with the same identity are
        duplicates): ``question_id``; benchmarks whose ids repeat across questions add the prompt."""
        return answer["question_id"]

    # -- scoring: process_results + aggregation ---------------------------------------------------------
    def aggregation(self) -> dict[str, Aggregation]:
        """``{metric: aggregation}``: each metric's function over the list of its per-question values."""
        raise NotImplementedError

    def process_results(self, question: Any, answer: Mapping[str, Any] | None, *, judge: Any = None) -> dict[str, Any]:
        """``{metric: value}`` of one question (its ground-truth record) and its answer (None: unanswered,
        where the official scorer counts unanswered questions)."""
        raise NotImplementedError

    def question_results(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> QuestionResults:
        """Match ``answers`` to the questions (reading the ground truth once) and return every question's
        :meth:`process_results`, with counts and warnings in ``info``; writes submission files to
        ``out_dir`` where a server or a judge scores the split."""
        raise NotImplementedError

    def metrics_from(self, results: QuestionResults) -> dict[str, Any]:
        """The scorer's output (headline, breakdowns, counts) computed from ``results`` alone."""
        raise NotImplementedError

    def aggregate(self, results: QuestionResults) -> dict[str, float | None]:
        """Every metric of :meth:`aggregation` over ``results``."""
        return {metric: agg(results.of(metric)) for metric, agg in self.aggregation().items()}

    def units(self, results: QuestionResults, metric: str | None = None) -> Units:
        """Resampling units of ``metric`` (default: the headline) for paired statistics; raises
        :class:`NoQuestionScores` when the split is not scored locally (or nothing was scored)."""
        aggregations = self.aggregation()
        metric = metric or self.headline
        if metric not in aggregations:
            raise ValueError(f"{self.spec}: no metric {metric!r}; allowed: {', '.join(aggregations)}")
        values = results.of(metric)
        if not values:
            reason = results.info.get("reason") or "no question was scored"
            raise NoQuestionScores(f"{self.spec}: no per-question results ({reason})")
        return aggregations[metric].units(values, self.spec, metric)

    def score(
        self,
        answers: list[dict[str, Any]],
        data_root: str | Path,
        *,
        out_dir: Path | None = None,
        judge: Any = None,
        model_id: str = "model",
    ) -> dict[str, Any]:
        """Official metrics of ``answers`` (LLaVA answer records), or a "not scored here" result:
        ``metrics_from(question_results(...))``."""
        return self.metrics_from(
            self.question_results(answers, data_root, out_dir=out_dir, judge=judge, model_id=model_id)
        )

    def scored_result(self, results: QuestionResults, **details: Any) -> dict[str, Any]:
        """:func:`result` with the headline aggregated from ``results`` (scored when it has values)."""
        value = self.aggregation()[self.headline](results.of(self.headline))
        scored = bool(results.of(self.headline))
        return result(self, scored=scored, headline=self.headline, value=value, **details)


def load_llava_questions(path: Path, image_dir: Path) -> list[Sample]:
    """Samples of a ``model_vqa_loader`` question file (``question_id``, ``image``, ``text``)."""
    samples = []
    for i, row in enumerate(read_jsonl(path), 1):
        for fld in ("question_id", "image", "text"):
            if fld not in row:
                raise DataError(f"{path}: line {i} has no {fld!r} field")
        samples.append(
            Sample(
                question_id=row["question_id"],
                prompt=row["text"],
                text=row["text"],
                image=image_dir / row["image"],
            )
        )
    return samples


def index_answers_by_id(answers: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """``{question_id: answer}``; later duplicates win, as in LLaVA's converters."""
    return {a["question_id"]: a for a in answers}
