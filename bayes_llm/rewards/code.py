"""Checking Python solutions against assert-style unit tests, in the sandbox.

Judged by values, not by what the sandbox says: a test `assert <call> == <literal>` is split, only
`<call>` runs in the sandbox, and this (trusted) process compares the returned value with the
literal. So a solution that exits early, fakes the harness's output or tampers with the harness
can, at best, make its own tests fail; it cannot pass them without returning the right values.
Tests of any other shape run as whole asserts in the sandbox (that verdict is only as trustworthy
as the harness). Many items share one sandboxed process, each item in its own forked child (see the
harness), so items cannot see or touch each other; if the shared process dies anyway, each item of
the chunk is re-run alone, so one hostile sample cannot cost the others their reward.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from bayes_llm.rewards.sandbox import Limits, run_python

# The harness is trusted: untrusted code only ever runs in a forked child per item, which first adds
# an audit hook that forbids processes and signals (hooks cannot be removed), points stdout/stderr at
# /dev/null and can only report through its own pipe. The parent enforces the item's time limit,
# caps what it reads, and prints one JSON line after a marker: per item, an error (or None) and the
# repr of each checked value.
_BATCH_HARNESS = r"""
import json, os, select, signal, sys, time
items = json.load(open("items.json"))
CAP = 1 << 20
STRICT = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
          "os.kill", "os.killpg", "signal.pthread_kill"}

def strict(event, args):
    if event in STRICT:
        raise PermissionError(f"sandbox: {event} is not allowed")

def child(solution, checks, pipe):
    sys.addaudithook(strict)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    error, values = None, []
    try:
        namespace = {"__name__": "solution"}
        exec(solution, namespace)
        for kind, source in checks:
            if kind == "value":
                text = repr(eval(source, namespace))
                values.append(text if len(text) <= 10000 else None)
            else:
                exec(source, namespace)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    data = json.dumps([error, values]).encode()
    while data:
        data = data[os.write(pipe, data):]

def run(solution, checks, seconds):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            child(solution, checks, write)
        finally:
            os._exit(0)
    os.close(write)
    deadline, received, size, outcome = time.monotonic() + seconds, [], 0, None
    while outcome is None:
        ready = select.select([read], [], [], max(0.0, deadline - time.monotonic()))[0]
        if not ready:
            outcome = ["TimeoutError: item time limit", []]
            break
        data = os.read(read, 65536)
        size += len(data)
        if size > CAP:
            outcome = ["too much output", []]
        elif not data:
            break
        received.append(data)
    os.close(read)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if outcome is None:
        try:
            outcome = json.loads(b"".join(received))
        except ValueError:
            outcome = ["exited without a result", []]
    return outcome

results = [run(solution, checks, seconds) for solution, checks, seconds in items]
sys.stdout.write(MARKER + json.dumps(results) + "\n")
sys.stdout.flush()
"""
_MARKER = "@@bayes-llm-verdicts@@"
_NOT_A_LITERAL = object()


def split_test(test: str) -> tuple[str, Any] | None:
    """`assert <expr> == <literal>` → (expr source, literal value); None for any other shape."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    check = tree.body[0].test
    if not (isinstance(check, ast.Compare) and len(check.ops) == 1 and isinstance(check.ops[0], ast.Eq)):
        return None
    try:
        expected = ast.literal_eval(check.comparators[0])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return ast.unparse(check.left), expected


def _literal(text: str | None) -> Any:
    if text is None:
        return _NOT_A_LITERAL
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_A_LITERAL


def _plan(tests: Sequence[str]) -> tuple[list[list[str]], list[Any]]:
    checks, expected = [], []
    for test in tests:
        split = split_test(test)
        if split is None:
            checks.append(["assert", test])
        else:
            checks.append(["value", split[0]])
            expected.append(split[1])
    return checks, expected


def _judge(error: str | None, values: list, expected: list) -> str | None:
    if error is not None:
        return error
    if len(values) != len(expected):
        return "wrong number of results"
    for got, want in zip(values, expected, strict=True):
        value = _literal(got)
        if value is _NOT_A_LITERAL:
            return "returned a value that is not a plain literal"
        if value != want:
            return f"AssertionError: got {got[:60]}, expected {want!r}"[:200]
    return None


def _run_chunk(plans: list, item_seconds: float) -> list[str | None] | None:
    items = [[solution, checks, item_seconds] for solution, checks, _ in plans]
    seconds = 5 + item_seconds * len(plans)
    budget = Limits(wall_seconds=seconds, cpu_seconds=int(seconds), subprocesses=True)
    result = run_python(f"MARKER = {_MARKER!r}\n{_BATCH_HARNESS}", files={"items.json": json.dumps(items)},
                        limits=budget)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith(_MARKER)]
    try:
        results = json.loads(lines[-1][len(_MARKER) :]) if lines and result.ok else None
    except json.JSONDecodeError:
        results = None
    if not isinstance(results, list) or len(results) != len(plans):
        return None
    try:
        return [_judge(error, values, plan[2]) for (error, values), plan in zip(results, plans, strict=True)]
    except (TypeError, ValueError):
        return None  # a malformed (forged) result line


def check_solutions(
    pairs: Sequence[tuple[str, Sequence[str]]],
    *,
    item_seconds: float = 2.0,
    chunk_size: int = 250,
    progress: bool = True,
) -> list[str | None]:
    """For each (solution, tests): None if every test passes, else a short reason."""
    plans = [(solution, *_plan(tests)) for solution, tests in pairs]
    verdicts: list[str | None] = []
    chunks = range(0, len(plans), chunk_size)
    for start in tqdm(chunks, desc="checking code", unit="chunk", disable=not progress or len(chunks) < 2):
        chunk = plans[start : start + chunk_size]
        judged = _run_chunk(chunk, item_seconds)
        if judged is None:  # the shared process died or was tampered with: isolate each item
            judged = [
                (_run_chunk([plan], item_seconds) or ["sandbox: the solution crashed, hung or tampered with it"])[0]
                for plan in chunk
            ]
        verdicts.extend(judged)
    return verdicts
