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


@dataclass(frozen=True)
class Step:
    """One transformation: how it reads, the Python expression, and the function it computes."""

    slug: str
    phrase: str  # with {x}: the thing it transforms
    expr: str  # with {x}
    fn: Callable


def _int_steps(rng: random.Random) -> Step:
    k = rng.randint(1, 99)
    m = rng.randint(2, 12)
    choices = [
        Step(f"add_{k}", "adds " + str(k) + " to {x}", "{x} + " + str(k), lambda x: x + k),
        Step(f"sub_{k}", "subtracts " + str(k) + " from {x}", "{x} - " + str(k), lambda x: x - k),
        Step(f"times_{m}", "multiplies {x} by " + str(m), "{x} * " + str(m), lambda x: x * m),
        Step(f"mod_{m}", "takes the remainder of {x} divided by " + str(m), "{x} % " + str(m), lambda x: x % m),
        Step(f"div_{m}", "floor-divides {x} by " + str(m), "{x} // " + str(m), lambda x: x // m),
        Step(f"absdiff_{k}", "takes the absolute difference between {x} and " + str(k),
             "abs({x} - " + str(k) + ")", lambda x: abs(x - k)),
        Step(f"atleast_{k}", "takes the larger of {x} and " + str(k), "max({x}, " + str(k) + ")",
             lambda x: max(x, k)),
        Step(f"atmost_{k}", "takes the smaller of {x} and " + str(k), "min({x}, " + str(k) + ")",
             lambda x: min(x, k)),
    ]
    return rng.choice(choices)


def _int_item(rng: random.Random, cfg: CodeDomain) -> tuple[str, str, str, Callable, Callable[[], object]]:
    first = _int_steps(rng)
    if rng.random() < cfg.two_step_share:
        second = _int_steps(rng)
        name = f"{first.slug}_then_{second.slug}"
        desc = f"{first.phrase.format(x='n')}, then {second.phrase.format(x='the result')}, and returns it"
        expr = second.expr.format(x="(" + first.expr.format(x="n") + ")")
        fn = lambda n: second.fn(first.fn(n))  # noqa: E731
        subtask = "int_two_step"
    else:
        name, desc = first.slug, f"{first.phrase.format(x='n')} and returns the result"
        expr, fn, subtask = first.expr.format(x="n"), first.fn, "int"
    return subtask, f"{name}(n)", desc, (lambda: expr), fn, lambda: rng.randint(0, 100)


def _list_item(rng: random.Random, cfg: CodeDomain):
    k, m = rng.randint(0, 50), rng.randint(2, 9)
    choices = [
        (f"count_above_{k}", f"returns how many numbers in xs are greater than {k}",
         f"sum(1 for x in xs if x > {k})", lambda xs: sum(1 for x in xs if x > k)),
        (f"sum_below_{k}", f"returns the sum of the numbers in xs that are less than {k}",
         f"sum(x for x in xs if x < {k})", lambda xs: sum(x for x in xs if x < k)),
        (f"multiples_of_{m}", f"returns a list of the numbers in xs that are divisible by {m}",
         f"[x for x in xs if x % {m} == 0]", lambda xs: [x for x in xs if x % m == 0]),
        (f"scale_by_{m}", f"returns a list with every number in xs multiplied by {m}",
         f"[x * {m} for x in xs]", lambda xs: [x * m for x in xs]),
        (f"shift_by_{k}", f"returns a list with {k} added to every number in xs",
         f"[x + {k} for x in xs]", lambda xs: [x + k for x in xs]),
        ("list_total", "returns the sum of the numbers in xs", "sum(xs)", sum),
        ("list_largest", "returns the largest number in xs", "max(xs)", max),
        ("list_smallest", "returns the smallest number in xs", "min(xs)", min),
        ("list_reversed", "returns xs in reverse order", "xs[::-1]", lambda xs: xs[::-1]),
    ]
    name, desc, expr, fn = rng.choice(choices)
    make = lambda: [rng.randint(0, 60) for _ in range(rng.randint(1, 6))]  # noqa: E731
    return "list", f"{name}(xs)", desc, (lambda: expr), fn, make


def _string_item(rng: random.Random, cfg: CodeDomain):
    k = rng.randint(1, 9)
    c, d = rng.sample(string.ascii_lowercase[:8], 2)
    choices = [
        (f"repeat_{k}", f"returns s repeated {k} times", f"s * {k}", lambda s: s * k),
        (f"first_{k}", f"returns the first {k} characters of s", f"s[:{k}]", lambda s: s[:k]),
        (f"last_{k}", f"returns the last {k} characters of s", f"s[-{k}:]", lambda s: s[-k:]),
        (f"count_{c}", f"returns how many times the letter '{c}' appears in s", f"s.count({c!r})",
         lambda s: s.count(c)),
        (f"swap_{c}_{d}", f"returns s with every '{c}' replaced by '{d}'", f"s.replace({c!r}, {d!r})",
         lambda s: s.replace(c, d)),
        (f"starts_{c}", f"returns True if s starts with '{c}', otherwise False", f"s.startswith({c!r})",
         lambda s: s.startswith(c)),
        ("reverse_text", "returns s reversed", "s[::-1]", lambda s: s[::-1]),
        ("shout", "returns s in upper case", "s.upper()", lambda s: s.upper()),
    ]
    name, desc, expr, fn = rng.choice(choices)
    letters = string.ascii_lowercase[:8]
    make = lambda: "".join(rng.choice(letters) for _ in range(rng.randint(0, 10)))  # noqa: E731
    return "string", f"{name}(s)", desc, (lambda: expr), fn, make


_MAKERS = (_int_item, _list_item, _string_item)


def generate(cfg: CodeDomain, rng: random.Random) -> Iterator[dict]:
    while True:
        subtask, signature, desc, expr, fn, make_input = rng.choice(_MAKERS)(rng, cfg)
        name, arg = signature[:-1].split("(")
        prompt = f"Write a Python function `{signature}` that {desc}."
        reference = f"def {signature}:\n    return {expr()}\n"
        inputs = []
        for _ in range(cfg.tests_per_item * 4):
            value = make_input()
            if value not in inputs:
                inputs.append(value)
            if len(inputs) == cfg.tests_per_item:
                break
        tests = [f"assert {name}({value!r}) == {fn(value)!r}" for value in inputs]
        yield {"subtask": subtask, "prompt": prompt, "answer": reference, "tests": tests}
