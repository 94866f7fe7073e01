"""Reading an answer out of a completion, per answer kind, and scoring it against the reference."""

from __future__ import annotations

import ast
import re

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


def exact_match(kind: str, completion: str, answer: str) -> bool:
    """number/letter: the extracted answer equals the reference. code: the completion parses
    (running its tests is the code reward's job)."""
    if kind == "number":
        return _same_number(extract_number(completion), answer)
    if kind == "letter":
        return extract_letter(completion) == answer.strip()
    if kind == "code":
        return parses_as_python(completion)
    raise ValueError(f"unknown answer kind {kind!r}")
