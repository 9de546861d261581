"""The instruction text of a LLaVA-1.5 prompt, for methods that read the question (CDPruner).

The engine (``finepruner.engine.handle``) decodes each sample's prompt with the processor bound at
``finepruner.apply(model, method, processor=...)`` and hands the text to methods that declare
``needs_instructions`` (``StageContext.instructions``). The text is what CDPruner's official loaders
pass to CLIP: the user message after the image, without the benchmark's answer-format suffix
(spec ``methods.md`` §5.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Answer-format instructions appended to benchmark questions; removed from the instruction text
#: (the official loader passes the question without them).
ANSWER_SUFFIXES: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)
#: The assistant marker of LLaVA-1.5's conversation template; the instruction ends before it.
ASSISTANT_MARKER = "ASSISTANT:"


def instruction_from_prompt(text: str) -> str:
    """The instruction inside a decoded prompt tail (the text after the last image token): cut at the
    last ``ASSISTANT:``, strip whitespace and the answer-format suffixes."""
    cut = text.rfind(ASSISTANT_MARKER)
    if cut >= 0:
        text = text[:cut]
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for suffix in ANSWER_SUFFIXES:
            if text.endswith(suffix):
                text, changed = text[: -len(suffix)].rstrip(), True
    return text


def as_tokenizer(value: Any, name: str = "processor") -> Any:
    """A tokenizer with ``decode`` from a tokenizer, a processor (its ``.tokenizer``), a local directory
    or None; ``name`` is the argument named in the error."""
    if value is None:
        return None
    if isinstance(value, str | Path):
        directory = Path(value).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"{name}={str(value)!r} is not a local directory; pass the LLaVA processor or tokenizer "
                "object, or the directory of a local checkpoint that holds its tokenizer"
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer = getattr(value, "tokenizer", value)
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"{name}: {type(value).__name__} has no decode(); pass the LLaVA processor or tokenizer "
            "(what finepruner.load_model returns)"
        )
    return tokenizer


def decode_instructions(tokenizer: Any, prompt_ids: Sequence[Sequence[int]], image_token_id: int,
                        stop_token: str | None = None) -> list[str]:
    """Each prompt's instruction: its tokens after the last ``<image>`` token (all of them when it has
    none), up to the first ``stop_token`` after it (the end of the user turn in chat templates that mark it,
    e.g. Qwen's ``<|im_end|>``), decoded with ``skip_special_tokens=True``, then ``instruction_from_prompt``."""
    stop = None if stop_token is None else tokenizer.convert_tokens_to_ids(stop_token)
    texts = []
    for ids in prompt_ids:
        ids = list(ids)
        images = [i for i, t in enumerate(ids) if t == image_token_id]
        tail = ids[images[-1] + 1:] if images else ids
        if stop is not None and stop in tail:
            tail = tail[:tail.index(stop)]
        texts.append(instruction_from_prompt(tokenizer.decode(tail, skip_special_tokens=True)))
    return texts


def check_texts(texts: Any) -> list[str]:
    """Explicit instruction texts as a list of strings (one per sample), or a clear error."""
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise TypeError(f"instruction texts: expected a list of strings (one per sample), got {type(texts).__name__}")
    if not texts:
        raise ValueError("instruction texts: the list is empty; pass one text per sample")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"instruction texts: every text must be a str, got {', '.join(sorted(set(bad)))}")
    return list(texts)


def repeat_for_batch(texts: list[str], batch: int) -> list[str]:
    """``texts`` for a batch of ``batch`` rows: as they are, or each repeated ``batch // len(texts)``
    times when ``generate`` repeats every sample (beams, ``num_return_sequences``)."""
    if len(texts) == batch:
        return texts
    if batch % len(texts):
        raise ValueError(
            f"{len(texts)} instruction texts for a batch of {batch}; pass one text per sample (or per prompt "
            "when generate repeats samples for beams)"
        )
    repeat = batch // len(texts)
    return [t for t in texts for _ in range(repeat)]
