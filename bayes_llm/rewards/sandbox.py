"""Where model-written code runs: a process of its own, isolated by the OS, in layers.

1. **uid**: it runs as a uid of its own (random, from a range no user has), not as the trainer's user,
   so rlimits (processes included) and file permissions bind it, and per-uid kernel state (process
   counts, keyrings) is shared with no other sample.
2. **namespaces and a root of its own** (`unshare`, then a small launcher as the namespaces' init,
   one per thread that runs samples, which builds the root once and starts each sample in it): its
   own PID namespace (it sees and signals only its own processes, and all of them die with it),
   network namespace (only a loopback that is down), mount, IPC and UTS namespaces, and a chroot into
   a minimal root: the system's libraries and the interpreter's prefix, read-only, their
   installed packages (site-packages, dist-packages) hidden; its own /proc,
   /dev/{null,zero,random,urandom}; a fresh size-capped tmpfs as /tmp and /dev/shm, its only writable
   places. Nothing of the project, the datasets, home directories or /run's sockets is in it.
3. **seccomp and rlimits**: a BPF filter denies what no program needs and kernels expose to mischief
   (kernel keys, memfd, io_uring, namespaces, mount, ptrace, bpf, perf, sockets but unix/IP, new
   processes but threads, probing or dropping the host's page cache, though page faults and timing
   still tell a cached file from one never read); rlimits on CPU seconds, address space (one
   process, so the whole sandbox's memory but its tmpfs), file size, open files, threads, no core
   dumps; a wall-clock limit after which its namespace is killed (also when whoever started it dies).
4. **a clean interpreter**: `python -I -S` (no site-packages, no environment), a clean environment,
   no inherited descriptors but its three (stdin, stdout, stderr), and an audit-hook policy (no sockets, processes,
   ctypes, signals, rlimit changes or writes outside its tmp) as one more layer, not the boundary: a
   program can reach the hook's function through the garbage collector and empty it.

The layers are detected once per process, since what a machine allows differs (root in CI and on GPU
containers: all of them). Without at least the uid and rlimit layers the sandbox refuses to run
untrusted code unless the params opt out (`sandbox.allow_weak_isolation: true`); then it says once,
on stderr, which layers are missing (with the uid layer but no namespaces, world-writable host
directories stay writable). util-linux's `unshare` and `setpriv` and the standard library do the work:
nothing to install, no daemon or setuid helper (bubblewrap would add a package and, as root, nothing
this does not already give). Starting a sample costs about 7 ms past its own interpreter's start
(`python -m benchmarks.sandbox_security` measures whole items).
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
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bayes_llm.errors import UserError

# Each sandbox runs as a uid of its own from this range (no user has one: no files, no processes).
UID_BASE, UID_SPAN = 1_500_000_000, 500_000_000
NAMESPACES = ("--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--uts")


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


# Runs as root inside the new namespaces (so as their init, pid 1), one per thread that runs samples (a
# replay process has one for its chunk of items): builds a minimal read-only root from the system's
# libraries and the interpreter's own prefix (nothing of the project, the datasets, the home directories
# or /run's sockets), chroots into it, then starts each sample it is sent over its control socket (its
# stdin; the sample's three descriptors come with the request), one at a time. Each sample gets
# namespaces of its own below these (mount, PID, network, IPC, UTS), a fresh size-capped tmpfs as /tmp
# and /dev/shm, its own /proc, and an init of its own (pid 1, which dies with its parent and takes the
# namespace with it), and runs as that init's child under its own uid: the program is not pid 1, which
# would ignore its own fatal signals. Building the root once is what makes a sample cheap: `unshare`, a
# launcher's interpreter and the mounts cost about 45 ms of an item's 80 when each sample had its own.
_LAUNCHER = r"""
import ctypes, json, os, resource, select, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
NEWNS, NEWUTS, NEWIPC, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
def mount(source, target, kind, flags, data=None):
    if libc.mount(source.encode(), target.encode(), kind.encode() if kind else None, flags,
                  data.encode() if data else None):
        raise OSError(ctypes.get_errno(), "mount " + target)
def build_root(config):
    mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
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
    os.makedirs(root + "/proc")  # each sample's init mounts its own
    os.makedirs(root + "/tmp")
    os.chroot(root)
    os.chdir("/")
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
def exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
def tell(report, error):  # why a sample could not start or run its program, for the launcher to pass on
    os.write(report, ("error: %s\n" % error).encode())
def program(request, fds, report):  # the sample's process: its descriptors, limits and uid, then its program
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, report)  # `report` stays until the exec (close-on-exec): a failure before it goes there
    os.closerange(report + 1, 1 << 16)
    for limit, value in request["rlimits"]:
        resource.setrlimit(limit, (value, value))
    uid = request["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if request["seccomp"]:
        seccomp(*request["seccomp"])
    os.chdir("/tmp")
    os.execv(request["argv"][0], request["argv"])
def sample(request, fds, report, life):  # its namespaces; its init reports its pid, starts it, waits for it
    if libc.unshare(NEWNS | NEWPID | NEWIPC | NEWUTS | NEWNET):
        raise OSError(ctypes.get_errno(), "unshare")
    for path in ("/tmp", "/dev/shm"):
        mount("tmpfs", path, "tmpfs", NOSUID | NODEV, "size=%d,mode=1777" % request["tmp_bytes"])
    init = os.fork()
    if init == 0:
        try:
            os.close(life)  # the runner's alone
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: dies with its parent
            mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
            child = os.fork()
            if child == 0:
                try:
                    program(request, fds, report)
                except BaseException as error:
                    tell(report, error)
                finally:
                    os._exit(127)
            for fd in (report, *fds):
                os.close(fd)
            while True:
                done, status = os.wait()
                if done == child:
                    os._exit(exit_code(status))
        except BaseException as error:
            tell(report, error)
        finally:
            os._exit(127)
    os.write(report, b"%d\n" % init)
    for fd in (report, *fds):
        os.close(fd)
    os._exit(exit_code(os.waitpid(init, 0)[1]))
def read_report(fd, until_eof):  # the runner's, init's and program's words: init's pid, or why it failed
    data = b""
    while until_eof or not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").splitlines()
def why(words):
    return "; ".join(word[len("error: "):] for word in words if word.startswith("error: "))
def readable(fds):  # poll, not select: no limit on descriptor numbers
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll()}
def serve(control):
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1 << 18, 3)
        if not message:
            return  # the caller is done
        request = json.loads(message)
        read_end, report = os.pipe()
        life_end, life = os.pipe()  # held by the runner alone: its end of file is the runner's exit
        runner = os.fork()
        if runner == 0:
            try:
                control.close()
                os.close(read_end)
                os.close(life_end)
                sample(request, fds, report, life)
            except BaseException as error:
                tell(report, error)
            finally:
                os._exit(127)
        for fd in (report, life, *fds):
            os.close(fd)
        words = read_report(read_end, False)
        init = next((int(word) for word in words if word.isdigit()), 0)
        control.send(json.dumps({"started": bool(init) and not why(words), "why": why(words)}).encode())
        # Then: its exit, told unasked, and the caller's end message; or the end message first (the
        # caller is done with it, or its time is up), which kills it. Each sample ends with one exit message.
        killed = life_end not in readable([control, life_end])
        if killed and init:
            try:
                os.kill(init, signal.SIGKILL)  # its init: the kernel kills the rest of its namespace
            except ProcessLookupError:
                pass
        os.close(life_end)
        code = exit_code(os.waitpid(runner, 0)[1])
        while True:  # orphans reparented to this init, if any
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        failed = why(read_report(read_end, True))  # a program that could not be run
        os.close(read_end)
        if not killed:
            control.send(json.dumps({"exit": code, "why": failed}).encode())
        message, _, _, _ = socket.recv_fds(control, 1 << 18, 3)
        if message != b"end":  # the caller is gone, or out of step: a request here would be lost
            return
        if killed:
            control.send(json.dumps({"exit": code, "killed": True, "why": failed}).encode())
control = socket.socket(fileno=0)
try:
    build_root(json.loads(sys.argv[1]))
    control.send(b'{"ready": true}')
    serve(control)
except BaseException as error:  # said on the control socket: its stderr is closed once it is ready
    try:
        failure = "the sandbox's launcher failed: %s: %s" % (type(error).__name__, error)
        control.send(json.dumps({"error": failure}).encode())
    except OSError:
        pass
os._exit(0)  # as the namespaces' init: whatever is left in them dies with it
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
# notes through (RWF_NOWAIT reads fail on an uncached page); sync syncfs sync_file_range (writeback of
# the host's disks, during which not even SIGKILL ends the sample). Still open: a mapped file's major
# page faults (getrusage) and read timing tell a cached file from one no sample read yet.
_SECCOMP = {
    "x86_64": (0xC000003E, [248, 249, 250, 319, 425, 426, 427, 272, 308, 165, 166, 101, 321, 298, 323,
                            57, 58, 435, 221, 187, 327, 328, 27, 451, 206, 207, 209, 208, 333, 210,
                            162, 306, 277], 41, 56),
    "aarch64": (0xC00000B7, [217, 218, 219, 279, 425, 426, 427, 97, 268, 40, 39, 117, 280, 241, 282,
                             435, 223, 213, 286, 287, 232, 451, 0, 1, 2, 4, 292, 3, 81, 267, 84], 198, 220),
}  # fmt: skip


def _sandbox_uid() -> int:
    """A uid of its own per sandbox: per-uid limits (processes) and kernel state (keyrings) are not shared
    with any other sandbox, so a program can neither starve nor talk to its neighbours through them."""
    return UID_BASE + secrets.randbelow(UID_SPAN)


def _wrap(program: list[str], uid: bool) -> list[str]:
    """The command that runs `program` under a uid of its own, without namespaces (rlimits are set by
    `_preexec`; with namespaces a `_Launcher` starts it)."""
    if uid:
        sandbox_uid = _sandbox_uid()
        program = ["setpriv", f"--reuid={sandbox_uid}", f"--regid={sandbox_uid}", "--clear-groups",
                   "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", *program]  # fmt: skip
    return program


def _rlimits(limits: Limits) -> list[tuple[int, int]]:
    return [(resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
            (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NPROC, limits.processes),
            (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)]  # fmt: skip


REQUEST_BYTES = 1 << 17  # a sample's request (its argv, mostly), as argv's own limit for one string was


class HostFailure(OSError):
    """The host could not start a sample or keep track of it (its launcher died or stopped answering, a
    fork or a mount was refused): no verdict on the program, whose run is unknown."""


def _readable(fd: int, timeout: float | None) -> bool:
    """`fd` has something to read (or is closed) within `timeout` seconds: poll, since select cannot
    watch a descriptor numbered 1024 or more (a trainer may have that many open)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


class _Launcher:
    """The namespaces' init (`_LAUNCHER`), kept by one thread of one process: it starts that thread's
    samples, one at a time. It dies with the thread (PR_SET_PDEATHSIG) and so do its samples. A launcher
    left with an exchange under way (by any exception, a timer's included: its next reply could belong
    to that exchange) is closed; the thread's next sample starts a new one."""

    def __init__(self) -> None:
        self.owner, self.busy = os.getpid(), False
        self.idle = True  # no exchange under way: the last sample's exit told and its end sent
        self.awaiting_exit = False  # a sample started whose exit it has not told yet
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {"read_only": _read_only_paths(), "hidden": _hidden_paths()}
        _libc()  # loaded before the fork: `_die_with_parent` runs between fork and exec
        with theirs:
            command = ["unshare", *NAMESPACES, "--", *python("-c", _LAUNCHER, json.dumps(config))]
            self.process = subprocess.Popen(command, stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            env=_clean_env(), cwd="/", close_fds=True, start_new_session=True,
                                            preexec_fn=_die_with_parent)  # fmt: skip
        with self.process.stderr:
            try:
                self.receive("ready")
            except HostFailure as failure:
                error = self.process.stderr.read().decode(errors="replace").strip().splitlines()
                raise HostFailure(f"{failure} ({error[-1] if error else f'exit {self.process.returncode}'})") from None

    @property
    def alive(self) -> bool:
        return self.control.fileno() >= 0 and self.process.poll() is None

    def send(self, message: bytes, fds: list[int] = ()) -> None:
        try:
            socket.send_fds(self.control, [message], list(fds))
        except OSError as error:
            self.close()
            raise HostFailure(f"the sandbox's launcher is gone ({error})") from None

    def receive(self, kind: str, timeout: float | None = 30) -> dict:
        """Its next reply, which must be a `kind` one."""
        try:
            if not _readable(self.control.fileno(), timeout):
                raise HostFailure("the sandbox's launcher did not answer")
            message = self.control.recv(1 << 16)
            if not message:
                raise HostFailure("the sandbox's launcher exited")
            reply = json.loads(message)
            if "error" in reply:
                raise HostFailure(reply["error"])
            if kind not in reply:
                raise HostFailure(f"the sandbox's launcher answered {reply} for {kind!r}")
            self.awaiting_exit = kind == "started"  # (set with the read: an exception after it loses nothing)
        except HostFailure:
            self.close()
            raise
        except (OSError, ValueError) as error:
            self.close()
            raise HostFailure(f"the sandbox's launcher is gone ({error})") from None
        return reply

    def close(self) -> None:
        self.control.close()
        _kill(self.process)


class Sample:
    """A program running in its namespaces, started by a `_Launcher`: the part of `Popen` used here."""

    def __init__(self, launcher: _Launcher, stdin, stdout, stderr) -> None:
        self.launcher, self.stdin, self.stdout, self.stderr = launcher, stdin, stdout, stderr
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self.launcher.alive or not self.launcher.awaiting_exit:  # (its exit read, then lost)
                raise HostFailure("the sandbox's launcher stopped while a sample ran")
            if not _readable(self.launcher.control.fileno(), timeout):
                raise subprocess.TimeoutExpired("sandbox", timeout)
            self._exited(self.launcher.receive("exit"))
        return self.returncode

    def end(self) -> None:
        """Killed if still running (with everything it started); the launcher is free again. A launcher
        that died meanwhile is a `HostFailure`: what the sample seemed to do (exit, say nothing) is no
        verdict on it then."""
        if not self.launcher.alive:
            raise HostFailure("the sandbox's launcher stopped while a sample ran")
        self.launcher.send(b"end")
        if self.launcher.awaiting_exit:
            self._exited(self.launcher.receive("exit"))
        self.launcher.idle = True

    def _exited(self, reply: dict) -> None:
        self.returncode = -signal.SIGKILL if reply.get("killed") else reply["exit"]
        if reply.get("why"):  # its program never ran: the host failed it (a uid switch refused, say)
            raise HostFailure(f"a sample could not run its program: {reply['why']}")


_launchers = threading.local()


@contextlib.contextmanager
def _launcher() -> Iterator[_Launcher]:
    """This thread's launcher, started at its first sample (a forked process starts its own); one of
    its own for a sample started while another runs (nested), closed after it."""
    launcher = getattr(_launchers, "launcher", None)
    if launcher is None or launcher.owner != os.getpid() or not launcher.alive:
        launcher = _launchers.launcher = _Launcher()
    if launcher.busy:
        launcher = _Launcher()
        try:
            yield launcher
        finally:
            launcher.close()
        return
    launcher.busy = True
    try:
        yield launcher
    finally:
        launcher.busy = False
        if launcher.alive and not launcher.idle:  # left mid-exchange: a reply may be on its way, unread
            launcher.close()


def _close_launcher() -> None:
    """This thread's launcher, if any, closed (the probe's: the process that probed may run no sample)."""
    launcher = getattr(_launchers, "launcher", None)
    if launcher is not None and launcher.owner == os.getpid() and launcher.alive:
        launcher.close()
    _launchers.launcher = None


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
        done = _run(python("-c", probe), Limits(wall_seconds=30), Isolation(uid=uid, namespaces=namespaces))
    except (OSError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        _close_launcher()
    words = done.stdout.split()
    if not done.ok or len(words) != 5:
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


def _kill(process: subprocess.Popen) -> None:
    """`process` and everything it started (its session): killing `unshare` kills its namespaces' init,
    and so all of them."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _die_with_parent() -> None:
    # If whoever started the sandbox dies (a replay killed at its budget), the sandbox dies with it.
    _libc().prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _preexec(limits: Limits) -> None:
    # In the child between fork and exec, still as the caller's uid: rlimits survive the uid switch.
    _die_with_parent()
    for limit, value in _rlimits(limits):
        resource.setrlimit(limit, (value, value))


@contextlib.contextmanager
def started(program: list[str], limits: Limits, isolation: Isolation | None = None, *, stdin=None, stdout=None,
            stderr=None) -> Iterator[subprocess.Popen | Sample]:  # fmt: skip
    """`program` running in the sandbox's layers, killed with everything it started on leaving.
    stdin/stdout/stderr as for `Popen` (None, PIPE, DEVNULL, a file or a descriptor).

    With namespaces its working directory is its private /tmp; without, a fresh temporary directory.
    `isolation`: the layers to use, as `require()` gave them (in a process that asked already)."""
    isolation = isolation or require()
    if isolation.namespaces:
        with _in_namespaces(program, limits, isolation.uid, (stdin, stdout, stderr)) as sample:
            yield sample
        return
    _libc()  # loaded before the fork: `_preexec` runs between fork and exec
    with tempfile.TemporaryDirectory(prefix="bayes-llm-sandbox-") as cwd:
        if isolation.uid:
            os.chmod(cwd, 0o777)  # writable by the sandbox's uid: its only writable place
        try:
            process = subprocess.Popen(_wrap(program, isolation.uid), env=_clean_env(), cwd=cwd, close_fds=True,
                                       start_new_session=True, preexec_fn=functools.partial(_preexec, limits),
                                       stdin=stdin, stdout=stdout, stderr=stderr)  # fmt: skip
        except OSError as error:
            raise HostFailure(f"could not start a sample: {error}") from None
        try:
            yield process
        finally:
            _kill(process)


@contextlib.contextmanager
def _in_namespaces(program: list[str], limits: Limits, uid: bool, streams: tuple) -> Iterator[Sample]:
    request = json.dumps({"argv": program, "uid": _sandbox_uid() if uid else os.getuid(),
                          "rlimits": _rlimits(limits), "tmp_bytes": limits.tmp_bytes,
                          "seccomp": _SECCOMP.get(os.uname().machine)}).encode()  # fmt: skip
    if len(request) > REQUEST_BYTES:
        raise ValueError(f"a sandboxed program's command line must be under {REQUEST_BYTES} bytes (JSON-escaped): "
                         f"this one has {len(request)}")  # fmt: skip
    mine: list = [None, None, None]  # our ends of its pipes
    theirs, opened = [], []  # its descriptors 0-2; those opened here for it, closed once it has them
    with _launcher() as launcher:
        try:
            try:
                for index, stream in enumerate(streams):
                    if stream == subprocess.PIPE:
                        read, write = os.pipe()
                        mine[index] = os.fdopen(write, "wb") if index == 0 else os.fdopen(read, "rb")
                        opened.append(read if index == 0 else write)
                    elif stream == subprocess.DEVNULL:
                        opened.append(os.open(os.devnull, os.O_RDWR))
                    theirs.append(opened[-1] if stream in (subprocess.PIPE, subprocess.DEVNULL)
                                  else index if stream is None  # the caller's own
                                  else stream if isinstance(stream, int) else stream.fileno())  # fmt: skip
                launcher.idle = False
                launcher.send(request, theirs)
                reply = launcher.receive("started")
            except HostFailure:
                raise
            except OSError as error:  # pipes or descriptors
                raise HostFailure(f"could not give a sample its descriptors: {error}") from None
            finally:
                for fd in opened:
                    os.close(fd)
            if not reply["started"]:  # (the launcher, mid-exchange, is closed on the way out)
                raise HostFailure(f"a sample could not start: {reply.get('why') or 'no reason given'}")
            sample = Sample(launcher, *mine)
            try:
                yield sample
            finally:
                sample.end()
        finally:
            for stream in mine:
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


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
    return _run(python("-c", AUDIT_POLICY + source), limits, require())


def _run(program: list[str], limits: Limits, isolation: Isolation) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="bayes-llm-run-") as scratch:
        out_path, err_path = Path(scratch, "stdout"), Path(scratch, "stderr")
        started_at = time.monotonic()
        with (
            out_path.open("wb") as out,
            err_path.open("wb") as err,
            started(program, limits, isolation, stdin=subprocess.DEVNULL, stdout=out, stderr=err) as process,
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
