"""Math: bare expressions and short multi-step word problems; the answer is the number.

Every row also carries a worked `solution` in GSM8K's shape (`5 + 11 = 16. 16 + 10 = 26.\n#### 26`):
one equation per step, then the final answer after `####`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from bayes_llm.config import MathDomain

_NAMES = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kai",
    "Lea",
    "Mo",
    "Nia",
    "Omar",
    "Pia",
    "Raj",
    "Sol",
    "Tess",
    "Uma",
]
_THINGS = [
    "apples",
    "marbles",
    "stickers",
    "coins",
    "books",
    "shells",
    "pencils",
    "cards",
    "stamps",
    "beads",
    "eggs",
    "plums",
]
_GAIN = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"]
_LOSE = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]
_ASK = ["What is {e}?", "Compute {e}.", "Calculate {e}.", "{e} = ?"]


def _evaluate(values: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Usual precedence: fold `*` first, then `+`/`-` left to right. Returns (result, the steps)."""
    terms, signs, steps = [values[0]], [], []
    for op, value in zip(ops, values[1:], strict=True):
        if op == "*":
            steps.append(f"{terms[-1]} * {value} = {terms[-1] * value}.")
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(op)
    total = terms[0]
    for sign, term in zip(signs, terms[1:], strict=True):
        result = total + term if sign == "+" else total - term
        steps.append(f"{total} {sign} {term} = {result}.")
        total = result
    return total, steps


def _solution(steps: list[str], answer: int) -> str:
    return " ".join(steps or [f"{answer}."]) + f"\n#### {answer}"


def _operand(rng: random.Random, cfg: MathDomain, op: str) -> int:
    return rng.randint(2, cfg.mul_max) if op == "*" else rng.randint(0, cfg.max_value)


def _expression(rng: random.Random, cfg: MathDomain) -> tuple[str, int, list[str]]:
    count = rng.randint(cfg.operands.min, cfg.operands.max)
    ops = [rng.choice(cfg.ops) for _ in range(count - 1)]
    values = [rng.randint(0, cfg.max_value)] + [_operand(rng, cfg, op) for op in ops]
    text = " ".join([str(values[0])] + [f"{op} {v}" for op, v in zip(ops, values[1:], strict=True)])
    return rng.choice(_ASK).format(e=text), *_evaluate(values, ops)


def _word_problem(rng: random.Random, cfg: MathDomain) -> tuple[str, int, list[str], bool]:
    """Steps apply in order; returns (text, answer, worked steps, every intermediate count non-negative)."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    steps = rng.randint(cfg.operands.min, cfg.operands.max) - 1
    if "*" in cfg.ops and rng.random() < 0.5:
        bags, each = rng.randint(2, cfg.mul_max), rng.randint(2, cfg.mul_max)
        total, sentences = bags * each, [f"{name} has {bags} bags with {each} {thing} in each."]
        worked = [f"{bags} * {each} = {total}."]
    else:
        total = rng.randint(0, cfg.max_value)
        sentences, worked = [f"{name} has {total} {thing}."], []
    valid = True
    additive = [op for op in cfg.ops if op != "*"] or ["+"]
    for _ in range(steps):
        n = rng.randint(1, cfg.max_value)
        if rng.choice(additive) == "+":
            worked.append(f"{total} + {n} = {total + n}.")
            total += n
            sentences.append(f"Then {name} {rng.choice(_GAIN).format(n=n)}.")
        else:
            worked.append(f"{total} - {n} = {total - n}.")
            total -= n
            sentences.append(f"Then {name} {rng.choice(_LOSE).format(n=n)}.")
        valid = valid and total >= 0
    sentences.append(f"How many {thing} does {name} have now?")
    return " ".join(sentences), total, worked, valid


def generate(cfg: MathDomain, rng: random.Random) -> Iterator[dict]:
    while True:
        if rng.random() < cfg.word_problem_share:
            prompt, answer, steps, valid = _word_problem(rng, cfg)
            subtask = "word_problem"
        else:
            prompt, answer, steps = _expression(rng, cfg)
            subtask, valid = "expression", True
        if not cfg.allow_negative and (answer < 0 or not valid):
            continue
        yield {"subtask": subtask, "prompt": prompt, "answer": str(answer), "solution": _solution(steps, answer)}
