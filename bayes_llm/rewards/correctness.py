"""The correctness reward per answer kind: 1.0 for a right completion, else 0.0.

number: the first number equals the reference; letter: the first capital letter equals it; code:
the completion (up to where the model starts a new document) passes the item's unit tests in the
sandbox — the same check evaluation uses for pass@1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bayes_llm.rewards.answers import exact_match
from bayes_llm.rewards.code import check_solutions

_NEW_DOCUMENT = ("\nQuestion:", "\nTask:")
# An instruct model answers in a Markdown code block: its program is what the first block holds.
_FENCED = re.compile(r"```[\w+-]*[^\S\n]*\n(.*?)(?:```|$)", re.DOTALL)


def code_of(completion: str) -> str:
    fenced = _FENCED.search(completion)
    if fenced:
        completion = fenced.group(1)
    for marker in _NEW_DOCUMENT:
        completion = completion.split(marker, 1)[0]
    return completion.strip("\n ") + "\n"


def correctness(kind: str, completions: Sequence[str], rows: Sequence[dict], progress: bool = False) -> list[float]:
    if kind == "code":
        verdicts = check_solutions([(code_of(c), row["tests"]) for c, row in zip(completions, rows, strict=True)],
                                   progress=progress)  # fmt: skip
        return [1.0 if verdict is None else 0.0 for verdict in verdicts]
    return [float(exact_match(kind, c, row["answer"])) for c, row in zip(completions, rows, strict=True)]
