"""Run untrusted Python in a separate, limited process.

Layers, each of which holds on its own:
- a fresh temporary directory as working directory and a clean environment (no inherited secrets);
- rlimits: CPU seconds, address space, file size (so a 100 MB print is cut at the output cap),
  processes, no core dumps; a wall-clock timeout after which the whole process group is killed;
- no network: a new, empty network namespace where the kernel allows one (root, or unprivileged
  user namespaces);
- a trusted launcher installs a `sys.addaudithook` policy (hooks cannot be removed) before the code
  runs: no sockets, no new processes, no signals to other processes, no ctypes, no rlimit changes,
  and no writing, deleting or renaming anything outside the working directory.

The audit policy is what stops a fork bomb and the parent's murder when the trainer runs as root
(RLIMIT_NPROC does not bind root). It is a policy of the Python runtime, not a kernel boundary:
use a container or VM for code from people, this is for code from a model.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    processes: int = 32
    # For trusted harnesses that fork a child per untrusted item (see rewards.code) and for tests.
    subprocesses: bool = False


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# Runs first in the sandboxed interpreter, then hands over to main.py.
_LAUNCHER = r"""
import os, runpy, sys
WORKDIR = os.path.realpath(os.getcwd())
ALLOW_PROCESSES = __ALLOW_PROCESSES__
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
ALWAYS = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
          "resource.setrlimit", "resource.prlimit", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
          "ctypes.call_function", "os.chroot"}
PROCESS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
           "os.kill", "os.killpg", "signal.pthread_kill"}
BLOCKED_MODULES = {"_ctypes", "ctypes"} | (set() if ALLOW_PROCESSES else {"_posixsubprocess"})
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.chmod",
               "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move"}
realpath, fspath, isinstance_, str_, bytes_, int_ = os.path.realpath, os.fspath, isinstance, str, bytes, int

def inside(path):
    if isinstance_(path, int_):
        return True  # an already open descriptor
    try:
        full = realpath(fspath(path) if not isinstance_(path, bytes_) else path.decode())
    except Exception:
        return False
    return full == WORKDIR or full.startswith(WORKDIR + "/") or full == "/dev/null"

def policy(event, args):
    if event in ALWAYS or (event in PROCESS and not ALLOW_PROCESSES):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in BLOCKED_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or (
            isinstance_(flags, int_) and flags & WRITE_FLAGS)
        if writing and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory ({path!r})")
    elif event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance_(path, (str_, bytes_)) and not inside(path):
                raise PermissionError(f"sandbox: {event} outside the working directory ({path!r})")

sys.addaudithook(policy)
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _unshare_network() -> None:
    # An empty network namespace: only a loopback that is down. Root can make one directly;
    # others need a user namespace too. Where neither works the audit policy still refuses sockets.
    unshare = _libc().unshare
    if unshare(_CLONE_NEWNET) != 0:
        unshare(_CLONE_NEWUSER | _CLONE_NEWNET)


def _clean_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _limit_child(limits: Limits) -> None:
    # Runs in the child between fork and exec.
    _unshare_network()
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_python(source: str, *, files: dict[str, str] | None = None, limits: Limits = Limits()) -> RunResult:
    """Run `source` as `main.py` in a fresh directory holding `files`; never raises for what it runs."""
    _libc()  # loaded here: the child calls unshare between fork and exec
    with tempfile.TemporaryDirectory(prefix="bayes-llm-sandbox-") as root:
        workdir = Path(root, "work")
        workdir.mkdir()
        for name, text in {**(files or {}), "main.py": source}.items():
            (workdir / name).write_text(text)
        launcher = Path(root, "launcher.py")
        launcher.write_text(_LAUNCHER.replace("__ALLOW_PROCESSES__", str(limits.subprocesses)))
        out_path, err_path = Path(root, "stdout"), Path(root, "stderr")
        started = time.monotonic()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", str(launcher)],
                cwd=workdir,
                env=_clean_env(str(workdir)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, killed as a whole
                close_fds=True,
                preexec_fn=lambda: _limit_child(limits),
            )
            timed_out = False
            try:
                returncode = process.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process.pid)
                returncode = process.wait()
            _kill_group(process.pid)  # children it left behind
        seconds = time.monotonic() - started
        read = lambda path: path.read_bytes()[: limits.output_bytes].decode("utf-8", "replace")  # noqa: E731
        return RunResult(returncode, read(out_path), read(err_path), timed_out, seconds)
