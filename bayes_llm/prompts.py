"""The text formats the model sees. Pretraining, evaluation and dispatch all go through these, so
the base learns exactly the format it is later asked in."""

from __future__ import annotations

# A worked solution (GSM8K's shape) ends '#### <answer>': data, pretraining and rewards all read it there.
FINAL_MARK = "####"


def answer_prompt(prompt: str) -> str:
    return f"Question: {prompt}\nAnswer:"


def answer_document(prompt: str, answer: str) -> str:
    return f"{answer_prompt(prompt)} {answer}"


def classify_prompt(prompt: str) -> str:
    """The first-pass question: which domain is this prompt from?"""
    return f"Task: {prompt}\nDomain:"


def classify_document(prompt: str, domain: str) -> str:
    return f"{classify_prompt(prompt)} {domain}"
