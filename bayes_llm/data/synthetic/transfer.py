"""Transfer (test-only): arithmetic asked as multiple choice, so it needs math and reasoning at once."""

from __future__ import annotations

import random
from collections.abc import Iterator

from bayes_llm.config import TransferTask
from bayes_llm.data.rows import LETTERS, format_choices


def _sum(rng: random.Random, cfg: TransferTask) -> tuple[int, str]:
    a, b = rng.randint(0, cfg.max_value), rng.randint(0, cfg.max_value)
    if rng.random() < 0.5:
        return a + b, f"{a} + {b}"
    a, b = max(a, b), min(a, b)
    return a - b, f"{a} - {b}"


def _mc_arithmetic(rng: random.Random, cfg: TransferTask) -> tuple[str, list[str], int]:
    value, text = _sum(rng, cfg)
    # Near misses, as a model's own errors would be.
    distractors = {value + d for d in (-11, -10, -2, -1, 1, 2, 10, 11, 20, 21) if value + d >= 0}
    options = [value, *rng.sample(sorted(distractors), cfg.n_choices - 1)]
    rng.shuffle(options)
    return f"What is {text}?", [str(o) for o in options], options.index(value)


def _compare(rng: random.Random, cfg: TransferTask) -> tuple[str, list[str], int]:
    values = {}
    while len(values) < 2:
        value, text = _sum(rng, cfg)
        values.setdefault(value, text)
    texts = list(values.values())
    largest = texts[list(values).index(max(values))]
    rng.shuffle(texts)
    return "Which is larger?", texts, texts.index(largest)


def generate(cfg: TransferTask, rng: random.Random) -> Iterator[dict]:
    while True:
        subtask = rng.choice(["mc_arithmetic", "compare_sums"])
        maker = _mc_arithmetic if subtask == "mc_arithmetic" else _compare
        question, choices, answer = maker(rng, cfg)
        yield {
            "subtask": subtask,
            "prompt": format_choices(question, choices),
            "answer": LETTERS[answer],
            "choices": choices,
        }
