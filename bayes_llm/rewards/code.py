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


# Verdicts already given in this process, by (program, tests, seconds), the most recently used last.
# Programs repeat: the k samples of one prompt, an answer unchanged since the last validation, two
# systems' same answer. A program sees nothing but its text and tests, so a second run could differ
# only where the program is flaky (random numbers, the clock) or the host failed it (a timeout under
# load): its one verdict then stands for the process, as one run's stood for its call before.
Key = tuple[str, tuple[str, ...], float]
_VERDICTS: dict[Key, str | None] = {}
_VERDICTS_KEPT = 20_000  # the least recently used are forgotten beyond this (tens of MB at worst)


class Unjudged(str):
    """The verdict of an item whose replay process failed: not kept, so a later call judges it again
    (a class of its own: no program can return one, whatever its message)."""


UNJUDGED = Unjudged("sandbox: the item could not be judged")


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
        judged = [(_replay([item], limits, isolation) or [UNJUDGED])[0]
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
    reuse: bool = True,
) -> list[str | None]:
    """For each (solution, tests): None if every test passes, else a short reason. With `reuse`, each
    distinct (solution, tests, item_seconds) runs once per process: its verdict is kept (the 20,000
    most recently used) and given again; without, every pair runs as given (to time the sandbox, or
    to see what a program does to the items beside it). `timings`, if given, receives the seconds
    (sandbox start, program, tests) of each item that ran.

    Chunks run in `workers` replay processes at once (default: one per CPU): most of an item's time is
    starting its sandbox, which waits on the kernel as much as it computes."""
    keys = [(solution, tuple(tests), float(item_seconds)) for solution, tests in pairs]
    if not keys:
        return []
    isolation = require()  # also when every verdict is known: weak isolation is refused all the same
    if not reuse:
        return _judge(keys, isolation, item_seconds, chunk_size, workers, progress, timings)
    unique = dict.fromkeys(keys)
    known = {key: _VERDICTS.pop(key) for key in unique if key in _VERDICTS}  # re-added last below
    new = [key for key in unique if key not in known]
    known.update(zip(new, _judge(new, isolation, item_seconds, chunk_size, workers, progress, timings), strict=True))
    _VERDICTS.update((key, verdict) for key, verdict in known.items() if not isinstance(verdict, Unjudged))
    for old in list(_VERDICTS)[: max(0, len(_VERDICTS) - _VERDICTS_KEPT)]:
        del _VERDICTS[old]
    return [known[key] for key in keys]


def _judge(keys: list[Key], isolation: Isolation, item_seconds: float, chunk_size: int, workers: int | None,
           progress: bool, timings: list[float] | None) -> list[str | None]:  # fmt: skip
    limits = Limits(wall_seconds=item_seconds, cpu_seconds=max(1, int(item_seconds + 0.999)))
    items = [[solution, list(tests), item_seconds] for solution, tests, _ in keys]
    if not items:
        return []
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
