"""Checking Python solutions against their unit tests: the code reward and pass@1.

The program runs in the sandbox (`rewards.sandbox`, one isolated process per item); its tests run in
a separate clean process (`rewards.replay`, one per chunk of items) that calls into the program and
judges the plain-data answers itself, so no verdict is ever made where model-written code ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from bayes_llm.rewards.sandbox import Isolation, Limits, require

# The replay process: isolated mode, and no site-packages (it needs only this package and the standard
# library, and starts in half the time without them).
REPLAY = [sys.executable, "-I", "-S", "-c",
          f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
          "from bayes_llm.rewards.replay import main; raise SystemExit(main())"]  # fmt: skip


def _replay(items: list, limits: Limits, isolation: Isolation, timings: list | None = None) -> list[str | None] | None:
    """Verdicts for `items` from one replay process, or None if it did not give one per item."""
    request = {"items": items, "isolation": dataclasses.asdict(isolation), "limits": dataclasses.asdict(limits)}
    budget = 30 + sum(seconds + 1 for _, _, seconds in items)
    try:
        done = subprocess.run(REPLAY, input=json.dumps(request), capture_output=True, text=True, timeout=budget)
        reply = json.loads(done.stdout)
        verdicts, seconds = reply["verdicts"], reply["seconds"]
    except (subprocess.TimeoutExpired, ValueError, TypeError, KeyError):
        return None
    if not isinstance(verdicts, list) or len(verdicts) != len(items):
        return None
    if timings is not None:
        timings.extend(seconds)
    return [v if v is None else str(v) for v in verdicts]


def _judge_chunk(chunk: list, limits: Limits, isolation: Isolation, timings: list | None) -> list[str | None]:
    judged = _replay(chunk, limits, isolation, timings)
    if judged is None:  # the replay process failed: judge each item alone, so one cannot cost the others
        judged = [(_replay([item], limits, isolation) or ["sandbox: the item could not be judged"])[0]
                  for item in chunk]  # fmt: skip
    return judged


def check_solutions(
    pairs: Sequence[tuple[str, Sequence[str]]],
    *,
    item_seconds: float = 2.0,
    chunk_size: int = 100,
    workers: int | None = None,
    progress: bool = True,
    timings: list[float] | None = None,
) -> list[str | None]:
    """For each (solution, tests): None if every test passes, else a short reason. `timings`, if given,
    receives each item's seconds (sandbox start, program, tests).

    Chunks run in `workers` replay processes at once (default: one per CPU): most of an item's time is
    starting its sandbox, which waits on the kernel as much as it computes."""
    limits = Limits(wall_seconds=item_seconds, cpu_seconds=max(1, int(item_seconds + 0.999)))
    items = [[solution, list(tests), item_seconds] for solution, tests in pairs]
    if not items:
        return []
    isolation = require()
    workers = max(1, min(workers or os.cpu_count() or 1, len(items)))
    size = max(1, min(chunk_size, -(-len(items) // workers)))
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    verdicts: list[str | None] = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(items), desc="checking code", unit="item",
                                                   disable=not progress or len(chunks) < 2) as bar:  # fmt: skip
        for judged in pool.map(lambda chunk: _judge_chunk(chunk, limits, isolation, timings), chunks):
            verdicts.extend(judged)
            bar.update(len(judged))
    return verdicts
