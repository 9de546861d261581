"""Synthetic fixtures in LLaVA's ``playground/data/eval`` layout for the ten benchmarks (tests only)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def make_image(
    path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 28)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _b64_image(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 36), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_pope(root: Path) -> None:
    d = root / "pope"
    rows, labels = [], {}
    for cat, base in (("adversarial", 0), ("random", 10000000), ("popular", 20000000)):
        for k, (obj, label) in enumerate((("dog", "yes"), ("cat", "no")), 1):
            img = f"COCO_val2014_{base + k:012d}.jpg"
            make_image(d / "val2014" / img, (k * 60, 100, 50))
            rows.append(
                {
                    "question_id": base + k,
                    "image": img,
                    "text": f"Is there a {obj} in the image?" + SHORT,
                    "category": cat,
                }
            )
            labels.setdefault(cat, []).append(
                {"question_id": k, "image": img, "text": f"Is there a {obj} in the image?", "label": label}
            )
    _jsonl(d / "llava_pope_test.jsonl", rows)
    for cat, lab in labels.items():
        _jsonl(d / "coco" / f"coco_pope_{cat}.json", lab)


def make_mme(root: Path) -> None:
    d = root / "MME"
    gt = d / "MME_Benchmark_release_version"
    make_image(gt / "existence" / "0001.png")
    (gt / "existence" / "0001.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image?  Please answer yes or no.\tNo\n"
    )
    make_image(gt / "artwork" / "images" / "10002.jpg", (10, 200, 10))
    (gt / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (gt / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork by Picasso? Please answer yes or no.\tNo\n"
    )
    rows = [
        {
            "question_id": "existence/0001.png",
            "image": "existence/0001.png",
            "text": "Is there a dog in this image?" + SHORT,
            "category": "existence",
        },
        {
            "question_id": "existence/0001.png",
            "image": "existence/0001.png",
            "text": "Is there a cat in this image?" + SHORT,
            "category": "existence",
        },
        {
            "question_id": "artwork/images/10002.jpg",
            "image": "artwork/images/10002.jpg",
            "text": "Is this artwork by Monet?" + SHORT,
            "category": "artwork",
        },
        {
            "question_id": "artwork/images/10002.jpg",
            "image": "artwork/images/10002.jpg",
            "text": "Is this artwork by Picasso?" + SHORT,
            "category": "artwork",
        },
    ]
    _jsonl(d / "llava_mme.jsonl", rows)


def make_gqa(root: Path) -> None:
    d = root / "gqa"
    rows, gt = [], {}
    for qid, (q, a, st) in {
        "201": ("Is it sunny?", "yes", "verify"),
        "202": ("What color is the car?", "red", "query"),
        "203": ("Which side is the cup on?", "left", "query"),
    }.items():
        make_image(d / "data" / "images" / f"n{qid}.jpg")
        rows.append({"question_id": qid, "image": f"n{qid}.jpg", "text": q + SHORT, "category": "default"})
        gt[qid] = {"answer": a, "isBalanced": True, "types": {"structural": st, "semantic": "attr"}}
    _jsonl(d / "llava_gqa_testdev_balanced.jsonl", rows)
    _json(d / "data" / "testdev_balanced_questions.json", gt)


VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT


def make_vizwiz(root: Path) -> None:
    d = root / "vizwiz"
    rows = []
    for i in range(3):
        img = f"VizWiz_test_{i:08d}.jpg"
        make_image(d / "test" / img, (i * 70, 20, 20))
        rows.append(
            {"question_id": i, "image": img, "text": "What is this?" + VIZWIZ_SUFFIX, "category": "default"}
        )
    _jsonl(d / "llava_test.jsonl", rows)
    val = []
    for i in range(2):
        img = f"VizWiz_val_{i:08d}.jpg"
        make_image(d / "val" / img, (20, i * 70, 20))
        val.append(
            {
                "image": img,
                "question": "What is this? ",
                "answerable": 1,
                "answer_type": "other",
                "answers": [{"answer": "a can", "answer_confidence": "yes"}] * 10,
            }
        )
    _json(d / "val.json", val)


def make_sqa(root: Path) -> None:
    d = root / "scienceqa"
    qs = [
        {
            "id": "4",
            "conversations": [
                {"from": "human", "value": "Which is a noun?\nA. run\nB. dog"},
                {"from": "gpt", "value": "B"},
            ],
        },
        {
            "id": "5",
            "image": "5/image.png",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nContext: A map.\nWhich state is shown?\nA. Ohio\nB. Utah\nC. Iowa",
                },
                {"from": "gpt", "value": "A"},
            ],
        },
        {
            "id": "7",
            "image": "7/image.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is red?\nA. apple\nB. sky"},
                {"from": "gpt", "value": "A"},
            ],
        },
    ]
    make_image(d / "images" / "test" / "5" / "image.png")
    make_image(d / "images" / "test" / "7" / "image.png", (250, 0, 0))
    _json(d / "llava_test_CQM-A.json", qs)
    _json(
        d / "problems.json",
        {
            "4": {"choices": ["run", "dog"], "answer": 1, "image": None},
            "5": {"choices": ["Ohio", "Utah", "Iowa"], "answer": 0, "image": "image.png"},
            "7": {"choices": ["apple", "sky"], "answer": 0, "image": "image.png"},
        },
    )
    _json(d / "pid_splits.json", {"test": ["4", "5", "7"], "train": ["1"]})


def make_textvqa(root: Path) -> None:
    d = root / "textvqa"
    rows, data = [], []
    for iid, q, ocr, ans in (
        ("aa01", "what brand is this", "Sony, TV", "sony"),
        ("aa01", "what is written", "STOP", "stop"),
        ("bb02", "what number is shown", "", "7"),
    ):
        make_image(d / "train_images" / f"{iid}.jpg")
        rows.append(
            {
                "question_id": iid,
                "image": f"{iid}.jpg",
                "text": f"{q}\nReference OCR token: {ocr}" + SHORT,
                "category": "default",
            }
        )
        data.append({"image_id": iid, "question": q, "answers": [ans] * 10})
    _jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", rows)
    _json(d / "TextVQA_0.5.1_val.json", {"data": data})


def make_vqav2(root: Path) -> None:
    d = root / "vqav2"
    rows = []
    for qid in (262144000, 262144001):
        img = f"COCO_test2015_{qid // 1000:012d}.jpg"
        make_image(d / "test2015" / img)
        rows.append({"question_id": qid, "image": img, "text": "What is it?" + SHORT, "category": "default"})
    _jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl", rows)
    _jsonl(
        d / "llava_vqav2_mscoco_test2015.jsonl",
        [*rows, {"question_id": 262144999, "image": "x.jpg", "text": "Q?" + SHORT, "category": "default"}],
    )
    make_image(d / "val2014" / f"COCO_val2014_{42:012d}.jpg")
    _json(
        d / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "questions": [
                {"image_id": 42, "question": "Is it red?", "question_id": 42000},
                {"image_id": 42, "question": "How many?", "question_id": 42001},
            ]
        },
    )
    ans = [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
    _json(
        d / "v2_mscoco_val2014_annotations.json",
        {
            "annotations": [
                {"question_id": 42000, "image_id": 42, "answer_type": "yes/no", "answers": ans},
                {
                    "question_id": 42001,
                    "image_id": 42,
                    "answer_type": "number",
                    "answers": [dict(a, answer="2") for a in ans],
                },
            ]
        },
    )


MMB_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "source",
    "l2-category",
    "comment",
    "split",
    "image",
]


def make_mmbench(root: Path, subdir: str = "mmbench", filename: str = "mmbench_dev_20230712.tsv") -> None:
    d = root / subdir
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        [
            0,
            "What animal is shown?",
            "A photo.",
            "dog",
            "cat",
            "bird",
            "",
            "A",
            "recognition",
            "s",
            "perception",
            "",
            "dev",
            _b64_image((10, 10, 200)),
        ],
        [
            1000000,
            "What animal is shown?",
            "A photo.",
            "cat",
            "bird",
            "dog",
            "",
            "C",
            "recognition",
            "s",
            "perception",
            "",
            "dev",
            _b64_image((10, 10, 200)),
        ],
        [
            1,
            "Which color?",
            "nan",
            "red",
            "blue",
            "",
            "",
            "B",
            "color",
            "s",
            "attribute",
            "",
            "dev",
            _b64_image((200, 10, 10)),
        ],
    ]
    with (d / filename).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(MMB_COLUMNS)
        w.writerows(rows)


def make_mmvet(root: Path) -> None:
    d = root / "mm-vet"
    rows, gt = [], {}
    for i, (q, a, caps) in enumerate(
        (("What is x?", "-1 <AND> -5", ["ocr", "math"]), ("What is shown?", "a dog", ["rec"]))
    ):
        make_image(d / "images" / f"v1_{i}.png")
        rows.append({"image": f"v1_{i}.png", "text": q, "category": "conv", "question_id": i})
        gt[f"v1_{i}"] = {"imagename": f"v1_{i}.png", "capability": caps, "question": q, "answer": a}
    _jsonl(d / "llava-mm-vet.jsonl", rows)
    _json(d / "mm-vet.json", gt)


def make_playground(root: Path) -> Path:
    """Create all ten benchmarks under ``root`` (= a ``playground/data/eval`` folder); returns ``root``."""
    for make in (make_pope, make_mme, make_gqa, make_vizwiz, make_sqa, make_textvqa, make_vqav2, make_mmvet):
        make(root)
    make_mmbench(root)
    make_mmbench(root, "mmbench_cn", "mmbench_dev_cn_20231003.tsv")
    return root


#: Questions per benchmark spec in the fixture.
FIXTURE_SIZES = {
    "vqav2": 2,
    "vqav2:val": 2,
    "gqa": 3,
    "vizwiz": 3,
    "vizwiz:val": 2,
    "sqa": 3,
    "textvqa": 3,
    "pope": 6,
    "mme": 4,
    "mmbench": 3,
    "mmbench_cn": 3,
    "mmvet": 2,
}


@pytest.fixture(scope="module", name="tiny")
def saved_tiny(tmp_path_factory):
    """(model, processor, checkpoint dir): the tiny LLaVA saved where ``finepruner eval --model`` loads it."""
    from finepruner.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0)
    model.eval()
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return model, processor, d


@pytest.fixture(scope="module", name="playground")
def playground_root(tmp_path_factory) -> Path:
    """A ``playground/data/eval`` folder with every benchmark's fixture (``make_playground``)."""
    return make_playground(tmp_path_factory.mktemp("pg") / "eval")


def answer_texts(path: Path) -> list[tuple]:
    """(question_id, prompt, text) of every answer in an answers file, in file order."""
    from finepruner.eval.io import read_answers

    return [(a["question_id"], a["prompt"], a["text"]) for a in read_answers(path)]

