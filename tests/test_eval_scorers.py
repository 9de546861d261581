"""Scorer quirks of spec eval_protocol.md, with hand-checked expected values."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from eval_fixtures import make_mmbench, make_mme, make_sqa, make_textvqa, make_vizwiz, make_vqav2

from finepruner.eval import benchmarks
from finepruner.eval.benchmarks.mmbench import can_infer, can_infer_option, circular_eval, read_tsv
from finepruner.eval.benchmarks.mme import mme_parse, mme_subtask_score
from finepruner.eval.benchmarks.mmvet import mmvet_grade, mmvet_query
from finepruner.eval.benchmarks.pope import pope_metrics, pope_parse
from finepruner.eval.benchmarks.sqa import sqa_parse, sqa_pred_index
from finepruner.eval.benchmarks.textvqa import textvqa_question
from finepruner.eval.benchmarks.vqav2 import vqav2_question_accuracy
from finepruner.eval.errors import AnswersError, DataError, UnknownBenchmarkError
from finepruner.eval.judge import JudgeConfig, OpenAIJudge
from finepruner.eval.normalize import evalai_normalize, leave_one_out_accuracy, vqa_eval_normalize_prediction


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),  # trailing period, number word
        ("a dog", "dog"),  # article
        ("The Dog!", "dog"),
        ("1,000", "1000"),  # word_tokenize deletes commas first
        ("red-blue", "red blue"),  # '-' not next to a space -> space
        ("red - blue", "red blue"),  # '-' next to a space -> deleted
        ("(yes)", "yes"),
        ("3.5", "3.5"),  # period before a digit survives
        ("dont", "don't"),  # contraction table
        ("the cat's toy", "cat 's toy"),  # 's split by word_tokenize
        ("none", "0"),
        ("What?\n", "what"),
        ("Yes, it is.", "yes it is"),
        ("x" + "." * 40, "x" + "." * 8),  # re.UNICODE lands in count: only 32 periods removed
    ],
)
def test_evalai_processor(raw: str, expected: str) -> None:
    assert evalai_normalize(raw) == expected


def test_vqa_eval_prediction_processing() -> None:
    assert vqa_eval_normalize_prediction("1,000 dogs") == "1000 dogs"  # (\d)(,)(\d): all punctuation deleted
    assert vqa_eval_normalize_prediction("Two.") == "2"
    assert vqa_eval_normalize_prediction("yes, it is") == "yes it is"


def test_leave_one_out_accuracy() -> None:
    assert leave_one_out_accuracy("a", ["a"] * 3 + ["b"] * 7) == pytest.approx(0.9)
    assert leave_one_out_accuracy("b", ["a"] * 3 + ["b"] * 7) == pytest.approx(1.0)
    assert leave_one_out_accuracy("c", ["c"] + ["d"] * 9) == pytest.approx(0.3)
    assert leave_one_out_accuracy("z", ["a"] * 10) == 0.0


def test_vqav2_val_accuracy_gt_punctuation_only_when_not_unanimous() -> None:
    # unanimous GT is not processed: "yes." never matches the processed prediction "yes"
    assert vqav2_question_accuracy("Yes", ["yes."] * 10) == 0.0
    assert vqav2_question_accuracy("Yes", ["yes."] * 9 + ["no"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("NO", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("There is not a dog", "no"),
        ("no.", "no"),
        ("", "yes"),
        ("Yes. No", "yes"),
        ("Nope", "yes"),
    ],
)
def test_pope_parse(text: str, expected: str) -> None:
    assert pope_parse(text) == expected


def test_pope_metrics_hand_checked() -> None:
    m = pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == m["yes_ratio"] == 50.0
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] is None and m["f1"] is None and m["yes_ratio"] == 0.0


def test_mme_parse_and_pairs() -> None:
    assert mme_parse("yes\n") == "yes" and mme_parse("not\n") == "no" and mme_parse("i think\n") == "other"
    rows = [
        ("Yes", "Yes"),
        ("No", "No"),
        ("Yes", "yes, there is"),
        ("No", "Yes"),
        ("Yes", "I think so"),
        ("No", "not"),
    ]
    s = mme_subtask_score(rows)
    assert s["acc"] == pytest.approx(400 / 6) and s["acc_plus"] == pytest.approx(100 / 3)
    assert s["score"] == pytest.approx(100.0) and s["other"] == 1
    assert mme_subtask_score([("Yes", "Yes\n"), ("No", "no")])["score"] == 200.0


def test_mme_scorer_ground_truth_lookup(tmp_path: Path) -> None:
    make_mme(tmp_path)
    short = "\nAnswer the question using a single word or phrase."
    answers = [
        {
            "question_id": "existence/0001.png",
            "prompt": "Is there a dog in this image?" + short,
            "text": "Yes",
        },
        # the GT file has two spaces before "Please answer": found by the fallback
        {
            "question_id": "existence/0001.png",
            "prompt": "Is there a cat in this image?" + short,
            "text": "No",
        },
        {
            "question_id": "artwork/images/10002.jpg",
            "prompt": "Is this artwork by Monet?" + short,
            "text": "Yes",
        },
        {
            "question_id": "artwork/images/10002.jpg",
            "prompt": "Is this artwork by Picasso?" + short,
            "text": "Yes",
        },
    ]
    m = benchmarks.get("mme").score(answers, tmp_path)
    assert m["subtasks"]["existence"]["score"] == 200.0
    assert m["subtasks"]["artwork"]["score"] == 50.0  # acc 50, acc+ 0
    assert m["perception"] == 250.0 and m["cognition"] == 0 and not m["perception_complete"]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("B. apostrophe", "B"),
        ("The answer is C.", "C"),
        ("a", "FAILED"),
        ("B.", "FAILED"),
        ("The answer is A. The answer is B.", "FAILED"),
        ("(B)", "FAILED"),
    ],
)
def test_sqa_letter_forms(text: str, letter: str) -> None:
    assert sqa_parse(text) == letter


def test_sqa_choice_range_and_img_accuracy(tmp_path: Path) -> None:
    assert sqa_pred_index("C", 2) == -1 and sqa_pred_index("B", 2) == 1
    make_sqa(tmp_path)
    bench = benchmarks.get("sqa")
    samples = bench.load(tmp_path)
    assert samples[0].prompt.startswith("Which is a noun?") and not samples[0].has_image
    assert samples[1].prompt.startswith("<image>\nContext: A map.") and samples[1].text.startswith("Context")
    answers = [
        {"question_id": s.question_id, "prompt": s.prompt, "text": t}
        for s, t in zip(samples, ["B", "The answer is A.", "b"], strict=True)
    ]
    m = bench.score(answers, tmp_path)
    assert m["img_accuracy"] == 50.0 and m["accuracy"] == pytest.approx(200 / 3)


def test_mmbench_rules() -> None:
    opts = {"A": "teddy bear", "B": "rabbit", "C": "cat"}
    assert can_infer_option("B") == "B"
    assert can_infer_option("The answer is B.") == "B"
    assert can_infer_option("(C)") == "C"
    assert can_infer_option("A B") is False
    # "A" among more than 3 tokens is an article: falls through to the option text
    assert can_infer("A cute rabbit sits here", opts) == "B"
    assert can_infer("a cute teddy bear", opts) == "A"
    assert can_infer("no idea", opts) is False


def test_mmbench_circular_groups(tmp_path: Path) -> None:
    make_mmbench(tmp_path)
    meta = {int(r["index"]): r for r in read_tsv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv")}
    ok = circular_eval(
        [
            {"index": 0, "prediction": "A"},
            {"index": 1000000, "prediction": "C"},
            {"index": 1, "prediction": "B"},
        ],
        meta,
    )
    assert ok["circular_accuracy"] == 100.0 and ok["groups"] == 2
    one_wrong_copy = circular_eval(
        [
            {"index": 0, "prediction": "A"},
            {"index": 1000000, "prediction": "A"},
            {"index": 1, "prediction": "B"},
        ],
        meta,
    )
    assert one_wrong_copy["circular_accuracy"] == 50.0
    unresolved = [{"index": 0, "prediction": "no idea"}, {"index": 1000000, "prediction": "C"}]
    assert circular_eval(unresolved, meta)["circular_accuracy"] == 0.0

    class FakeJudge:
        model = "fake"

        def complete(self, prompt: str, **kw) -> str:
            assert "There are several options" in prompt
            return "A"

    judged = circular_eval(unresolved, meta, judge=FakeJudge())
    assert judged["circular_accuracy"] == 100.0 and judged["rows_judged"] == 1


def test_mmbench_prompt_and_hint(tmp_path: Path) -> None:
    make_mmbench(tmp_path)
    s = benchmarks.get("mmbench").load(tmp_path)
    assert s[0].prompt == "A photo.\nWhat animal is shown?\nA. dog\nB. cat\nC. bird"
    assert s[0].text.endswith("\nAnswer with the option's letter from the given choices directly.")
    assert (
        s[2].prompt == "Which color?\nA. red\nB. blue"
    )  # hint "nan" dropped, options stop at the first empty
    assert s[2].extra["option_char"] == ["A", "B"]
    make_mmbench(tmp_path, "mmbench_cn", "mmbench_dev_cn_20231003.tsv")
    assert benchmarks.get("mmbench_cn").load(tmp_path)[0].text.endswith("\n请直接回答选项字母。")


@pytest.mark.parametrize(
    ("prompt", "question"),
    [
        (
            "What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.",
            "what is it?",
        ),
        (
            "Reference OCR token: A\nWhat Brand?\nAnswer the question using a single word or phrase.",
            "what brand?",
        ),
        ("What?\nAnswer the question using a single word or phrase.", "what?"),
        ("OCR tokens: a b Question: What brand? Short answer:", "what brand?"),
    ],
)
def test_textvqa_question_recovery(prompt: str, question: str) -> None:
    assert textvqa_question(prompt) == question


def test_textvqa_scorer(tmp_path: Path) -> None:
    make_textvqa(tmp_path)
    bench = benchmarks.get("textvqa")
    samples = bench.load(tmp_path)
    with pytest.raises(AnswersError):
        textvqa_question("a\nb\nc\nd")
    answers = [
        {"question_id": s.question_id, "prompt": s.prompt, "text": t}
        for s, t in zip(samples, ["Sony.", "go", "seven"], strict=True)
    ]
    m = bench.score(answers, tmp_path)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["counts"]["unknown"] == 0


def test_vqav2_val_and_submission(tmp_path: Path) -> None:
    make_vqav2(tmp_path)
    val = benchmarks.get("vqav2:val")
    samples = val.load(tmp_path)
    assert samples[0].image.name == "COCO_val2014_000000000042.jpg"
    m = val.score(
        [
            {"question_id": 42000, "prompt": "", "text": "Yes"},
            {"question_id": 42001, "prompt": "", "text": "three"},
        ],
        tmp_path,
    )
    assert m["accuracy"] == 50.0 and m["per_answer_type"] == {"number": 0.0, "yes/no": 100.0}
    test = benchmarks.get("vqav2")
    out = test.score(
        [{"question_id": 262144000, "prompt": "", "text": "Two dogs."}],
        tmp_path,
        out_dir=tmp_path / "out",
        model_id="m",
    )
    assert out["scored"] is False and out["status"] == "not scored here"
    sub = json.loads(Path(out["submission"]).read_text())
    assert sub == [
        {"question_id": 262144000, "answer": "2 dogs"},
        {"question_id": 262144001, "answer": ""},
        {"question_id": 262144999, "answer": ""},
    ]


def test_vizwiz_val(tmp_path: Path) -> None:
    make_vizwiz(tmp_path)
    bench = benchmarks.get("vizwiz", split="val")
    s = bench.load(tmp_path)
    assert s[0].text.startswith("What is this? \nWhen the provided information is insufficient")
    m = bench.score(
        [{"question_id": 0, "prompt": "", "text": "A can."}, {"question_id": 1, "prompt": "", "text": "x"}],
        tmp_path,
    )
    assert m["accuracy"] == 50.0


def test_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownBenchmarkError, match="valid names: vqav2, gqa"):
        benchmarks.get("nope")
    with pytest.raises(ValueError, match="no split"):
        benchmarks.get("pope:val")
    with pytest.raises(ValueError, match="no file key"):
        benchmarks.get("pope", files={"bogus": "x"})
    with pytest.raises(DataError, match="data root not found"):
        benchmarks.get("pope").check(tmp_path / "missing")
    (tmp_path / "pope").mkdir()
    with pytest.raises(DataError, match="llava_pope_test.jsonl"):
        benchmarks.get("pope").check(tmp_path)
    assert len(benchmarks.available()) == 10


def test_mmvet_grade_retry_schedule() -> None:
    calls: list[tuple[str, float]] = []

    class Judge:
        model = "fake"

        def __init__(self, replies: list[str]) -> None:
            self.replies = replies

        def complete(self, prompt: str, *, max_tokens: int, temperature: float, tag: str = "") -> str:
            calls.append((prompt, temperature))
            return self.replies.pop(0)

    q = mmvet_query("What is x?", "-1 <AND> -5", "x = -1")
    assert q.endswith("\nWhat is x? | -1  <AND>  -5 | x = -1 | ")
    assert q.startswith("Compare the ground truth") and "| 1.0\n\nWhat is x?" in q
    assert mmvet_grade(Judge(["0.5"]), "What is x?", "-1 <AND> -5", "x = -1")[0] == 0.5
    calls.clear()
    score, replies = mmvet_grade(Judge(["?", "1.7", "0.8 maybe"]), "q", "a", "p")
    assert score == 0.8 and [t for _, t in calls] == [0.0, 0.0, 0.5]
    assert calls[1][0].endswith("\nPredict the correctness of the answer (digit): ")
    calls.clear()
    score, _ = mmvet_grade(Judge(["x"] * 6), "q", "a", "p")
    assert score == 0.0 and len(calls) == 6


def test_openai_judge_against_local_server(tmp_path: Path) -> None:
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            payload = json.dumps({"choices": [{"message": {"content": "0.7"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        judge = OpenAIJudge(
            JudgeConfig(model="judge-x", base_url=url, api_key="k"), cache_path=tmp_path / "c.jsonl"
        )
        assert judge.complete("hello", max_tokens=3) == "0.7"
        assert judge.complete("hello", max_tokens=3) == "0.7"  # cached
        assert len(seen) == 1 and seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer k"
        assert seen[0]["model"] == "judge-x" and seen[0]["messages"][0]["content"] == "hello"
        again = OpenAIJudge(JudgeConfig(model="judge-x", base_url=url), cache_path=tmp_path / "c.jsonl")
        assert again.complete("hello", max_tokens=3) == "0.7" and len(seen) == 1
    finally:
        server.shutdown()


def test_benchmark_registry_refuses_a_second_class_under_a_taken_name():
    from finepruner.eval.benchmarks.pope import Pope

    benchmarks.available()  # the built-in modules are registered
    assert benchmarks.register(Pope) is Pope  # the same class again (a reload) is fine

    class AnotherPope(Pope):
        name = "pope"

    with pytest.raises(ValueError, match="benchmark name .pope. is taken by finepruner.eval.benchmarks.pope.Pope"):
        benchmarks.register(AnotherPope)
    assert benchmarks.get("pope").__class__ is Pope
