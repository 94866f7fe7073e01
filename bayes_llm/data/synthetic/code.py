"""Code: 'Write a Python function ...' items from templates, each with a reference and assert tests.

The expected values in the tests come from a Python callable written beside each template, not
from running the reference text, so the `prepare` check that the reference passes its own tests
is a real check of the template.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bayes_llm.config import CodeDomain

_LETTERS = string.ascii_lowercase[:8]


@dataclass(frozen=True)
class Step:
    """One transformation: its name, how it reads and its Python expression (both over {x}), and
    the function it computes."""

    slug: str
    phrase: str
    expr: str
    fn: Callable


@dataclass(frozen=True)
class Item:
    subtask: str
    name: str
    arg: str
    description: str
    expr: str
    fn: Callable
    make_input: Callable[[], object]


def _int_step(rng: random.Random) -> Step:
    k, m = rng.randint(1, 99), rng.randint(2, 12)
    return rng.choice(
        [
            Step(f"add_{k}", f"adds {k} to {{x}}", f"{{x}} + {k}", lambda x: x + k),
            Step(f"sub_{k}", f"subtracts {k} from {{x}}", f"{{x}} - {k}", lambda x: x - k),
            Step(f"times_{m}", f"multiplies {{x}} by {m}", f"{{x}} * {m}", lambda x: x * m),
            Step(f"mod_{m}", f"takes the remainder of {{x}} divided by {m}", f"{{x}} % {m}", lambda x: x % m),
            Step(f"div_{m}", f"floor-divides {{x}} by {m}", f"{{x}} // {m}", lambda x: x // m),
            Step(f"absdiff_{k}", f"takes the absolute difference between {{x}} and {k}", f"abs({{x}} - {k})",
                 lambda x: abs(x - k)),
            Step(f"atleast_{k}", f"takes the larger of {{x}} and {k}", f"max({{x}}, {k})", lambda x: max(x, k)),
            Step(f"atmost_{k}", f"takes the smaller of {{x}} and {k}", f"min({{x}}, {k})", lambda x: min(x, k)),
        ]
    )  # fmt: skip


def _int_item(rng: random.Random, cfg: CodeDomain) -> Item:
    first = _int_step(rng)
    make = lambda: rng.randint(0, 100)  # noqa: E731
    if rng.random() >= cfg.two_step_share:
        return Item("int", first.slug, "n", f"{first.phrase.format(x='n')} and returns the result",
                    first.expr.format(x="n"), first.fn, make)  # fmt: skip
    second = _int_step(rng)
    description = f"{first.phrase.format(x='n')}, then {second.phrase.format(x='the result')}, and returns it"
    expr = second.expr.format(x=f"({first.expr.format(x='n')})")
    name = f"{first.slug}_then_{second.slug}"
    return Item("int_two_step", name, "n", description, expr, lambda n: second.fn(first.fn(n)), make)


def _list_item(rng: random.Random, cfg: CodeDomain) -> Item:
    k, m = rng.randint(0, 50), rng.randint(2, 9)
    step = rng.choice(
        [
            Step(f"count_above_{k}", f"returns how many numbers in xs are greater than {k}",
                 f"sum(1 for x in xs if x > {k})", lambda xs: sum(1 for x in xs if x > k)),
            Step(f"sum_below_{k}", f"returns the sum of the numbers in xs that are less than {k}",
                 f"sum(x for x in xs if x < {k})", lambda xs: sum(x for x in xs if x < k)),
            Step(f"multiples_of_{m}", f"returns a list of the numbers in xs that are divisible by {m}",
                 f"[x for x in xs if x % {m} == 0]", lambda xs: [x for x in xs if x % m == 0]),
            Step(f"scale_by_{m}", f"returns a list with every number in xs multiplied by {m}",
                 f"[x * {m} for x in xs]", lambda xs: [x * m for x in xs]),
            Step(f"shift_by_{k}", f"returns a list with {k} added to every number in xs",
                 f"[x + {k} for x in xs]", lambda xs: [x + k for x in xs]),
            Step("list_total", "returns the sum of the numbers in xs", "sum(xs)", sum),
            Step("list_largest", "returns the largest number in xs", "max(xs)", max),
            Step("list_smallest", "returns the smallest number in xs", "min(xs)", min),
            Step("list_reversed", "returns xs in reverse order", "xs[::-1]", lambda xs: xs[::-1]),
        ]
    )  # fmt: skip
    make = lambda: [rng.randint(0, 60) for _ in range(rng.randint(1, 6))]  # noqa: E731
    return Item("list", step.slug, "xs", step.phrase, step.expr, step.fn, make)


def _string_item(rng: random.Random, cfg: CodeDomain) -> Item:
    k = rng.randint(1, 9)
    c, d = rng.sample(_LETTERS, 2)
    step = rng.choice(
        [
            Step(f"repeat_{k}", f"returns s repeated {k} times", f"s * {k}", lambda s: s * k),
            Step(f"first_{k}", f"returns the first {k} characters of s", f"s[:{k}]", lambda s: s[:k]),
            Step(f"last_{k}", f"returns the last {k} characters of s", f"s[-{k}:]", lambda s: s[-k:]),
            Step(f"count_{c}", f"returns how many times the letter '{c}' appears in s", f"s.count({c!r})",
                 lambda s: s.count(c)),
            Step(f"swap_{c}_{d}", f"returns s with every '{c}' replaced by '{d}'", f"s.replace({c!r}, {d!r})",
                 lambda s: s.replace(c, d)),
            Step(f"starts_{c}", f"returns True if s starts with '{c}', otherwise False", f"s.startswith({c!r})",
                 lambda s: s.startswith(c)),
            Step("reverse_text", "returns s reversed", "s[::-1]", lambda s: s[::-1]),
            Step("shout", "returns s in upper case", "s.upper()", lambda s: s.upper()),
        ]
    )  # fmt: skip
    make = lambda: "".join(rng.choice(_LETTERS) for _ in range(rng.randint(0, 10)))  # noqa: E731
    return Item("string", step.slug, "s", step.phrase, step.expr, step.fn, make)


_MAKERS = (_int_item, _list_item, _string_item)


def _distinct_inputs(item: Item, count: int) -> list:
    inputs: list = []
    for _ in range(count * 4):
        value = item.make_input()
        if value not in inputs:
            inputs.append(value)
        if len(inputs) == count:
            break
    return inputs


def generate(cfg: CodeDomain, rng: random.Random) -> Iterator[dict]:
    while True:
        item = rng.choice(_MAKERS)(rng, cfg)
        signature = f"{item.name}({item.arg})"
        tests = [f"assert {item.name}({v!r}) == {item.fn(v)!r}" for v in _distinct_inputs(item, cfg.tests_per_item)]
        yield {
            "subtask": item.subtask,
            "prompt": f"Write a Python function `{signature}` that {item.description}.",
            "answer": f"def {signature}:\n    return {item.expr}\n",
            "tests": tests,
        }
