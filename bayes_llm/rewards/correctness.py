"""The correctness reward per answer kind: 1.0 for a right completion, else 0.0.

number: the first number equals the reference; letter: the choice it names (its text written out,
or the first capital letter) is the reference; code:
the completion (up to where the model starts a new document) passes the item's unit tests in the
sandbox — the same check evaluation uses for pass@1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bayes_llm.rewards.answers import exact_match, parses_as_python
from bayes_llm.rewards.code import check_solutions

_NEW_DOCUMENT = ("\nQuestion:", "\nTask:")
# An instruct model answers in a Markdown code block: a fence opens a line (at its start, so an
# indented example in a docstring is not one) and the block runs to the closing fence or the end.
_FENCED = re.compile(r"^```[^\n`]*\n(.*?)(?:^```|\Z)", re.DOTALL | re.MULTILINE)


def code_of(completion: str) -> str:
    """The program in a completion: all of it when it parses as Python, else its first fenced block."""
    for marker in _NEW_DOCUMENT:
        completion = completion.split(marker, 1)[0]
    fenced = None if parses_as_python(completion) else _FENCED.search(completion)
    return (fenced.group(1) if fenced else completion).strip("\n ") + "\n"


def correctness(kind: str, completions: Sequence[str], rows: Sequence[dict], progress: bool = False) -> list[float]:
    if kind == "code":
        verdicts = check_solutions([(code_of(c), row["tests"]) for c, row in zip(completions, rows, strict=True)],
                                   progress=progress)  # fmt: skip
        return [1.0 if verdict is None else 0.0 for verdict in verdicts]
    pairs = zip(completions, rows, strict=True)
    return [float(exact_match(kind, c, row["answer"], row.get("choices"))) for c, row in pairs]
