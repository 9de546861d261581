"""Prompt strings of LLaVA-1.5 (vicuna_v1) and the toy model's word-level tokenizer.

The toy model is trained on exactly the prompts the real evaluation harness sends
(``spec/eval_protocol.md`` §1), so every word and punctuation mark of the template and suffixes is in
the vocabulary. The pre-tokenizer splits on whitespace and isolates punctuation (``"USER:"`` ->
``"USER" ":"``, ``"user's"`` -> ``"user" "'" "s"``), and a post-processor prepends ``<s>`` like
LLaVA's Llama tokenizer.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from finepruner.models.tiny import build_tokenizer
from finepruner.toy.scenes import COLOR_NAMES, PLURALS, SHAPES

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
OPTION_LETTERS = ("A", "B", "C", "D")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

#: Every word of the prompts, questions and answers (punctuation is split off by the pre-tokenizer).
VOCAB_WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    """A chat between a curious user and an artificial intelligence assistant . The gives helpful ,
    detailed polite answers to the ' s questions USER ASSISTANT : ? Answer question using single word
    or phrase with option letter from given choices directly B C D
    What is color of shape How many are there Is in image Which side on left right yes no
    object Are""".split()
    + list(COLOR_NAMES) + list(SHAPES) + list(PLURALS.values()) + list(NUMBER_WORDS)
))


def user_text(question: str, options: list[str] | tuple[str, ...] | None = None, hint: str | None = None) -> str:
    """The USER message after ``<image>\\n``: question + suffix (short answer), or MMBench's layout."""
    if not options:
        return question + SHORT_SUFFIX
    text = f"{hint}\n{question}" if hint else question
    for letter, option in zip(OPTION_LETTERS, options, strict=False):
        text += f"\n{letter}. {option}"
    return text + MCQ_SUFFIX


def eval_prompt(text: str) -> str:
    """The full vicuna_v1 prompt for one USER message (as the harness builds it)."""
    return f"{SYSTEM} USER: <image>\n{text} ASSISTANT:"


def conversation(turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """Multi-turn vicuna_v1 text as ``(segment, is_target)`` pieces; targets are answers + ``</s>``."""
    pieces: list[tuple[str, bool]] = []
    for i, (text, answer) in enumerate(turns):
        head = f"{SYSTEM} USER: <image>\n{text} ASSISTANT:" if i == 0 else f"USER: {text} ASSISTANT:"
        pieces.append((head, False))
        pieces.append((f" {answer}</s>", True))
    return pieces


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (punctuation isolated, ``<s>`` prepended), LLaVA's special tokens."""
    return build_tokenizer(tuple(VOCAB_WORDS), isolate_punctuation=True, add_bos=True)
