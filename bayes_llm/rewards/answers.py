"""Reading an answer out of a completion, per answer kind, and scoring it against the reference."""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Sequence

from bayes_llm.prompts import FINAL_MARK

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-Z])\b")


def _final_part(completion: str) -> str:
    """A worked answer names its result after '####' (GSM8K's convention); a bare answer is all final."""
    return completion.rsplit(FINAL_MARK, 1)[1] if FINAL_MARK in completion else completion


def extract_number(completion: str) -> str | None:
    match = _NUMBER.search(_final_part(completion))
    return match.group(0) if match else None


def extract_letter(completion: str) -> str | None:
    match = _LETTER.search(_final_part(completion))
    return match.group(1) if match else None


_BARE_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[).:]|\s|$)")
_LONE_LETTER = re.compile(r"^\s*\(?([A-Z])\)?[.:]?\s*$")


def _plain(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".")


def extract_choice(completion: str, choices: Sequence[str] | None = None) -> str | None:
    """The letter a multiple-choice answer names: a letter alone (`C`, `(C)`), else the choice whose text
    it is, whole (`Light years.` for C; before an opening letter, as a text may open with one: `A
    magnet`), else a letter opening it (`C) light years`), else the first capital letter standing alone."""
    final = _final_part(completion)
    lone = _LONE_LETTER.match(final)
    if lone:
        return lone.group(1)
    texts = [_plain(str(c)) for c in ([] if choices is None else list(choices))]  # parquet gives an array
    if _plain(final) in texts:
        return string.ascii_uppercase[texts.index(_plain(final))]
    bare = _BARE_LETTER.match(final)
    if bare:
        return bare.group(1)
    return extract_letter(completion)


def parses_as_python(completion: str) -> bool:
    try:
        ast.parse(completion.strip())
    except (SyntaxError, ValueError):
        return False
    return bool(completion.strip())


def _same_number(predicted: str | None, answer: str) -> bool:
    if predicted is None:
        return False
    try:
        return float(predicted) == float(answer)
    except ValueError:
        return False


def exact_match(kind: str, completion: str, answer: str, choices: Sequence[str] | None = None) -> bool:
    """number/letter: the extracted answer equals the reference (a letter answer may write out its
    choice's text instead). code: the completion parses (running its tests is the code reward's job)."""
    if kind == "number":
        return _same_number(extract_number(completion), answer)
    if kind == "letter":
        return extract_choice(completion, choices) == answer.strip()
    if kind == "code":
        return parses_as_python(completion)
    raise ValueError(f"unknown answer kind {kind!r}")
