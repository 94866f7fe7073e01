"""How the evaluation tasks score an answer (the task YAMLs reach these through tasks/metrics.py).

Scoring goes through the same functions as the experts' reward, so a benchmark number and a training
reward mean the same thing: `exact_match` reads the answer after '####' when there is one, and code is
judged by its unit tests in the sandbox.
"""

from __future__ import annotations

from bayes_llm.data.rows import LETTERS
from bayes_llm.rewards.answers import exact_match
from bayes_llm.rewards.code import check_solutions
from bayes_llm.rewards.correctness import code_of


def letter_choices(doc: dict) -> list[str]:
    return list(LETTERS[: len(doc["choices"])])


def choice_texts(doc: dict) -> list[str]:
    return [str(choice) for choice in doc["choices"]]


def letter_target(doc: dict) -> int:
    return LETTERS.index(doc["answer"])


def number_match(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(exact_match("number", results[0], doc["answer"]))}


def letter_match(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(exact_match("letter", results[0], doc["answer"], list(doc["choices"])))}


def code_item(doc: dict, results: list[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The program and its tests; `pass_at_1` judges all of a task's items in one sandbox run."""
    return {"pass@1": (code_of(results[0]), tuple(doc["tests"]))}


def passes(items: list[tuple[str, tuple[str, ...]]]) -> list[bool]:
    """Whether each program passes all its tests, checked together in one sandbox run (programs
    repeat across systems: `check_solutions` runs each distinct one once per process)."""
    return [verdict is None for verdict in check_solutions(items, progress=False)]


def pass_at_1(items: list[tuple[str, tuple[str, ...]]]) -> float:
    return sum(passes(items)) / max(len(items), 1)
