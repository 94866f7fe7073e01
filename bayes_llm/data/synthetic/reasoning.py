"""Reasoning: multiple choice over comparisons, ordering and simple syllogisms; the answer is a letter.

Every row also carries a worked `solution` in the same GSM8K shape as math, then `#### <letter>`.
Where it can, the solution scans the choices in letter order, so each step reads a choice forward
(letter → its text): a 3M-param base learns that lookup, but not the reverse one (write the right
value, then find its letter), which it answered with `12 is the largest.` to every list:

- largest / smallest: the running best, `Scan: A 8. B 7 max A 8: A 8. C 10 max A 8: C 10.`;
- syllogism: the verdict, then the choices up to the one that says it, `The answer is: no. A: yes. B: no.`;
- sorted: the sorted list (`Sorted: 1, 2, 9.`). Copying each choice up to its first out-of-order
  number was worse (the base could not copy a list whose numbers recur in every choice).

No solution starts with a letter: lm-eval scores multiple choice by the log-likelihood of each
letter right after `Answer:`, and a scan opening with `A` taught the base to put `A` there whatever
the question (every system then scored the same on the transfer task).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from bayes_llm.config import ReasoningDomain
from bayes_llm.data.rows import LETTERS, format_choices

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"

# (premise 1, premise 2, question, answer) over nonsense categories X, Y, Z.
_SYLLOGISMS = [
    ("All {x} are {y}.", "All {y} are {z}.", "Are all {x} {z}?", "yes"),
    ("All {x} are {y}.", "No {y} are {z}.", "Can any {x} be {z}?", "no"),
    ("Some {x} are {y}.", "All {y} are {z}.", "Must all {x} be {z}?", "cannot tell"),
    ("No {x} are {y}.", "All {z} are {y}.", "Can any {z} be {x}?", "no"),
    ("All {x} are {y}.", "Some {z} are {x}.", "Are some {z} {y}?", "yes"),
    ("All {x} are {y}.", "All {z} are {y}.", "Must all {x} be {z}?", "cannot tell"),
]
_VERDICTS = ["yes", "no", "cannot tell"]


def _word(rng: random.Random) -> str:
    syllables = rng.randint(2, 3)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)) + "s"


def _extreme(rng: random.Random, cfg: ReasoningDomain, largest: bool) -> tuple[str, list[str], int]:
    numbers = rng.sample(range(cfg.max_value + 1), cfg.n_choices)
    target = max(numbers) if largest else min(numbers)
    question = f"Which number is the {'largest' if largest else 'smallest'}?"
    return question, [str(n) for n in numbers], numbers.index(target)


def _sorted(rng: random.Random, cfg: ReasoningDomain) -> tuple[str, list[str], int]:
    length = rng.randint(cfg.list_length.min, cfg.list_length.max)
    numbers = sorted(rng.sample(range(cfg.max_value + 1), length))
    options = {tuple(numbers)}
    while len(options) < cfg.n_choices:
        options.add(tuple(rng.sample(numbers, length)))
    shuffled = sorted(options, key=lambda _: rng.random())
    ascending = rng.random() < 0.5
    if not ascending:
        numbers = numbers[::-1]
        shuffled = [option[::-1] for option in shuffled]
    question = f"Which list is sorted from {'smallest to largest' if ascending else 'largest to smallest'}?"
    choices = [", ".join(map(str, option)) for option in shuffled]
    return question, choices, choices.index(", ".join(map(str, numbers)))


def _syllogism(rng: random.Random) -> tuple[str, list[str], int]:
    first, second, ask, verdict = rng.choice(_SYLLOGISMS)
    words = {"x": _word(rng), "y": _word(rng), "z": _word(rng)}
    if len(set(words.values())) < 3:
        return _syllogism(rng)
    question = " ".join(part.format(**words) for part in (first, second, ask))
    choices = rng.sample(_VERDICTS, len(_VERDICTS))
    return question, choices, choices.index(verdict)


def _running_best(choices: list[str], largest: bool) -> str:
    values, word = [int(choice) for choice in choices], "max" if largest else "min"
    best, steps = 0, [f"Scan: {LETTERS[0]} {values[0]}."]
    for i, value in enumerate(values[1:], start=1):
        before = f"{LETTERS[best]} {values[best]}"
        if (value > values[best]) if largest else (value < values[best]):
            best = i
        steps.append(f"{LETTERS[i]} {value} {word} {before}: {LETTERS[best]} {values[best]}.")
    return " ".join(steps)


def _verdict_lookup(choices: list[str], answer: int) -> str:
    reads = [f"{LETTERS[i]}: {choice}." for i, choice in enumerate(choices[: answer + 1])]
    return " ".join([f"The answer is: {choices[answer]}.", *reads])


def _working(subtask: str, choices: list[str], answer: int) -> str:
    if subtask in ("largest", "smallest"):
        return _running_best(choices, largest=subtask == "largest")
    if subtask == "sorted":
        return f"Sorted: {choices[answer]}."
    return _verdict_lookup(choices, answer)


def generate(cfg: ReasoningDomain, rng: random.Random) -> Iterator[dict]:
    while True:
        subtask = rng.choice(["largest", "smallest", "sorted", "syllogism"])
        if subtask == "syllogism":
            question, choices, answer = _syllogism(rng)
        elif subtask == "sorted":
            question, choices, answer = _sorted(rng, cfg)
        else:
            question, choices, answer = _extreme(rng, cfg, largest=subtask == "largest")
        working = _working(subtask, choices, answer)
        yield {
            "subtask": subtask,
            "prompt": format_choices(question, choices),
            "answer": LETTERS[answer],
            "choices": choices,
            "solution": f"{working}\n#### {LETTERS[answer]}",
        }
