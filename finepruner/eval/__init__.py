"""Evaluation harness: the 10 LLaVA-1.5 benchmarks scored as the official protocol (spec eval_protocol.md).

Public API::

    from finepruner.eval import benchmarks
    bench = benchmarks.get("pope")                 # or "vizwiz:val", files={"annotations": "coco"}
    samples = bench.load(data_root)                # [Sample(question_id, prompt, text, image, ...)]
    metrics = bench.score(answers, data_root)      # answers: LLaVA answer records (dicts)
    results = bench.question_results(answers, data_root)   # process_results of every question
    bench.aggregation()["mean_f1"](results.of("mean_f1"))  # == metrics["mean_f1"]

    from finepruner.eval import EvalConfig, evaluate, score_file
    run = evaluate(EvalConfig(benches=["pope"], data_root=..., out=..., model=path))
    run["pope"]["headline"], run.runs["pope"].results, run.runs["pope"].efficiency, run.record
    score_file("pope", "answers.jsonl", data_root)
"""

from finepruner.eval.aggregation import QuestionResults, Units
from finepruner.eval.benchmarks import available, get
from finepruner.eval.errors import AnswersError, DataError, EvalError, NoQuestionScores, UnknownBenchmarkError
from finepruner.eval.normalize import evalai_normalize
from finepruner.eval.runner import (
    BenchmarkRun,
    EvalConfig,
    EvalResult,
    Generator,
    evaluate,
    merge_answers,
    run_benchmark,
    score_file,
)

__all__ = [
    "AnswersError",
    "BenchmarkRun",
    "DataError",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "Generator",
    "NoQuestionScores",
    "QuestionResults",
    "Units",
    "UnknownBenchmarkError",
    "available",
    "evaluate",
    "evalai_normalize",
    "get",
    "merge_answers",
    "run_benchmark",
    "score_file",
]
