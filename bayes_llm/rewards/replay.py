"""The verdict on model-written code, made where that code never runs.

`python -m bayes_llm.rewards.replay` (a clean process the trainer starts per chunk of items) runs each
item's *tests* itself: the dataset's test code, in any shape (`assert f(x) == y`, MBPP's asserts,
HumanEval's `def check(candidate): ...` + `check(entry_point)`). Every name a test uses but does not
define (the function under test, a helper of the program such as HumanEval's `poly`) is a proxy: a
call sends its arguments, as plain data, to the candidate's program running in the sandbox
(`SERVER`), which answers with the return value as plain data or the name of the exception it raised.
The assertions run here, on values rebuilt here, so a candidate that exits early, patches whatever
reports results, writes to any descriptor it has, or returns an object whose `__eq__` always says
yes, can at most give wrong answers. A failure of the sandbox (a crash, a timeout, a malformed or
non-plain answer) is a `SandboxFailure`, a BaseException: test code cannot catch it and go on.

stdin: {"items": [[solution, tests, seconds], ...], "isolation": {...}, "limits": {...}};
stdout: {"verdicts": per item None (every test passed) or a short reason, "seconds": per item}.
"""

from __future__ import annotations

import builtins
import json
import os
import select
import signal
import subprocess
import symtable
import sys
import time
from pathlib import Path

from bayes_llm.rewards import plain
from bayes_llm.rewards.sandbox import AUDIT_POLICY, HostFailure, Isolation, Limits, python, started

REPLY_CAP = 1 << 20  # bytes of one answer

# The candidate's side: its two pipes are moved off stdin/stdout (its own prints go to /dev/null),
# the audit policy goes in, then it runs the program and answers calls, one JSON line each.
SERVER = (
    Path(plain.__file__).read_text()
    + r'''
import os as _os
_reader = _os.fdopen(_os.dup(0), "rb")
_wfd = _os.dup(1)
_null = _os.open("/dev/null", _os.O_RDWR)
for _fd in (0, 1, 2):
    _os.dup2(_null, _fd)
'''
    + AUDIT_POLICY
    + r'''
_namespace = {"__name__": "solution"}
for _line in _reader:
    try:
        _message = json.loads(_line)
        if "source" in _message:
            exec(compile(_message["source"], "solution.py", "exec"), _namespace)
            _reply = {"ok": True}
        elif _message["call"] not in _namespace:
            _reply = {"error": "NameError", "message": f"name {_message['call']!r} is not defined"}
        else:
            _args = [decode(a) for a in _message["args"]]
            _kwargs = {k: decode(v) for k, v in _message["kwargs"].items()}
            _reply = {"value": encode(_namespace[_message["call"]](*_args, **_kwargs))}
    except BaseException as _exc:  # SystemExit and KeyboardInterrupt too: no result, no exit
        _reply = {"error": type(_exc).__name__, "message": str(_exc)[:300]}
    _data = dumps(_reply).encode()
    while _data:
        _data = _data[_os.write(_wfd, _data):]
'''
)


class SandboxFailure(BaseException):
    """The candidate gave no usable answer: it crashed, hung, or sent something that is not plain data."""


class Channel:
    """Requests to the candidate's server and its answers, each within the item's deadline."""

    def __init__(self, process: subprocess.Popen, deadline: float) -> None:
        self.process, self.deadline, self.pending = process, deadline, b""

    def ask(self, message: dict) -> dict:
        try:
            self.process.stdin.write(plain.dumps(message).encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise SandboxFailure("the program exited without a result") from None
        line = self._line()
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):  # ('[' * 10**5: too deep to decode, and no error a test may catch)
            raise SandboxFailure("a malformed answer") from None
        if not isinstance(reply, dict):
            raise SandboxFailure("a malformed answer")
        return reply

    def _line(self) -> bytes:
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SandboxFailure("TimeoutError: item time limit")
            data = os.read(fd, 65536)
            if not data:
                raise SandboxFailure("the program exited without a result")
            self.pending += data
            if len(self.pending) > REPLY_CAP:
                raise SandboxFailure("an answer over the size cap")
        line, self.pending = self.pending.split(b"\n", 1)
        return line


def _exception(name: str, message: str) -> Exception:
    """The candidate's exception, rebuilt here as the builtin class of that name (tests may expect one)."""
    kind = getattr(builtins, name, None)
    # Not the ones that steer control flow: a StopIteration from the program would end a test's loop early.
    steering = (StopIteration, StopAsyncIteration)
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, steering):
        return kind(message)
    return RuntimeError(f"{name}: {message}")


class Remote:
    """A name the tests use and the program defines: calling it runs it in the sandbox."""

    def __init__(self, channel: Channel, name: str) -> None:
        self.channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        try:
            message = {"call": self.__name__, "args": [plain.encode(a) for a in args],
                       "kwargs": {str(k): plain.encode(v) for k, v in kwargs.items()}}  # fmt: skip
        except plain.NotPlainData as error:
            raise SandboxFailure(f"the test passes {error}: it cannot be replayed") from None
        reply = self.channel.ask(message)
        if "error" in reply:
            raise _exception(str(reply["error"]), str(reply.get("message", "")))
        try:
            return plain.decode(reply["value"])
        except (KeyError, TypeError, ValueError, RecursionError) as error:  # NotPlainData is a ValueError
            raise SandboxFailure(f"returned something that is not plain data ({error})"[:200]) from None


def free_names(source: str) -> set[str]:
    """Names the test code reads without defining them (nor builtins): what the program must provide."""
    table = symtable.symtable(source, "<test>", "exec")
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used: set[str] = set()
    stack = [table]
    while stack:
        scope = stack.pop()
        module = scope.get_type() == "module"
        used |= {s.get_name() for s in scope.get_symbols() if (s.is_referenced() if module else s.is_global())}
        stack += scope.get_children()
    return used - bound - set(dir(builtins))


def _failing_line(error: BaseException, test: str) -> str:
    """The test's line an assertion failed on (a bare `assert` has no message)."""
    lines = [tb.tb_lineno for tb in _frames(error.__traceback__) if tb.tb_frame.f_code.co_filename == "<test>"]
    return test.splitlines()[lines[-1] - 1].strip() if lines else ""


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _on_alarm(signum, frame):
    raise SandboxFailure("TimeoutError: item time limit")


def judge(solution: str, tests: list[str], seconds: float, isolation: Isolation, limits: Limits) -> str | None:
    """None when every test passes against the program run in the sandbox; else a short reason."""
    deadline = time.monotonic() + seconds
    try:
        codes = [compile(test, "<test>", "exec") for test in tests]
    except SyntaxError as error:
        return f"the test does not compile: {error}"[:200]
    try:
        with started(python("-c", SERVER), limits, isolation, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL) as process:  # fmt: skip
            channel = Channel(process, deadline)
            reply = channel.ask({"source": solution})
            if "error" in reply:
                return f"{reply['error']}: {reply.get('message', '')}"[:200]
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.001))
            try:
                for test, code in zip(tests, codes, strict=True):
                    namespace = {"__name__": "__test__"} | {name: Remote(channel, name) for name in free_names(test)}
                    exec(code, namespace)
            finally:  # off before the sandbox is torn down: the alarm must not cut that short
                signal.setitimer(signal.ITIMER_REAL, 0)
    except HostFailure:
        raise  # the host failed, not the program: this process gives no verdicts, so the items are judged again
    except SandboxFailure as failure:
        return f"sandbox: {failure}"[:200]
    except AssertionError as error:
        return f"AssertionError: {str(error) or _failing_line(error, test)}"[:200]
    except Exception as error:
        return f"{type(error).__name__}: {error}"[:200]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return None


def main() -> int:
    request = json.load(sys.stdin)
    isolation = Isolation(**{k: v for k, v in request["isolation"].items() if k != "notes"})
    limits = Limits(**request["limits"])
    signal.signal(signal.SIGALRM, _on_alarm)
    verdicts, times = [], []
    for solution, tests, seconds in request["items"]:
        started_at = time.perf_counter()
        verdicts.append(judge(solution, tests, seconds, isolation, limits))
        times.append(round(time.perf_counter() - started_at, 4))
    sys.stdout.write(json.dumps({"verdicts": verdicts, "seconds": times}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
