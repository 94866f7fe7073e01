"""The code sandbox: the layers hold, hostile programs earn nothing and change nothing on the host, and
the verdict is made by the tests, outside the sandbox, in every test shape."""

from __future__ import annotations

import collections
import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bayes_llm.rewards import code as code_checks
from bayes_llm.rewards import plain, sandbox
from bayes_llm.rewards.code import check_solutions
from bayes_llm.rewards.replay import free_names
from bayes_llm.rewards.sandbox import Isolation, Limits, SandboxUnavailable, run_python
from tests import sandbox_cases
from tests.sandbox_cases import (
    CASES,
    CORRECT,
    HOOK_OFF,
    SECRET_ENV,
    TESTS_HUMANEVAL,
    TESTS_PROJECT,
    human_eval_pairs,
    sandbox_processes,
    watched_host,
)

ISOLATED = sandbox.detect().sufficient
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="the sandbox's uid layer needs root")


@pytest.fixture(autouse=True)
def no_kept_verdicts(monkeypatch):
    """Each test judges its programs itself, not with verdicts an earlier test left in the process."""
    monkeypatch.setattr(code_checks, "_VERDICTS", {})


@pytest.fixture
def host():
    with watched_host() as violations:
        yield
    assert violations == []


@needs_isolation
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_programs_earn_nothing_and_change_nothing(name, host):
    program, _ = CASES[name]
    pairs = [(CORRECT, TESTS_PROJECT), (program, TESTS_PROJECT), (CORRECT, TESTS_PROJECT),
             (CORRECT, TESTS_HUMANEVAL), (program, TESTS_HUMANEVAL), (CORRECT, TESTS_HUMANEVAL)]  # fmt: skip
    started = time.monotonic()
    verdicts = check_solutions(pairs, item_seconds=1.0, progress=False, reuse=False)
    assert verdicts[1] is not None and verdicts[4] is not None, f"{name} was rewarded"
    assert verdicts[0] is verdicts[2] is verdicts[3] is verdicts[5] is None, verdicts
    assert time.monotonic() - started < 60


@needs_isolation
def test_the_layers_hold_inside():
    probe = (
        "import os, socket, resource\n"
        "print(os.getuid(), os.getppid(), len([p for p in os.listdir('/proc') if p.isdigit()]), os.getcwd())\n"
        "print(resource.getrlimit(resource.RLIMIT_NPROC)[0], resource.getrlimit(resource.RLIMIT_AS)[0])\n"
        "print(sorted(os.listdir('/tmp')), sorted(os.environ))\n"
    )
    result = run_python(probe, Limits(processes=16, memory_bytes=1 << 29))
    assert result.ok, result.stderr
    first, second, third = result.stdout.splitlines()
    # Its own PID namespace: the shell that holds it (pid 1, root) and itself.
    uid, parent, processes, cwd = first.split()
    assert int(uid) >= sandbox.UID_BASE and (parent, processes, cwd) == ("1", "2", "/tmp")
    assert second == f"16 {1 << 29}"
    assert third.startswith("[] [") and SECRET_ENV not in third


@needs_isolation
def test_installed_packages_are_hidden_inside():
    hidden = sandbox._hidden_paths()
    assert hidden and all(Path(p).is_dir() for p in hidden)
    listing = f"import os\nprint([len(os.listdir(p)) for p in {hidden!r}])\n"
    result = run_python(listing + "print(len(os.listdir(os.path.dirname(os.__file__))))")
    assert result.ok, result.stderr
    packages, stdlib = result.stdout.splitlines()
    assert packages == str([0] * len(hidden)) and int(stdlib) > 100  # the standard library stays
    assert any(os.listdir(p) for p in hidden)  # (on the host they hold something: the check is not vacuous)


@needs_isolation
def test_no_new_process_or_page_cache_probe_past_seccomp():
    """With the audit hook emptied: no fork (each process would get an address space of its own, the
    rlimit is per process), threads still run; no fadvise or RWF_NOWAIT read, through which samples
    passed notes in the host's page cache (a file on the shared /usr cached or dropped), nor native AIO,
    whose RWF_NOWAIT reads probe the same."""
    stdlib_file = os.path.realpath(os.__file__)  # in the interpreter's prefix, which the sandbox shows
    probe = HOOK_OFF + (
        f"import ctypes, os, threading\nfd = os.open({stdlib_file!r}, os.O_RDONLY)\nout = []\n"
        "libc = ctypes.CDLL(None, use_errno=True)\ncontext = ctypes.c_ulong(0)\n"
        "def io_setup():\n    if libc.syscall(AIO_SETUP, 1, ctypes.byref(context)):\n"
        "        raise OSError(ctypes.get_errno(), 'io_setup')\n"
        "for call in (os.fork, lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED),\n"
        "             lambda: os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT), io_setup):\n"
        "    try:\n        out.append(call() == 0 and os._exit(0))\n"
        "    except OSError as error:\n        out.append(error.errno)\n"
        "thread = threading.Thread(target=out.append, args=('thread',))\nthread.start()\nthread.join()\n"
        "print(out, os.read(fd, 3))\n"
    ).replace("AIO_SETUP", str({"x86_64": 206, "aarch64": 0}[os.uname().machine]))
    result = run_python(probe)
    assert result.ok, result.stderr
    with open(stdlib_file, "rb") as handle:
        start = handle.read(3)
    # ENOSYS; glibc answers a flagged preadv2 the kernel refused with EOPNOTSUPP
    assert result.stdout.strip() == f"[38, 38, 95, 38, 'thread'] {start!r}"


@needs_isolation
def test_no_host_wide_writeback_past_seccomp():
    """sync(2) flushes every disk of the host, and no SIGKILL ends a process inside it."""
    calls = {"x86_64": (162, 306), "aarch64": (81, 267)}[os.uname().machine]
    probe = HOOK_OFF + ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                        f"print([(libc.syscall(n, 0), ctypes.get_errno()) for n in {calls}])\n")  # fmt: skip
    result = run_python(probe)
    assert result.ok and result.stdout.strip() == "[(-1, 38), (-1, 38)]", result


def test_an_answer_too_deep_to_decode_is_no_error_a_test_can_catch():
    # written straight to the reply pipe: the trusted side's json.loads gives up (RecursionError)
    deep = ("import sys\nmain = sys.modules['__main__']\ndef triple_plus_one(x):\n"
            "    main._os.write(main._wfd, b'{\"value\": ' + b'[' * 200000 + b']' * 200000 + b'}\\n')\n"
            "    import time\n    time.sleep(5)\n")  # fmt: skip
    catching = ("try:\n    r = triple_plus_one(2)\nexcept Exception as e:\n    r = type(e).__name__\n"
                "assert r == 'RecursionError'")  # fmt: skip
    assert check_solutions([(deep, [catching])], progress=False, reuse=False) == ["sandbox: a malformed answer"]


def test_no_sockets_processes_or_writes_past_the_audit_policy():
    for code, event in (("import socket\nsocket.socket()", "socket.__new__"), ("import os\nos.fork()", "os.fork"),
                        ("open('/etc/x', 'w')", "writing outside")):  # fmt: skip
        result = run_python(code)
        assert not result.ok and event in result.stderr, (code, result.stderr)


def test_timeout_kills_everything_it_started():
    result = run_python("import time\ntime.sleep(60)", Limits(wall_seconds=1.0))
    assert result.timed_out and not result.ok and result.seconds < 10


def test_weak_isolation_is_refused_unless_the_params_opt_out(monkeypatch, capsys):
    weak = Isolation(uid=False, namespaces=False, notes=("not root: cannot switch to a uid of the sandbox's own",))
    monkeypatch.setattr(sandbox, "detect", lambda: weak)
    monkeypatch.setattr(sandbox, "_warned", set())
    with pytest.raises(SandboxUnavailable, match=r"sandbox\.allow_weak_isolation: true"):
        check_solutions([(CORRECT, TESTS_PROJECT)], progress=False)
    sandbox.configure(allow_weak_isolation=True)
    try:
        assert check_solutions([(CORRECT, TESTS_PROJECT)] * 2, progress=False, reuse=False) == [None, None]
    finally:
        sandbox.configure(allow_weak_isolation=False)
    assert capsys.readouterr().err.count("missing: not root") == 1  # said once


def test_every_test_shape_is_judged_outside():
    wrong = "def f(x):\n    return 0\n"
    helper = "def poly(x):\n    return 2 * x\n\ndef f(x):\n    return x / 2\n"
    checks = [
        ("def f(x):\n    return (x, {1: {2}}, b'z', None)\n", ["assert f(1) == (1, {1: {2}}, b'z', None)"], None),
        (wrong, ["assert f(1) == 0", "assert f(2) == 1"], "AssertionError: assert f(2) == 1"),
        (wrong, ["def check(candidate):\n    assert candidate(3) == 2\ncheck(f)"],
         "AssertionError: assert candidate(3) == 2"),
        (wrong, ["import math\nassert math.isclose(f(1), 0.0)"], None),  # MBPP's shape: tests import
        (helper, ["def check(candidate):\n    assert poly(candidate(4)) == 4\ncheck(f)"], None),  # a program's helper
        ("def f(x):\n    raise ValueError('no')\n", ["try:\n    f(1)\nexcept ValueError:\n    pass"], None),
        ("def f(x):\n    return [x]\n", ["assert f(1) == (1,)"], "AssertionError: assert f(1) == (1,)"),
        ("def f(x):\n    return 1\n", ["assert g(1) == 1"], "NameError: name 'g' is not defined"),
        ("def f(x):\n    return 1\n", ["assert f(lambda: 0) == 1"], "sandbox: the test passes a function"),
        ("def f(x):\n    raise StopIteration\n", ["assert all(map(lambda x: f(x) == 3, [1, 2]))"], "RuntimeError"),
        # MBPP's shape: a Counter compared with the dict it equals; an OrderedDict's order-aware == is not a dict's
        ("import collections\ndef f(x):\n    return collections.Counter(x)\n", ["assert f('aab') == {'a': 2, 'b': 1}"],
         None),
        ("import collections\ndef f(x):\n    return collections.OrderedDict(a=x)\n", ["assert f(1) == {'a': 1}"],
         "RuntimeError: NotPlainData: a OrderedDict is not plain data"),
    ]  # fmt: skip
    verdicts = check_solutions([(solution, tests) for solution, tests, _ in checks], progress=False)
    for (_, tests, want), got in zip(checks, verdicts, strict=True):
        assert got == want if want is None else (got or "").startswith(want), (tests, got)


def test_free_names_are_what_the_program_must_provide():
    test = "import math\nX = 1\ndef check(candidate):\n    assert poly(candidate(X)) == math.pi\ncheck(find_zero)\n"
    assert free_names(test) == {"poly", "find_zero"}


PLAIN = [None, True, 3, -2.5, float("inf"), 1 - 2j, "s", b"\x00", [1, [2]], (1, (2,)), {1: "a", "b": (2,)}, {1, 2},
         frozenset({"x"}), []]  # fmt: skip


@pytest.mark.parametrize("value", PLAIN)
def test_plain_data_round_trips_exactly(value):
    back = plain.decode(json.loads(plain.dumps(plain.encode(value))))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("value", [object(), type("I", (int,), {})(1), lambda: 0, [1, {2: object()}],
                                   type("C", (collections.Counter,), {})(a=1), collections.OrderedDict(a=1)])
def test_anything_else_is_not_plain_data(value):
    with pytest.raises(plain.NotPlainData):
        plain.encode(value)


@pytest.mark.parametrize("data", [{"t": "complex", "v": [1, 2.0]}, {"t": "complex", "v": [1.0]},
                                  {"t": "complex", "v": [1.0, 2.0, 3.0]}, {"t": "complex", "v": "1+2j"}])
def test_malformed_complex_is_refused(data):
    with pytest.raises(plain.NotPlainData):
        plain.decode(data)


def test_a_counter_crosses_as_the_dict_it_equals():
    back = plain.decode(json.loads(plain.dumps(plain.encode(collections.Counter("aab")))))
    assert back == {"a": 2, "b": 1} and type(back) is dict


@pytest.mark.slow
@needs_isolation
def test_human_eval_canonical_solutions_pass_and_broken_ones_fail():
    canonical, broken = human_eval_pairs()
    assert len(canonical) == 164
    assert check_solutions(canonical, progress=False) == [None] * 164
    assert all(v is not None for v in check_solutions(broken, progress=False))


@needs_isolation
def test_a_killed_sandbox_leaves_nothing():
    with sandbox.started(sandbox.python("-c", "import time\ntime.sleep(60)"), Limits()) as process:
        time.sleep(0.2)
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5  # the kernel tears the namespace down right after its init dies
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@needs_isolation
def test_a_launcher_serves_sample_after_sample_and_a_dead_one_is_replaced():
    """One launcher starts this thread's samples one after another, each with a uid and namespaces of its
    own, and keeps no descriptor or child (zombie) from one to the next; if it dies, the next sample
    gets a new one."""
    probe = "import os\nprint(os.getuid(), os.readlink('/proc/self/ns/pid'), os.readlink('/proc/self/ns/net'))"
    assert run_python(probe).ok
    unshare = sandbox._launchers.launcher.process.pid
    (launcher,) = _children(unshare)
    descriptors = sorted(os.listdir(f"/proc/{launcher}/fd"))
    seen = [run_python(probe).stdout.split() for _ in range(20)]
    assert len({uid for uid, _, _ in seen}) == 20
    own = {os.readlink(f"/proc/{launcher}/ns/{kind}") for kind in ("pid", "net")}  # (ids are reused once freed)
    assert not own & {name for _, *names in seen for name in names}
    assert sandbox._launchers.launcher.process.pid == unshare and _children(unshare) == [launcher]
    assert sorted(os.listdir(f"/proc/{launcher}/fd")) == descriptors and _children(launcher) == []
    os.kill(launcher, signal.SIGKILL)
    sandbox._launchers.launcher.process.wait()
    assert run_python("print(7)").stdout == "7\n"
    assert sandbox._launchers.launcher.process.pid != unshare


@needs_isolation
def test_an_exception_mid_exchange_closes_the_launcher_and_the_next_sample_is_right(monkeypatch):
    """An exception between a request to the launcher and its reply (as the replay's item timer could
    raise) must not leave that reply for the next sample to read as its own."""

    readable = sandbox._readable

    class Interrupting:
        armed = False

        def __call__(self, *args):
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt
            return readable(*args)

    interrupting = Interrupting()
    monkeypatch.setattr(sandbox, "_readable", interrupting)
    assert run_python("pass").ok
    first = sandbox._launchers.launcher
    sleeper = sandbox.python("-c", "import time; time.sleep(60)")
    with pytest.raises(KeyboardInterrupt), sandbox.started(sleeper, Limits(), stdin=subprocess.DEVNULL):
        interrupting.armed = True  # the end message goes out; reading the reply is cut short
    assert not first.alive
    assert run_python("print(7)").stdout == "7\n" and sandbox._launchers.launcher is not first


@needs_isolation
def test_a_launcher_that_dies_during_an_item_gives_no_verdict_on_it():
    """Killed from outside mid-item, the launcher takes the program with it: that is no failure of the
    program, so its replay gives no verdicts and the items are judged again (none kept wrong)."""
    slow = ("import time\ntime.sleep(2)\ndef triple_plus_one(x):\n    return 3 * x + 1\n", TESTS_PROJECT)

    def kill_launchers() -> None:
        time.sleep(0.8)
        for replay in _children(os.getpid()):
            for unshare in _children(replay):
                for launcher in _children(unshare):
                    os.kill(launcher, signal.SIGKILL)

    killer = threading.Thread(target=kill_launchers)
    killer.start()
    pairs = [(CORRECT, TESTS_PROJECT), slow, (CORRECT, TESTS_HUMANEVAL)]
    verdicts = check_solutions(pairs, item_seconds=5.0, workers=1, progress=False)
    killer.join()
    assert verdicts == [None, None, None]


@needs_isolation
def test_a_sample_the_host_cannot_start_or_exec_is_a_launcher_failure_not_an_exit_code():
    """Failures before the program runs are the host's (a mount refused, an exec that failed): no exit
    code a caller could take for the program's, and the launcher goes on serving."""
    with pytest.raises(sandbox.HostFailure, match=r"could not start: \[Errno 22\] mount /tmp"):
        run_python("pass", Limits(tmp_bytes=-1))
    with pytest.raises(sandbox.HostFailure, match=r"could not (start|run its program): .*No such file"):
        sandbox._run(["/nonexistent/python"], Limits(), sandbox.require())
    assert run_python("print(4)").stdout == "4\n"


@needs_isolation
def test_a_process_with_many_descriptors_open_keeps_every_layer():
    """A trainer may hold over 1,024 descriptors: the launcher's socket is numbered past what select()
    can watch, and the probe must not take that for a machine without namespaces. The probe leaves no
    launcher behind (the process that probed may run no sample)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        sandbox._close_launcher()
        isolation = sandbox.detect.__wrapped__()
        assert isolation.namespaces and isolation.seccomp, isolation.notes
        assert sandbox._launchers.launcher is None
        assert run_python("print(1)").stdout == "1\n" and sandbox._launchers.launcher.control.fileno() >= 1024
    finally:
        sandbox._close_launcher()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@needs_isolation
def test_samples_started_inside_one_another_each_get_a_launcher():
    echo = "import sys\nline = input()\nprint(line)\nprint(line, file=sys.stderr)"
    with sandbox.started(sandbox.python("-c", echo), Limits(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE) as outer:  # fmt: skip
        inner = run_python("print(2)")
        outer.stdin.write(b"1\n")
        outer.stdin.flush()
        assert outer.stdout.read() == outer.stderr.read() == b"1\n" and outer.wait(5) == 0
    assert inner.stdout == "2\n"


@needs_isolation
def test_a_command_line_over_the_limit_is_a_clear_error_and_the_launcher_goes_on():
    with pytest.raises(ValueError, match="command line must be under"):
        run_python("x = 1\n" * (sandbox.REQUEST_BYTES // 6))
    assert run_python("print(3)").stdout == "3\n"


def test_the_host_watch_sees_what_it_looks_for():
    """The watch itself can fail: a file left outside and a connection to the host are both reported."""
    escaped = Path("/tmp", sandbox_cases.ESCAPED)
    with watched_host() as violations:
        escaped.write_text("x")
        client = socket.socket(socket.AF_UNIX)
        client.connect(f"/run/{sandbox_cases.ESCAPED}.sock")
        time.sleep(0.5)
        client.close()
    escaped.unlink()
    assert f"escaped: {escaped}" in violations and any("connection reached the host" in v for v in violations)


# Leaves '7' wherever a later sample could look: its tmp, /dev/shm, the kernel keyring of its uid.
_WRITE = (
    "import ctypes, os\nfor path in ('/tmp/note', '/dev/shm/note'):\n    try:\n        open(path, 'w').write('7')\n"
    "    except OSError:\n        pass\nlibc = ctypes.CDLL(None)\n"
    "libc.syscall(248, b'user', b'bayes-note', b'7', 1, -4)  # add_key to the user keyring\n"
)
_READ = (
    "import ctypes, os\nlibc = ctypes.CDLL(None)\n"
    "found = [os.path.exists(p) for p in ('/tmp/note', '/dev/shm/note')]\n"
    "found.append(libc.syscall(249, b'user', b'bayes-note', None, -4) > 0)  # request_key\n"
)
_WRITER = HOOK_OFF + _WRITE + "def triple_plus_one(x):\n    return 0\n"
_READER = HOOK_OFF + _READ + "def triple_plus_one(x):\n    return 3 * x + 1 if any(found) else 0\n"


@needs_isolation
@pytest.mark.parametrize("workers", [1, 2])
def test_samples_cannot_talk_to_each_other(workers):
    pairs = [(_WRITER, TESTS_PROJECT), (_READER, TESTS_PROJECT), (_WRITER, TESTS_PROJECT), (_READER, TESTS_PROJECT)]
    verdicts = check_solutions(pairs, workers=workers, progress=False, reuse=False)
    assert all(v is not None for v in verdicts), verdicts
    # The reader does find a note a sample leaves for itself in its tmp and /dev/shm; kernel keys it
    # cannot make at all (seccomp), though the audit hook is off.
    for channel, found in ((0, True), (1, True), (2, False)):
        own = HOOK_OFF + _WRITE + _READ + f"def triple_plus_one(x):\n    return 3 * x + 1 if found[{channel}] else 0\n"
        assert (check_solutions([(own, TESTS_PROJECT)], progress=False, reuse=False) == [None]) is found, channel


def test_each_distinct_program_is_judged_once_per_process(monkeypatch):
    """Repeats (k samples of one prompt, an unchanged answer at the next validation) reuse the verdict;
    reuse=False runs every pair as given; a failed replay is not kept, so a later call judges it."""
    ran: list[str] = []
    failing = {"broken replay"}

    def replay(items, limits, isolation, timings=None):
        ran.extend(solution for solution, _, _ in items)
        if failing & {solution for solution, _, _ in items}:
            return None
        return [None if solution.startswith("pass") else "AssertionError" for solution, _, _ in items]

    monkeypatch.setattr(code_checks, "_replay", replay)
    monkeypatch.setattr(code_checks, "require", lambda: Isolation(uid=True))
    tests = ["assert f(1) == 1"]
    first = check_solutions([("pass a", tests), ("fail b", tests), ("pass a", tests)], progress=False)
    assert first == [None, "AssertionError", None] and sorted(ran) == ["fail b", "pass a"]
    ran.clear()
    assert check_solutions([("fail b", tests), ("pass a", tests), ("pass c", tests)], progress=False) == [
        "AssertionError", None, None]  # fmt: skip
    assert ran == ["pass c"]
    ran.clear()
    assert check_solutions([("pass a", ["assert f(2) == 2"])], progress=False) == [None]  # other tests: judged
    assert ran == ["pass a"]
    ran.clear()
    assert check_solutions([("pass a", tests)] * 2, progress=False, reuse=False) == [None, None]
    assert ran == ["pass a", "pass a"]
    ran.clear()
    assert check_solutions([("broken replay", tests)], progress=False) == [code_checks.UNJUDGED]
    failing.clear()
    assert check_solutions([("broken replay", tests)], progress=False) == ["AssertionError"]


def test_kept_verdicts_are_bounded_and_the_least_recently_used_go_first(monkeypatch):
    ran: list[str] = []

    def replay(items, limits, isolation, timings=None):
        ran.extend(solution for solution, _, _ in items)
        return [None] * len(items)

    monkeypatch.setattr(code_checks, "_replay", replay)
    monkeypatch.setattr(code_checks, "require", lambda: Isolation(uid=True))
    monkeypatch.setattr(code_checks, "_VERDICTS_KEPT", 3)
    tests = ["assert f(1) == 1"]
    assert check_solutions([(name, tests) for name in "abc"], progress=False) == [None] * 3
    assert check_solutions([("a", tests), ("d", tests)], progress=False) == [None, None]  # a kept though oldest
    assert ran == ["a", "b", "c", "d"] and len(code_checks._VERDICTS) == 3
    ran.clear()
    check_solutions([("a", tests), ("c", tests), ("d", tests)], progress=False)
    check_solutions([("b", tests)], progress=False)  # b was the least recently used: forgotten
    assert ran == ["b"]
