"""Run untrusted Python in a separate, limited process.

Each run gets a fresh temporary directory as its working directory, a clean environment (no
inherited secrets), CPU/memory/file-size/process limits, a wall-clock timeout after which the
whole process group is killed, and a cap on the output it may produce (enforced by the file-size
limit on the files its stdout/stderr go to, so a 100 MB print costs nothing).
"""

from __future__ import annotations

import contextlib
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


def _clean_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _limit_child(limits: Limits) -> None:
    # Runs in the child between fork and exec.
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
    with tempfile.TemporaryDirectory(prefix="bayes-llm-sandbox-") as root:
        workdir = Path(root, "work")
        workdir.mkdir()
        for name, text in {**(files or {}), "main.py": source}.items():
            (workdir / name).write_text(text)
        out_path, err_path = Path(root, "stdout"), Path(root, "stderr")
        started = time.monotonic()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", "main.py"],
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
