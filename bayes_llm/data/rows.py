"""The row contract shared by every domain: `id, domain, subtask, prompt, answer` (+ `choices`, `tests`,
optional `solution`)."""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Sequence

from bayes_llm.prompts import FINAL_MARK

LETTERS = string.ascii_uppercase
SPLITS = ("train", "val", "test")

# What the answer of each kind looks like; rewards and validation share these.
ANSWER_PATTERNS = {"number": r"^-?\d+(?:\.\d+)?$", "letter": r"^[A-Z]$"}
EXTRA_COLUMNS = {"number": (), "letter": ("choices",), "code": ("tests",)}
BASE_COLUMNS = ("id", "domain", "subtask", "prompt", "answer")
# Optional on any row: a worked solution in GSM8K's shape, ending '#### <answer>'. Pretraining shows
# it for a share of rows and SFT trains on it, so the base knows both answer formats.
SOLUTION_COLUMN = "solution"


def columns_for(answer_kind: str) -> tuple[str, ...]:
    return BASE_COLUMNS + EXTRA_COLUMNS[answer_kind]


def solution_final(solution: str) -> str | None:
    """The answer a worked solution ends with (after the last '####'), or None."""
    if FINAL_MARK not in solution:
        return None
    return solution.rsplit(FINAL_MARK, 1)[1].strip().replace(",", "")


def make_id(domain: str, prompt: str) -> str:
    """Stable across sizes and seeds: the same prompt always gets the same id."""
    return f"{domain}-{hashlib.sha1(prompt.encode()).hexdigest()[:12]}"


def domain_rng(seed: int, domain: str) -> random.Random:
    """Independent stream per domain (adding a domain does not change the others' data)."""
    digest = hashlib.sha256(f"{seed}:{domain}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def format_choices(question: str, choices: Sequence[str]) -> str:
    """The question with its choices lettered; past Z they go unlettered (the gate refuses more than 26)."""
    lines = [f"{LETTERS[i] if i < len(LETTERS) else '?'}) {choice}" for i, choice in enumerate(choices)]
    return "\n".join([question.rstrip(), *lines])
