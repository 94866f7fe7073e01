"""Where model-written code runs: a process of its own, isolated by the OS, in layers.

1. **uid**: it runs as a uid of its own (random, from a range no user has), not as the trainer's user,
   so rlimits (processes included) and file permissions bind it, and per-uid kernel state (process
   counts, keyrings) is shared with no other sample.
2. **namespaces and a root of its own** (`unshare`, then a small launcher as the namespace's init):
   its own PID namespace (it sees and signals only its own processes, and all of them die with it),
   network namespace (only a loopback that is down), IPC and UTS namespaces, and a mount namespace in
   which it is chrooted into a minimal root: the system's libraries and the interpreter's prefix,
   read-only, their installed packages (site-packages, dist-packages) hidden; its own /proc,
   /dev/{null,zero,random,urandom}; a size-capped tmpfs as /tmp and /dev/shm, its only writable
   places. Nothing of the project, the datasets, home directories or /run's sockets is in it.
3. **seccomp and rlimits**: a BPF filter denies what no program needs and kernels expose to mischief
   (kernel keys, memfd, io_uring, namespaces, mount, ptrace, bpf, perf, sockets but unix/IP, new
   processes but threads, probing or dropping the host's page cache, though page faults and timing
   still tell a cached file from one never read); rlimits on CPU seconds, address space (one
   process, so the whole sandbox's memory but its tmpfs), file size, open files, threads, no core
   dumps; a wall-clock limit after which its namespace is killed (also when whoever started it dies).
4. **a clean interpreter**: `python -I -S` (no site-packages, no environment), a clean environment,
   no inherited descriptors but its two pipes, and an audit-hook policy (no sockets, processes,
   ctypes, signals, rlimit changes or writes outside its tmp) as one more layer, not the boundary: a
   program can reach the hook's function through the garbage collector and empty it.

The layers are detected once per process, since what a machine allows differs (root in CI and on GPU
containers: all of them). Without at least the uid and rlimit layers the sandbox refuses to run
untrusted code unless the params opt out (`sandbox.allow_weak_isolation: true`); then it says once,
on stderr, which layers are missing (with the uid layer but no namespaces, world-writable host
directories stay writable). util-linux's `unshare` and `setpriv` and the standard library do the work:
nothing to install, no daemon or setuid helper, about 30 ms per sample (bubblewrap would add a
package and, as root, nothing this does not already give).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bayes_llm.errors import UserError

# Each sandbox runs as a uid of its own from this range (no user has one: no files, no processes).
UID_BASE, UID_SPAN = 1_500_000_000, 500_000_000
NAMESPACES = ("--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net", "--ipc", "--uts")


class SandboxUnavailable(UserError):
    """The machine cannot isolate untrusted code well enough and the params did not opt out."""


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    processes: int = 32  # per uid: binds only when the sandbox has a uid of its own
    # Descriptors: each memfd or file may hold `file_bytes`, so this bounds what a program keeps off its
    # address space.
    open_files: int = 64
    tmp_bytes: int = 64 << 20


@dataclass(frozen=True)
class Isolation:
    """The layers this machine gives the sandbox, and why the missing ones are missing."""

    uid: bool = False
    namespaces: bool = False
    seccomp: bool = False
    rlimits: bool = True
    audit_hook: bool = True
    notes: tuple[str, ...] = field(default=())

    @property
    def layers(self) -> list[str]:
        names = {"uid": "unprivileged uid", "namespaces": "pid/mount/net/ipc/uts namespaces + minimal read-only root",
                 "seccomp": "seccomp filter", "rlimits": "rlimits", "audit_hook": "audit hook"}  # fmt: skip
        return [text for key, text in names.items() if getattr(self, key)]

    @property
    def sufficient(self) -> bool:
        return self.uid and self.rlimits


# Runs as root inside the new namespaces (so as their init, pid 1): builds a minimal read-only root from
# the system's libraries and the interpreter's own prefix (nothing of the project, the datasets, the home
# directories or /run's sockets), with its own /proc, a few /dev nodes and a size-capped tmpfs as /tmp,
# chroots into it, and runs the program as a child under the sandbox's uid. The program is not pid 1,
# which would ignore its own fatal signals.
_LAUNCHER = r"""
import ctypes, json, os, sys
config = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
def mount(source, target, kind, flags, data=None):
    if libc.mount(source.encode(), target.encode(), kind.encode() if kind else None, flags,
                  data.encode() if data else None):
        raise OSError(ctypes.get_errno(), "mount " + target)
mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, "size=%d,mode=755" % config["tmp_bytes"])
root = "/tmp/root"
for path in config["read_only"]:
    inside = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        os.symlink(os.readlink(path), inside)
    elif os.path.exists(path):
        if os.path.isdir(path):
            os.makedirs(inside, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            open(inside, "w").close()
        mount(path, inside, None, BIND | REC)
        mount("none", inside, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
for path in config["hidden"]:  # an empty read-only dir over each: `-S` reads none of them
    if os.path.isdir(root + path):
        mount("tmpfs", root + path, "tmpfs", RDONLY | NOSUID | NODEV, "size=4k,mode=555")
os.makedirs(root + "/dev/shm")
for node in ("null", "zero", "random", "urandom"):
    open(root + "/dev/" + node, "w").close()
    mount("/dev/" + node, root + "/dev/" + node, None, BIND)
mount("tmpfs", root + "/dev/shm", "tmpfs", NOSUID | NODEV, "size=%d,mode=1777" % config["tmp_bytes"])
os.makedirs(root + "/proc")
mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
os.makedirs(root + "/tmp")
os.chmod(root + "/tmp", 0o1777)
os.chroot(root)
os.chdir("/tmp")
def seccomp(arch, denied, socket_nr, clone_nr):
    # A BPF filter: the denied system calls (see _SECCOMP) fail with ENOSYS; so does `clone` but for a
    # thread (no new process: threads share the address space its rlimit bounds; glibc falls back from
    # clone3 to it), and any socket but AF_UNIX/INET/INET6 (no vsock to the VM host).
    import struct
    LD, JEQ, JGE, JSET, RET, ALLOW, DENY = 0x20, 0x15, 0x35, 0x45, 0x06, 0x7FFF0000, 0x00050000 | 38
    program = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, DENY), (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000),
               (RET, 0, 0, DENY)]
    for number in denied:
        program += [(JEQ, 0, 1, number), (RET, 0, 0, DENY)]
    CLONE_THREAD = 0x10000
    program += [(JEQ, 0, 4, clone_nr), (LD, 0, 0, 16), (JSET, 1, 0, CLONE_THREAD), (RET, 0, 0, DENY),
                (RET, 0, 0, ALLOW)]
    program += [(JEQ, 1, 0, socket_nr), (RET, 0, 0, ALLOW), (LD, 0, 0, 16), (JEQ, 3, 0, 1), (JEQ, 2, 0, 2),
                (JEQ, 1, 0, 10), (RET, 0, 0, DENY), (RET, 0, 0, ALLOW)]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Program(len(program), ctypes.addressof(filters))
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp")
uid = config["uid"]
pid = os.fork()
if pid == 0:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if config["seccomp"]:
        seccomp(*config["seccomp"])
    os.execv(config["argv"][0], config["argv"])
while True:
    try:
        done, status = os.wait()
    except ChildProcessError:
        break
    if done == pid:
        code = os.waitstatus_to_exitcode(status)
        break
os._exit(code if code >= 0 else 128 - code)
"""


def _read_only_paths() -> list[str]:
    """What the sandbox's root holds: the system's programs and libraries, the dynamic linker's cache and
    the interpreter's own prefix (its stdlib; with `-S` no site-packages)."""
    return ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
            os.path.realpath(sys.base_prefix)]  # fmt: skip


@functools.cache  # the same for the whole process: not globbed again at every sample's start
def _hidden_paths() -> list[str]:
    """Installed packages inside those paths, hidden: the interpreter runs with `-S`, and what a user
    installed next to it (a benchmark's data with its reference solutions, say) is no program's business."""
    prefix = os.path.realpath(sys.base_prefix)
    patterns = (f"{prefix}/lib/python3*/site-packages", "/usr/lib/python3*/dist-packages",
                "/usr/local/lib/python3*/dist-packages", "/usr/local/lib/python3*/site-packages")  # fmt: skip
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


# Per architecture: the audit arch, the denied system calls, `socket`'s number (filtered by family) and
# `clone`'s (threads only). Denied: add_key request_key keyctl memfd_create io_uring_* unshare setns mount
# umount2 ptrace bpf perf userfaultfd; fork vfork clone3 (no new processes: each would get an address
# space of its own); and what tells a program which files the host has cached or drops them from the
# cache (fadvise64 readahead preadv2 pwritev2 mincore cachestat, native AIO: io_setup io_destroy
# io_submit io_getevents io_pgetevents io_cancel), which samples sharing the read-only /usr could pass
# notes through (RWF_NOWAIT reads fail on an uncached page). Still open: a mapped file's major page
# faults (getrusage) and read timing tell a cached file from one no sample read yet.
_SECCOMP = {
    "x86_64": (0xC000003E, [248, 249, 250, 319, 425, 426, 427, 272, 308, 165, 166, 101, 321, 298, 323,
                            57, 58, 435, 221, 187, 327, 328, 27, 451, 206, 207, 209, 208, 333, 210], 41, 56),
    "aarch64": (0xC00000B7, [217, 218, 219, 279, 425, 426, 427, 97, 268, 40, 39, 117, 280, 241, 282,
                             435, 223, 213, 286, 287, 232, 451, 0, 1, 2, 4, 292, 3], 198, 220),
}  # fmt: skip


def _sandbox_uid() -> int:
    """A uid of its own per sandbox: per-uid limits (processes) and kernel state (keyrings) are not shared
    with any other sandbox, so a program can neither starve nor talk to its neighbours through them."""
    return UID_BASE + secrets.randbelow(UID_SPAN)


def _wrap(program: list[str], uid: bool, namespaces: bool, limits: Limits) -> list[str]:
    """The command that runs `program` inside the given layers (rlimits are set by `_preexec`)."""
    if namespaces:
        config = {"tmp_bytes": limits.tmp_bytes, "read_only": _read_only_paths(), "hidden": _hidden_paths(),
                  "argv": program,
                  "uid": _sandbox_uid() if uid else os.getuid(),
                  "seccomp": _SECCOMP.get(os.uname().machine)}  # fmt: skip
        launcher = python("-c", _LAUNCHER, json.dumps(config))
        return ["unshare", *NAMESPACES, "--", *launcher]
    if uid:
        sandbox_uid = _sandbox_uid()
        program = ["setpriv", f"--reuid={sandbox_uid}", f"--regid={sandbox_uid}", "--clear-groups",
                   "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", *program]  # fmt: skip
    return program


_PROBE = (
    "import os, socket\n"
    "s = socket.socket(); s.settimeout(1)\n"
    "try:\n    s.connect(('127.0.0.1', 9)); net = 'open'\n"
    "except OSError as e:\n    net = 'closed' if e.errno in (101, 99) else 'open'\n"
    "hidden = not any(os.path.exists(p) for p in ('/run', '/home', CALLER_DIR))\n"
    "try:\n    os.memfd_create('probe'); filtered = False\nexcept OSError:\n    filtered = True\n"
    "print(os.getuid(), os.getppid(), net, sorted(os.listdir('/tmp')) == [] and hidden, filtered, flush=True)\n"
)


def _probe(uid: bool, namespaces: bool) -> str | None:
    """None when a probe inside those layers shows them holding; else what went wrong."""
    try:
        probe = f"CALLER_DIR = {os.getcwd()!r}\n" + _PROBE
        done = subprocess.run(_wrap(python("-c", probe), uid, namespaces, Limits()),
                              capture_output=True, text=True, timeout=30, env=_clean_env(), cwd="/")  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"
    words = done.stdout.split()
    if done.returncode or len(words) != 5:
        return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    ok_uid = not uid or int(words[0]) >= UID_BASE
    # In its own PID namespace its parent is the namespace's init (pid 1); its /tmp is empty and the
    # caller's directory (the project), /home and /run are not in its root.
    ok_ns = not namespaces or (words[1] == "1" and words[2] == "closed" and words[3] == "True"
                               and (words[4] == "True" or os.uname().machine not in _SECCOMP))  # fmt: skip
    return None if ok_uid and ok_ns else f"probe saw uid {words[0]}, parent pid {words[1]}, network {words[2]}"


@functools.cache
def detect() -> Isolation:
    """What this machine allows, checked by running a probe in each layer (once per process)."""
    notes = []
    tools = all(shutil.which(tool) for tool in ("unshare", "setpriv"))
    if not tools:
        notes.append("util-linux's unshare/setpriv not found")
    root = os.geteuid() == 0
    if not root:
        notes.append("not root: cannot switch to a uid of the sandbox's own")
    uid = tools and root and (error := _probe(True, False)) is None
    if tools and root and not uid:
        notes.append(f"uid switch failed: {error}")
    namespaces = tools and root and (error := _probe(uid, True)) is None
    if tools and root and not namespaces:
        notes.append(f"namespaces unavailable: {error}")
    seccomp = namespaces and os.uname().machine in _SECCOMP
    if namespaces and not seccomp:
        notes.append(f"no seccomp filter for {os.uname().machine}")
    return Isolation(uid=uid, namespaces=namespaces, seccomp=seccomp, notes=tuple(notes))


_settings = {"allow_weak_isolation": False}
_warned: set[str] = set()


def configure(allow_weak_isolation: bool) -> None:
    """From params `sandbox.allow_weak_isolation`: run untrusted code even without uid + rlimits."""
    _settings["allow_weak_isolation"] = allow_weak_isolation


def require() -> Isolation:
    """The layers to use; refuses (or, when opted out, warns once) when they are not enough."""
    isolation = detect()
    missing = "; ".join(isolation.notes)
    if not isolation.sufficient and not _settings["allow_weak_isolation"]:
        raise SandboxUnavailable(
            f"refusing to run model-written code: this machine gives the sandbox only {isolation.layers} ({missing}). "
            "Run as root (CI, containers), or set `sandbox.allow_weak_isolation: true` in params.yaml to run it "
            "with these layers only."
        )
    if missing and missing not in _warned:
        _warned.add(missing)
        print(f"sandbox: layers active: {', '.join(isolation.layers)}; missing: {missing}", file=sys.stderr)
    return isolation


def _clean_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _preexec(limits: Limits) -> None:
    # In the child between fork and exec, still as the caller's uid: rlimits survive the uid switch. If
    # whoever started the sandbox dies (a replay killed at its budget), the sandbox dies with it.
    _libc().prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    for limit, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                         (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NPROC, limits.processes),
                         (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)):  # fmt: skip
        resource.setrlimit(limit, (value, value))


@contextlib.contextmanager
def started(
    program: list[str], limits: Limits, isolation: Isolation | None = None, **popen
) -> Iterator[subprocess.Popen]:
    """`program` running in the sandbox's layers, killed with everything it started on leaving.

    With namespaces its working directory is its private /tmp; without, a fresh temporary directory.
    `isolation`: the layers to use, as `require()` gave them (in a process that asked already)."""
    isolation = isolation or require()
    command = _wrap(program, isolation.uid, isolation.namespaces, limits)
    _libc()  # loaded before the fork: `_preexec` runs between fork and exec
    # A working directory on the host only without namespaces: with them it is the private /tmp, and a
    # temporary directory per sample would be work for nothing.
    if isolation.namespaces:
        workdir = contextlib.nullcontext("/")
    else:
        workdir = tempfile.TemporaryDirectory(prefix="bayes-llm-sandbox-")
    with workdir as cwd:
        if isolation.uid and not isolation.namespaces:
            os.chmod(cwd, 0o777)  # writable by the sandbox's uid: its only writable place
        process = subprocess.Popen(command, env=_clean_env(), cwd=cwd,
                                   close_fds=True, start_new_session=True,
                                   preexec_fn=functools.partial(_preexec, limits), **popen)  # fmt: skip
        try:
            yield process
        finally:
            kill(process)


def kill(process: subprocess.Popen) -> None:
    """The sandbox and everything in it: killing `unshare` kills its namespace's init, and so all of it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# The base interpreter, not a virtual environment's link to it: the sandbox's root holds its prefix only.
INTERPRETER = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def python(*args: str) -> list[str]:
    """A clean interpreter: isolated mode, no site-packages, no bytecode files."""
    return [INTERPRETER, "-I", "-S", "-B", *args]


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


def run_python(source: str, limits: Limits = Limits()) -> RunResult:
    """Run `source` in the sandbox and return what it printed (capped); never raises for what it runs."""
    with tempfile.TemporaryDirectory(prefix="bayes-llm-run-") as scratch:
        out_path, err_path = Path(scratch, "stdout"), Path(scratch, "stderr")
        started_at = time.monotonic()
        with (
            out_path.open("wb") as out,
            err_path.open("wb") as err,
            started(python("-c", AUDIT_POLICY + source), limits, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=err) as process,  # fmt: skip
        ):
            try:
                process.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
        read = lambda path: path.read_bytes()[: limits.file_bytes].decode("utf-8", "replace")  # noqa: E731
        return RunResult(process.returncode, read(out_path), read(err_path), timed_out, time.monotonic() - started_at)


# A layer, not the boundary: an audit hook (hooks cannot be removed) that refuses what model-written code
# never needs. Prepended to what runs in the sandbox.
AUDIT_POLICY = r"""
import os as _os, sys as _sys
_root = _os.path.realpath(_os.getcwd())
def _policy(event, args, _deny=frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.sendto", "resource.setrlimit", "resource.prlimit", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        "ctypes.call_function", "os.chroot", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
        "os.system", "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.setuid", "os.setgid"}),
        _modules=frozenset({"_ctypes", "ctypes", "_posixsubprocess"}), _realpath=_os.path.realpath,
        _fspath=_os.fspath, _root=_root, _str=str, _bytes=bytes, _int=int, _isinstance=isinstance,
        _error=PermissionError):
    if event in _deny:
        raise _error("sandbox: " + event + " is not allowed")
    if event == "import" and args[0] in _modules:
        raise _error("sandbox: importing " + args[0] + " is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writing = (_isinstance(mode, _str) and any(c in mode for c in "wax+")) or (
            _isinstance(flags, _int) and flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_APPEND | _os.O_CREAT))
        if writing and not _isinstance(path, _int):
            try:
                full = _realpath(_fspath(path) if not _isinstance(path, _bytes) else path.decode())
            except Exception:
                full = ""
            if not (full == _root or full.startswith(_root + "/") or full == "/dev/null"):
                raise _error("sandbox: writing outside its working directory")
_sys.addaudithook(_policy)
del _policy, _root
"""
