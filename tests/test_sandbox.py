"""The code sandbox: basics, and hostile samples that must score 0 without hurting anything else."""

from __future__ import annotations

import json
import os
import time

import pytest

from bayes_llm.rewards.code import check_solutions, split_test
from bayes_llm.rewards.sandbox import Limits, run_python


def test_runs_in_a_fresh_dir_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    result = run_python("import os; print(os.getcwd()); print(sorted(os.environ))")
    assert result.ok
    cwd, env = result.stdout.splitlines()
    assert cwd != os.getcwd() and "bayes-llm-sandbox-" in cwd
    assert "SECRET_TOKEN" not in env


def test_timeout_kills_the_process_group():
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)"
    )
    result = run_python(code, limits=Limits(wall_seconds=1.0, subprocesses=True))
    assert result.timed_out and not result.ok and result.seconds < 10


def test_output_is_capped():
    result = run_python("print('x' * 10**8)", limits=Limits(output_bytes=1000))
    assert len(result.stdout) <= 1000 and not result.ok


TESTS = ["assert triple_plus_one(2) == 7", "assert triple_plus_one(0) == 1", "assert triple_plus_one(-3) == -8"]
CORRECT = "def triple_plus_one(x):\n    return 3 * x + 1\n"
FORGED_LINE = "@@bayes-llm-verdicts@@" + json.dumps([[None, ["7", "1", "-8"]]] * 3)
HOSTILE = {
    "infinite loop": "def triple_plus_one(x):\n    while True:\n        pass\n",
    "loop that swallows the alarm": "def triple_plus_one(x):\n    while True:\n        try:\n"
    "            while True: pass\n        except BaseException:\n            pass\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "subprocess fork bomb": "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', '1'])\n",
    "memory bomb": "blob = bytearray(8 * 1024**3)\ndef triple_plus_one(x):\n    return 3 * x + 1\n",
    "write outside": "open('/tmp/bayes-llm-escaped', 'w').write('x')\ndef triple_plus_one(x):\n    return 3 * x + 1\n",
    "socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n"
    "def triple_plus_one(x):\n    return 3 * x + 1\n",
    "read secrets": "import os\ndef triple_plus_one(x):\n    return os.environ.get('BAYES_SECRET', 'none')\n",
    "print 100 MB": "print('x' * 10**8)\nimport os\nos.write(1, b'y' * 10**8)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "SystemExit in the function": "def triple_plus_one(x):\n    raise SystemExit(0)\n",
    "forged verdicts then exit": f"import os, sys\nsys.__stdout__.write({FORGED_LINE!r} + '\\n')\n"
    "sys.__stdout__.flush()\nos._exit(0)\n",
    "forged verdicts through /proc": f"import os\nopen(f'/proc/{{os.getppid()}}/fd/1', 'w').write({FORGED_LINE!r})\n"
    "os._exit(0)\n",
    "tampered equality": "class Anything:\n    def __eq__(self, other):\n        return True\n"
    "def triple_plus_one(x):\n    return Anything()\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_samples_score_zero_and_leave_the_rest_alone(name, monkeypatch):
    monkeypatch.setenv("BAYES_SECRET", "7")
    started = time.monotonic()
    verdicts = check_solutions([(CORRECT, TESTS), (HOSTILE[name], TESTS), (CORRECT, TESTS)], item_seconds=1.0)
    assert verdicts[1] is not None, f"{name} passed its tests"
    assert verdicts[0] is None and verdicts[2] is None, verdicts
    assert time.monotonic() - started < 60
    assert not os.path.exists("/tmp/bayes-llm-escaped")


def test_no_network_and_no_processes_inside():
    result = run_python("import socket\ntry:\n    socket.socket()\nexcept PermissionError as e:\n    print(e)\n")
    assert "socket.__new__ is not allowed" in result.stdout
    result = run_python("import os\nos.fork()\n")
    assert not result.ok and "os.fork is not allowed" in result.stderr


def test_values_are_judged_here_not_in_the_sandbox():
    assert split_test("assert f(3, [1, 2]) == {'a': (1, 2.5)}") == ("f(3, [1, 2])", {"a": (1, 2.5)})
    assert split_test("assert f(3) > 2") is None and split_test("x = 1") is None
    # Other shapes run as asserts inside the sandbox.
    assert check_solutions([(CORRECT, ["assert triple_plus_one(1) > 3"])]) == [None]
    assert check_solutions([(CORRECT, ["assert triple_plus_one(1) > 4"])])[0].startswith("AssertionError")
