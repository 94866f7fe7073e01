"""Checking Python solutions against assert-style unit tests, in the sandbox."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tqdm.auto import tqdm

from bayes_llm.rewards.sandbox import Limits, run_python

# Runs many (solution, tests) pairs in one sandboxed process: one Python start-up per chunk
# instead of per item. Each item runs in a fresh namespace with its own alarm; whatever it prints
# is swallowed, and the verdicts go out as one JSON line after a marker.
_BATCH_HARNESS = r"""
import contextlib, io, json, signal, sys
items = json.load(open("items.json"))
out = sys.stdout
def _timeout(signum, frame):
    raise TimeoutError("item time limit")
signal.signal(signal.SIGALRM, _timeout)
verdicts = []
for solution, tests, seconds in items:
    error = None
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            namespace = {"__name__": "solution"}
            exec(solution, namespace)
            for test in tests:
                exec(test, namespace)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    verdicts.append(error)
out.write(MARKER + json.dumps(verdicts) + "\n")
"""


def check_solutions(
    pairs: Sequence[tuple[str, Sequence[str]]],
    *,
    item_seconds: float = 2.0,
    chunk_size: int = 250,
    progress: bool = True,
) -> list[str | None]:
    """For each (solution, tests): None if every test passes, else a short reason."""
    verdicts: list[str | None] = []
    chunks = range(0, len(pairs), chunk_size)
    for start in tqdm(chunks, desc="checking code", unit="chunk", disable=not progress or len(chunks) < 2):
        chunk = pairs[start : start + chunk_size]
        marker = "@@bayes-llm-verdicts@@"
        source = f"MARKER = {marker!r}\n{_BATCH_HARNESS}"
        items = [[solution, list(tests), item_seconds] for solution, tests in chunk]
        budget = Limits(wall_seconds=10 + item_seconds * len(chunk), cpu_seconds=int(10 + item_seconds * len(chunk)))
        result = run_python(source, files={"items.json": json.dumps(items)}, limits=budget)
        lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
        if not lines:
            reason = "sandbox timed out" if result.timed_out else f"sandbox failed: {result.stderr[-200:]}"
            verdicts.extend([reason] * len(chunk))
            continue
        verdicts.extend(json.loads(lines[-1][len(marker) :]))
    return verdicts
