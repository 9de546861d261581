"""Questions with one-word answers, generated from a scene's description, and a rule-based checker.

Question types (``Question.qtype``):

=============  =============================================  ==========================
type           template                                       answers
=============  =============================================  ==========================
color          What is the color of the {shape}?              6 colours (unique shape)
shape          What shape is the {color} object?              3 shapes (unique colour)
count          How many {shapes} are there?                   zero .. five
position       Which side of the image is the {c} {s} on?     left / right
exist          Is there a {c} {s} in the image?               yes / no (hard negatives)
color_yn       Is the {shape} {color}?                        yes / no
count_yn       Are there {n} {shapes} in the image?           yes / no
position_yn    Is the {c} {s} on the {side} side of the image?  yes / no
mcq            colour / shape / count question, 3-4 options   A / B / C / D
=============  =============================================  ==========================

``exist`` negatives come in three kinds, mirroring POPE's splits: ``random`` (any absent pair),
``popular`` (an absent pair sharing colour *or* shape with an object in the image) and
``adversarial`` (an absent pair whose colour and shape are both in the image, on different objects:
a binding error). :func:`rule_answer` re-derives every answer from the description by parsing the
question text, independently of the generators.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from finepruner.toy.scenes import COLOR_NAMES, PLURALS, SHAPES, Scene
from finepruner.toy.text import NUMBER_WORDS, OPTION_LETTERS

OPEN_TYPES = ("color", "shape", "count", "position")
YN_TYPES = ("exist", "color_yn", "count_yn", "position_yn")
QUESTION_TYPES = (*OPEN_TYPES, *YN_TYPES, "mcq")
NEGATIVE_KINDS = ("random", "popular", "adversarial")
_SINGULAR = {v: k for k, v in PLURALS.items()}


@dataclass
class Question:
    """One question about a scene. ``answer`` is the word the model should say (a letter for mcq)."""

    qtype: str
    text: str
    answer: str
    options: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pairs(scene: Scene) -> set[tuple[str, str]]:
    return {(o.color, o.shape) for o in scene.objects}


def _unique(values: list[str]) -> list[str]:
    counts = Counter(values)
    return sorted(v for v, n in counts.items() if n == 1)


# --------------------------------------------------------------------------------------------------
# generators (each returns None when the scene does not allow the question)


def q_color(scene: Scene, rng: random.Random) -> Question | None:
    shapes = _unique([o.shape for o in scene.objects])
    if not shapes:
        return None
    shape = rng.choice(shapes)
    obj = next(o for o in scene.objects if o.shape == shape)
    return Question("color", f"What is the color of the {shape}?", obj.color, meta={"shape": shape})


def q_shape(scene: Scene, rng: random.Random) -> Question | None:
    colors = _unique([o.color for o in scene.objects])
    if not colors:
        return None
    color = rng.choice(colors)
    obj = next(o for o in scene.objects if o.color == color)
    return Question("shape", f"What shape is the {color} object?", obj.shape, meta={"color": color})


def q_count(scene: Scene, rng: random.Random) -> Question:
    counts = Counter(o.shape for o in scene.objects)
    # Mostly shapes that are present; an absent one ("zero") a sixth of the time when possible.
    present = sorted(counts)
    absent = [s for s in SHAPES if s not in counts]
    shape = rng.choice(absent) if absent and rng.random() < 1 / 6 else rng.choice(present)
    return Question("count", f"How many {PLURALS[shape]} are there?", NUMBER_WORDS[counts.get(shape, 0)],
                    meta={"shape": shape})


def q_position(scene: Scene, rng: random.Random) -> Question:
    obj = rng.choice(scene.objects)
    return Question("position", f"Which side of the image is the {obj.color} {obj.shape} on?", obj.side,
                    meta={"color": obj.color, "shape": obj.shape})


def negative_pair(scene: Scene, rng: random.Random, kind: str) -> tuple[str, str] | None:
    """An absent (colour, shape) pair of the given kind (see module doc), or None if there is none."""
    present = _pairs(scene)
    colors = {o.color for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    if kind == "random":
        pool = absent
    elif kind == "popular":
        pool = [(c, s) for c, s in absent if (c in colors) != (s in shapes)]
    elif kind == "adversarial":
        pool = [(c, s) for c, s in absent if c in colors and s in shapes]
    else:
        raise ValueError(f"unknown negative kind {kind!r}; use one of {NEGATIVE_KINDS}")
    return rng.choice(pool) if pool else None


def exist_question(color: str, shape: str, answer: str, **meta) -> Question:
    return Question("exist", f"Is there {_article(color)} {color} {shape} in the image?", answer,
                    meta={"color": color, "shape": shape, **meta})


def q_exist(scene: Scene, rng: random.Random, positive: bool | None = None,
            kind: str | None = None) -> Question | None:
    if positive is None:
        positive = rng.random() < 0.5
    if positive:
        obj = rng.choice(scene.objects)
        return exist_question(obj.color, obj.shape, "yes", negative="none")
    kind = kind or rng.choice(NEGATIVE_KINDS)
    pair = negative_pair(scene, rng, kind) or negative_pair(scene, rng, "random")
    if pair is None:
        return None
    return exist_question(*pair, "no", negative=kind)


def q_color_yn(scene: Scene, rng: random.Random, positive: bool | None = None) -> Question | None:
    shapes = _unique([o.shape for o in scene.objects])
    if not shapes:
        return None
    shape = rng.choice(shapes)
    true_color = next(o.color for o in scene.objects if o.shape == shape)
    if positive is None:
        positive = rng.random() < 0.5
    color = true_color if positive else rng.choice([c for c in COLOR_NAMES if c != true_color])
    return Question("color_yn", f"Is the {shape} {color}?", "yes" if positive else "no",
                    meta={"shape": shape, "color": color})


def count_yn_text(shape: str, n: int) -> str:
    if n == 1:
        return f"Is there one {shape} in the image?"
    return f"Are there {NUMBER_WORDS[n]} {PLURALS[shape]} in the image?"


def q_count_yn(scene: Scene, rng: random.Random, positive: bool | None = None) -> Question:
    counts = Counter(o.shape for o in scene.objects)
    shape = rng.choice(sorted(counts))
    true_n = counts[shape]
    if positive is None:
        positive = rng.random() < 0.5
    n = true_n if positive else rng.choice([m for m in (true_n - 1, true_n + 1) if m >= 1])
    return Question("count_yn", count_yn_text(shape, n), "yes" if positive else "no",
                    meta={"shape": shape, "n": n})


def q_position_yn(scene: Scene, rng: random.Random, positive: bool | None = None) -> Question:
    obj = rng.choice(scene.objects)
    if positive is None:
        positive = rng.random() < 0.5
    side = obj.side if positive else ("right" if obj.side == "left" else "left")
    return Question("position_yn", f"Is the {obj.color} {obj.shape} on the {side} side of the image?",
                    "yes" if positive else "no", meta={"color": obj.color, "shape": obj.shape, "side": side})


def q_mcq(scene: Scene, rng: random.Random, base: str | None = None) -> Question | None:
    """A multiple-choice version of a colour, shape or count question (options shuffled)."""
    base = base or rng.choice(("color", "shape", "count"))
    if base == "color":
        q = q_color(scene, rng)
        distractors = [c for c in COLOR_NAMES if q is None or c != q.answer]
        n_opt = 4
    elif base == "shape":
        q = q_shape(scene, rng)
        distractors = [s for s in SHAPES if q is None or s != q.answer]
        n_opt = 3
    else:
        q = q_count(scene, rng)
        true_n = NUMBER_WORDS.index(q.answer)
        distractors = [NUMBER_WORDS[m] for m in range(0, 6) if m != true_n]
        n_opt = 4
    if q is None:
        return None
    options = [q.answer, *rng.sample(distractors, n_opt - 1)]
    rng.shuffle(options)
    return Question("mcq", q.text, OPTION_LETTERS[options.index(q.answer)], options=options,
                    meta={**q.meta, "base": base, "value": q.answer})


GENERATORS = {
    "color": q_color, "shape": q_shape, "count": q_count, "position": q_position, "exist": q_exist,
    "color_yn": q_color_yn, "count_yn": q_count_yn, "position_yn": q_position_yn, "mcq": q_mcq,
}


def make_question(qtype: str, scene: Scene, rng: random.Random) -> Question | None:
    return GENERATORS[qtype](scene, rng)


# --------------------------------------------------------------------------------------------------
# rule-based check from the description only


_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("color", re.compile(r"^What is the color of the (\w+)\?$")),
    ("shape", re.compile(r"^What shape is the (\w+) object\?$")),
    ("count", re.compile(r"^How many (\w+) are there\?$")),
    ("position", re.compile(r"^Which side of the image is the (\w+) (\w+) on\?$")),
    ("exist", re.compile(r"^Is there an? (\w+) (\w+) in the image\?$")),
    ("count_yn", re.compile(r"^(?:Is|Are) there (\w+) (\w+) in the image\?$")),
    ("position_yn", re.compile(r"^Is the (\w+) (\w+) on the (\w+) side of the image\?$")),
    ("color_yn", re.compile(r"^Is the (\w+) (\w+)\?$")),
]


def _objects_where(description: dict, **attrs) -> list[dict]:
    return [o for o in description["objects"] if all(o[k] == v for k, v in attrs.items())]


def rule_answer(description: dict, text: str, options: list[str] | None = None) -> str:
    """The correct answer to question ``text`` about the scene ``description``, derived by rules.

    Raises ``ValueError`` when the question is not answerable (e.g. "the circle" names two objects).
    """
    for qtype, pattern in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        if qtype == "exist" and g[0] in NUMBER_WORDS:
            continue
        if qtype == "count_yn" and g[0] not in NUMBER_WORDS:
            continue
        value = _rule_value(description, qtype, g)
        if options:
            if value not in options:
                raise ValueError(f"answer {value!r} is not among the options {options}")
            return OPTION_LETTERS[options.index(value)]
        return value
    raise ValueError(f"no rule matches question {text!r}")


def _one(objs: list[dict], what: str) -> dict:
    if len(objs) != 1:
        raise ValueError(f"{what} names {len(objs)} objects, not exactly one")
    return objs[0]


def _rule_value(d: dict, qtype: str, g: tuple[str, ...]) -> str:
    yes_no = {True: "yes", False: "no"}
    if qtype == "color":
        return _one(_objects_where(d, shape=g[0]), f"the {g[0]}")["color"]
    if qtype == "shape":
        return _one(_objects_where(d, color=g[0]), f"the {g[0]} object")["shape"]
    if qtype == "count":
        return NUMBER_WORDS[len(_objects_where(d, shape=_SINGULAR[g[0]]))]
    if qtype == "position":
        return _one(_objects_where(d, color=g[0], shape=g[1]), f"the {g[0]} {g[1]}")["side"]
    if qtype == "exist":
        return yes_no[bool(_objects_where(d, color=g[0], shape=g[1]))]
    if qtype == "count_yn":
        shape = _SINGULAR.get(g[1], g[1])
        return yes_no[len(_objects_where(d, shape=shape)) == NUMBER_WORDS.index(g[0])]
    if qtype == "position_yn":
        return yes_no[_one(_objects_where(d, color=g[0], shape=g[1]), f"the {g[0]} {g[1]}")["side"] == g[2]]
    if qtype == "color_yn":
        return yes_no[_one(_objects_where(d, shape=g[0]), f"the {g[0]}")["color"] == g[1]]
    raise AssertionError(qtype)
