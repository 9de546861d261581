"""Evaluation harness: the 10 LLaVA-1.5 benchmarks scored as the official protocol (spec eval_protocol.md).

Public API::

    from finepruner.eval import benchmarks
    bench = benchmarks.get("pope")                 # or "vizwiz:val", files={"annotations": "coco"}
    samples = bench.load(data_root)                # [Sample(question_id, prompt, text, image, ...)]
    metrics = bench.score(answers, data_root)      # answers: LLaVA answer records (dicts)

    from finepruner.eval import EvalConfig, evaluate, score_file
    evaluate(EvalConfig(benches=["pope"], data_root=..., out=..., model=path))
    score_file("pope", "answers.jsonl", data_root)
"""

from finepruner.eval.benchmarks import available, get
from finepruner.eval.errors import AnswersError, DataError, EvalError, UnknownBenchmarkError
from finepruner.eval.normalize import evalai_normalize
from finepruner.eval.runner import EvalConfig, Generator, evaluate, merge_answers, run_benchmark, score_file

__all__ = [
    "AnswersError",
    "DataError",
    "EvalConfig",
    "EvalError",
    "Generator",
    "UnknownBenchmarkError",
    "available",
    "evaluate",
    "evalai_normalize",
    "get",
    "merge_answers",
    "run_benchmark",
    "score_file",
]
