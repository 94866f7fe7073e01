"""Checking Python solutions against their unit tests: the code reward and pass@1.

The program runs in the sandbox (`rewards.sandbox`, one isolated process per item); its tests run in
a separate clean process (`rewards.replay`, one per chunk of items) that calls into the program and
judges the plain-data answers itself, so no verdict is ever made where model-written code ran.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from bayes_llm.rewards.sandbox import Limits, require


def _replay(items: list, limits: Limits) -> list[str | None] | None:
    """Verdicts for `items` from one replay process, or None if it did not give one per item."""
    isolation = require()
    request = {"items": items, "isolation": dataclasses.asdict(isolation), "limits": dataclasses.asdict(limits)}
    budget = 30 + sum(seconds + 1 for _, _, seconds in items)
    try:
        done = subprocess.run([sys.executable, "-I", "-m", "bayes_llm.rewards.replay"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=budget)  # fmt: skip
        verdicts = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, ValueError):
        return None
    if not isinstance(verdicts, list) or len(verdicts) != len(items):
        return None
    return [v if v is None else str(v) for v in verdicts]


def check_solutions(
    pairs: Sequence[tuple[str, Sequence[str]]],
    *,
    item_seconds: float = 2.0,
    chunk_size: int = 250,
    progress: bool = True,
) -> list[str | None]:
    """For each (solution, tests): None if every test passes, else a short reason."""
    limits = Limits(wall_seconds=item_seconds, cpu_seconds=max(1, int(item_seconds + 0.999)))
    items = [[solution, list(tests), item_seconds] for solution, tests in pairs]
    verdicts: list[str | None] = []
    chunks = range(0, len(items), chunk_size)
    for start in tqdm(chunks, desc="checking code", unit="chunk", disable=not progress or len(chunks) < 2):
        chunk = items[start : start + chunk_size]
        judged = _replay(chunk, limits)
        if judged is None:  # the replay process failed: judge each item alone, so one cannot cost the others
            judged = [(_replay([item], limits) or ["sandbox: the item could not be judged"])[0] for item in chunk]
        verdicts.extend(judged)
    return verdicts
