"""Answer normalisation of the VQA family (spec ``eval_protocol.md`` section 2).

Two processors are implemented literally, quirks included:

* :func:`evalai_normalize` -- LLaVA's ``EvalAIAnswerProcessor`` (``m4c_evaluator.py``, section 2.1):
  ``word_tokenize`` then punctuation, the broken ``PERIOD_STRIP`` regex (applied with ``count=32``
  because ``re.UNICODE`` is passed positionally), number words, articles and contractions.
* :func:`vqa_process_punctuation` / :func:`vqa_process_digit_article` -- GT-Vision-Lab ``vqaEval.py``
  (the official local VQAv2 scorer, section 2.2 row 1), whose comma rule is ``(\\d)(\\,)(\\d)``. That script
  is Python 2 code: its regexes are applied to ``unicode`` strings without ``re.UNICODE``, so ``\\d`` there
  means ASCII ``[0-9]`` (``re.ASCII`` here); LLaVA's processor is Python 3 code (Unicode ``\\d``).

:func:`leave_one_out_accuracy` is the 10-annotator formula of section 2.2, computed by index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

NUMBER_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
PUNCTUATIONS: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official regex has a broken look-behind ("(?!<=\d)"), so it strips every period not followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# vqaEval.py (Python 2, no re.UNICODE): the same two patterns with ASCII-only \d.
VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
#: ``PERIOD_STRIP.sub("", text, re.UNICODE)`` in the originals: the flag lands in ``count``.
_PERIOD_COUNT = int(re.UNICODE)


def _process_punctuation(in_text: str, comma_strip: re.Pattern[str], period_strip: re.Pattern[str]) -> str:
    out_text = in_text
    has_digit_comma = comma_strip.search(in_text) is not None
    for p in PUNCTUATIONS:
        if (p + " " in in_text or " " + p in in_text) or has_digit_comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return period_strip.sub("", out_text, count=_PERIOD_COUNT)


def process_digit_article(in_text: str) -> str:
    """Lower-case, map number words to digits, drop articles, restore contractions (section 2.1 step 4)."""
    words = []
    for word in in_text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def evalai_process_punctuation(in_text: str) -> str:
    """``EvalAIAnswerProcessor.process_punctuation`` (comma rule ``(?<=\\d)(\\,)+(?=\\d)``)."""
    return _process_punctuation(in_text, EVALAI_COMMA_STRIP, PERIOD_STRIP)


def vqa_process_punctuation(in_text: str) -> str:
    """GT-Vision-Lab ``vqaEval.processPunctuation`` (comma rule ``(\\d)(\\,)(\\d)``, ASCII ``\\d``)."""
    return _process_punctuation(in_text, VQA_COMMA_STRIP, VQA_PERIOD_STRIP)


vqa_process_digit_article = process_digit_article


def evalai_word_tokenize(word: str) -> str:
    """``EvalAIAnswerProcessor.word_tokenize``: lower, drop ``,`` and ``?``, split ``'s``, strip."""
    word = word.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return word.strip()


def evalai_normalize(text: str) -> str:
    """LLaVA's ``EvalAIAnswerProcessor()(text)`` (spec 2.1), used by TextVQA, VizWiz and submissions."""
    item = evalai_word_tokenize(text)
    item = item.replace("\n", " ").replace("\t", " ").strip()
    item = evalai_process_punctuation(item)
    return process_digit_article(item)


def vqa_eval_strip(text: str) -> str:
    """``vqaEval.evaluate``'s first step on the prediction and on every answer: ``\\n``/``\\t`` -> space, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_eval_process(text: str) -> str:
    """``processDigitArticle(processPunctuation(text))`` of ``vqaEval.py``: what it applies, after
    :func:`vqa_eval_strip`, to the prediction and the answers of a question whose answers are **not**
    unanimous (a unanimous question compares the stripped strings unprocessed)."""
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_eval_normalize_prediction(text: str) -> str:
    """A prediction as ``vqaEval.py`` compares it on a question with non-unanimous answers (spec 2.2, row 1)."""
    return vqa_eval_process(vqa_eval_strip(text))


def leave_one_out_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """``mean_i min(1, #{j != i: g_j == p} / 3)`` over the ground-truth answers (spec 2.2), by index."""
    if not gt_answers:
        return 0.0
    matches = sum(1 for g in gt_answers if g == prediction)
    total = 0.0
    for g in gt_answers:
        others = matches - (1 if g == prediction else 0)
        total += min(1.0, others / 3)
    return total / len(gt_answers)
