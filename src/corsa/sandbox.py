"""Running model-written code: every place that runs a generated program goes through `run` (issue 30).

    outcome = run(program + "\\n" + tests, Limits(wall_s=5))
    outcome.status  # "passed", "failed", "timeout", "memory", "killed", "refused" or "error"

    python -m corsa.sandbox FILE.py --wall-s 5   # one JSON line: the same Outcome, for checking from outside

Linux only. Each program runs in a fresh interpreter (`sys.executable -I`, isolated mode), in a new session, with
a new empty temporary folder as its working directory and home (removed afterwards), and an environment that
holds nothing of the caller's. A supervisor enters the namespaces, forks the program (from the namespace's first
process, when there is one) and reports on a pipe to the caller how it ended: its exit status and CPU time. After
the program ends, or when the wall clock runs out, the caller kills the whole process group, so no stray child
outlives the run.

What holds, and what enforces it:

- Always, by the kernel: resource limits set in the program's process before any of its code runs
  (RLIMIT_CPU, RLIMIT_AS for memory, RLIMIT_FSIZE, RLIMIT_CORE 0) and the wall clock.
- Where the kernel lets an unprivileged process create namespaces (it does on the machine this was written
  on, see `Outcome.network`): a new user, network and process-id namespace. The program has no network
  interface but a loopback that is down; it cannot see or signal any process outside the sandbox; when it
  ends, the kernel kills every process it left. RLIMIT_NPROC is then counted per sandbox. Linux exempts the
  root user from RLIMIT_NPROC, so a caller running as root gets only the in-process budget below.
- Always, inside the program's interpreter (`Policy`, an audit hook installed before the program starts, which
  the program cannot remove): reading outside the sandbox folder and the Python installation, writing or
  deleting outside the folder, running other programs, sockets other than local pairs, name lookups, ctypes,
  signals to processes outside its own group (its supervisor included), raising its limits, and more than
  `processes` forks in all. A refused operation raises PermissionError in the program; if that ends the
  program, its status is "refused" (a program that catches the error goes on as it likes).

The in-process checks are defense in depth, not a security boundary on their own. They see only what Python
announces: C code that calls the C library itself (an extension module that opens files, for instance) passes
them, and a file swapped for a symbolic link between the check and the open can too. No mount namespace is
used: the interpreter may live in the user's home (pyenv does), so the file system cannot be hidden from the
program, and a caller running as root runs the program as root. Without namespaces, network access is refused
only by the hook, and a process that leaves the group by means the hook does not see survives the group kill.
Run untrusted code as an unprivileged user, or in a container, when these gaps matter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PROGRAM = "main.py"  # the program's file name in its folder, and in its tracebacks
TAIL = 2000  # characters of stdout and stderr kept in an Outcome: the end of a traceback, or the last output
# How the program's interpreter says it ended for a reason the caller cannot see from the exit status alone.
EXIT_MEMORY = 97
EXIT_REFUSED = 98
CHILD = "corsa.sandbox.child"  # the module name this file runs under inside the sandbox
# Linux's clone flags (os has them only from Python 3.12).
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000


@dataclass(frozen=True)
class Limits:
    # Seconds of CPU time for each process. A test-sized program needs well under one; ten leave room for a slow
    # but correct one. RLIMIT_CPU counts whole seconds.
    cpu_s: int = 10
    # Seconds on the clock for the whole run: a program that sleeps or waits on a lock uses no CPU time, and only
    # the clock ends it. Twice the CPU time, so a busy program meets its CPU limit first.
    wall_s: float = 20.0
    # Address space of each process, not resident memory: the interpreter with numpy imported maps about 100 MB
    # before it allocates anything.
    memory_mb: int = 1024
    # Processes at once, the program's own included; threads count too where the kernel enforces it (so a
    # ThreadPoolExecutor's default of up to 32 workers fits). Forks in all, where only the in-process budget can
    # (no namespaces, or a caller running as root). A small pool of workers fits; a fork bomb stops here.
    processes: int = 64
    # The largest file the program may write; its stdout and stderr count as files.
    file_size_mb: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.cpu_s, int):
            raise TypeError(f"sandbox limit cpu_s must be whole seconds (an int), not {self.cpu_s!r}")
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"sandbox limit {field.name} must be positive, not {getattr(self, field.name)}")
        if self.processes > 4096:  # the fork budget is one byte per fork in a pipe, which holds at least a page
            raise ValueError(f"sandbox limit processes must be at most 4096, not {self.processes}")


DEFAULT = Limits()


@dataclass(frozen=True)
class Outcome:
    status: str  # passed, failed, timeout, memory, killed, refused, or error (the sandbox itself failed)
    returncode: int | None  # the program's exit code, negative for a signal; None when the clock stopped it
    wall_s: float
    cpu_s: float | None  # the program's CPU time (and its children's it waited for); None when the clock stopped it
    stdout: str  # the last TAIL characters
    stderr: str
    network: str  # "namespace" (no interfaces) or "audit-hook" (sockets refused in the interpreter only)


def run(source: str, limits: Limits = DEFAULT) -> Outcome:
    """Run `source` as a Python program in the sandbox, and say how it ended. Raises OSError only when the
    interpreter cannot be started at all; whatever the program does is in the Outcome."""
    folder = Path(tempfile.mkdtemp(prefix="corsa-sandbox-")).resolve()
    try:
        (folder / PROGRAM).write_text(source, encoding="utf-8")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            report, report_w = os.pipe()
            config = {"report": report_w, "limits": dataclasses.asdict(limits)}
            boot = f"import runpy, sys; runpy.run_path(sys.argv[1], run_name={CHILD!r})"
            start = time.monotonic()
            try:
                try:
                    # No preexec_fn: it is not safe in a threaded caller (a training loop); the sandboxed
                    # interpreter sets its limits itself, before the program's first line.
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-c", boot, str(Path(__file__).resolve()), json.dumps(config)],
                        cwd=folder, env=environment(folder), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                        pass_fds=(report_w,), start_new_session=True)
                finally:
                    os.close(report_w)
                try:
                    timed_out = not exited(proc.pid, limits.wall_s)
                finally:  # also when the caller is interrupted: nothing of the program may outlive the call
                    # Kill the group before reaping its leader: while the leader is a zombie its group id cannot
                    # be reused, so this reaches the sandbox's processes and nobody else's.
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                wall = time.monotonic() - start
                said = read_report(report)
            finally:
                os.close(report)
            status = said.get("status")
            code = None if timed_out or status is None else os.waitstatus_to_exitcode(status)
            cpu = None if code is None else said.get("cpu_s")
            return Outcome(status=classify(code, cpu, limits, timed_out), returncode=code, wall_s=round(wall, 3),
                           cpu_s=None if cpu is None else round(cpu, 3), stdout=tail(out), stderr=tail(err),
                           network="namespace" if said.get("namespaces") else "audit-hook")
    finally:
        remove(folder)


def run_tests(program: str, tests: str, limits: Limits = DEFAULT) -> Outcome:
    """Run a program followed by its tests (plain asserts, or any code that raises on failure)."""
    return run(program + "\n\n" + tests + "\n", limits)


def running() -> set[int]:
    """The ids of processes on this machine still running sandboxed code: each carries CHILD on its command line
    (forks inherit it), so a caller can check that nothing outlived its programs."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if CHILD.encode() in f.read():
                        pids.add(int(entry))
            except OSError:  # ended while we looked
                pass
    return pids


def environment(folder: Path) -> dict[str, str]:
    """All the environment the program gets: nothing of the caller's (no tokens, no proxies, no paths)."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(folder), "TMPDIR": str(folder), "LANG": "C.UTF-8",
            # One thread per numerical library: threads count against the process limit, and a test needs none.
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def exited(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for process `pid` to end (it stays unreaped); False when it is still running."""
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def read_report(fd: int) -> dict[str, Any]:
    """What the supervisor wrote: one JSON object a line, merged; lines cut short by a kill are dropped."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    said: dict[str, Any] = {}
    for line in data.splitlines():
        try:
            said.update(json.loads(line))
        except ValueError:
            pass
    return said


def classify(code: int | None, cpu: float | None, limits: Limits, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if code is None:  # the supervisor ended without a report: its own traceback is in stderr
        return "error"
    if code == 0:
        return "passed"
    if code == EXIT_MEMORY:
        return "memory"
    if code == EXIT_REFUSED:
        return "refused"
    # RLIMIT_CPU's soft and hard limits are equal, so the kernel sends SIGKILL; the CPU time tells that kill from
    # any other.
    if code in (-signal.SIGKILL, -signal.SIGXCPU) and cpu is not None and cpu >= limits.cpu_s - 0.05:
        return "timeout"
    return "killed" if code < 0 else "failed"


def tail(file: IO[bytes]) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - 4 * TAIL))  # UTF-8 takes at most 4 bytes a character
    return file.read().decode("utf-8", "replace")[-TAIL:]


def remove(folder: Path) -> None:
    """Delete the sandbox's folder, also where the program took its own permissions away from its folders (or
    deleted the folder itself). Only real folders inside it are touched; links are removed, never followed."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(folder, 0o700)
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():  # a killed process may still have been finishing a write into it
        time.sleep(0.1)
        shutil.rmtree(folder, ignore_errors=True)


# Inside the sandbox: the supervisor, then the program's own process.


def supervise(config: dict[str, Any]) -> None:
    """The sandbox's first process: enter the namespaces, fork the program, report how it ended, exit."""
    report = config["report"]
    namespaces = enter_namespaces()
    os.write(report, json.dumps({"namespaces": namespaces}).encode() + b"\n")
    if namespaces and os.fork() != 0:
        # This process stays outside the new process-id namespace; its child is the namespace's first process.
        # The kernel ignores the signals a namespace's first process sends itself (a program's os.abort() would
        # not end it), so that child only supervises, and the program runs one level below.
        os.wait()
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        os.close(report)
        start_program(Limits(**config["limits"]), namespaces, supervisor=os.getppid())
    _, status, usage = os.wait4(pid, 0)
    os.write(report, json.dumps({"status": status, "cpu_s": usage.ru_utime + usage.ru_stime}).encode() + b"\n")
    os._exit(0)


def enter_namespaces() -> bool:
    """New user, network and process-id namespaces for this process's children; False where the kernel refuses
    (unprivileged user namespaces switched off, or seccomp in a container)."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID
    if hasattr(os, "unshare"):  # Python 3.12
        try:
            os.unshare(flags)
        except OSError:
            return False
    else:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(flags) != 0:
            return False
    # Keep our own user and group ids: files the program writes stay ours, and its uid reads as expected.
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return True


def start_program(limits: Limits, namespaces: bool, supervisor: int) -> None:
    """Set the limits, install the checks, run the program in a fresh __main__, and exit with its status."""
    mb = 1024 * 1024
    for which, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, limits.cpu_s),
                         (resource.RLIMIT_AS, limits.memory_mb * mb),
                         (resource.RLIMIT_FSIZE, limits.file_size_mb * mb)):
        resource.setrlimit(which, (value, value))
    if namespaces:  # counted per user namespace, so only the sandbox's processes (its two supervisors too)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes + 2, limits.processes + 2))
    source = Path(PROGRAM).read_text(encoding="utf-8")
    policy = Policy(Path.cwd().resolve(), forks=limits.processes - 1, supervisor=supervisor)
    policy.patch()
    sys.addaudithook(policy)
    main = types.ModuleType("__main__")
    main.__file__ = PROGRAM
    sys.modules["__main__"] = main  # so pickle (a multiprocessing pool) finds the program's functions
    sys.argv = [PROGRAM]
    try:
        exec(compile(source, PROGRAM, "exec"), main.__dict__)  # noqa: S102 -- running it is the sandbox's job
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- the program's own error: print it, and say how it ended
        print_error(exc)
        chain = causes(exc)
        sys.exit(EXIT_MEMORY if any(isinstance(e, MemoryError) for e in chain)
                 else EXIT_REFUSED if any(isinstance(e, Refused) for e in chain) else 1)
    sys.exit(0)


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or while handling."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def print_error(exc: BaseException) -> None:
    """The traceback from the program's first frame to its last: the sandbox's own frames (the bootstrap before
    it, the audit hook after it) are nobody's business."""
    for e in causes(exc):
        inner = e.__traceback__
        while inner is not None and inner.tb_next is not None:
            if inner.tb_next.tb_frame.f_code.co_filename == __file__:
                inner.tb_next = None
            else:
                inner = inner.tb_next
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != PROGRAM:
        tb = tb.tb_next
    try:
        sys.stdout.flush()
        traceback.print_exception(type(exc), exc, tb)  # None for a syntax error: the message says where
    except MemoryError:
        print(f"{type(exc).__name__}", file=sys.stderr)


class Refused(PermissionError):
    """An operation the sandbox does not allow."""


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# Audit events that always refuse: other programs, name lookups (they reach the host's resolver without any
# Python socket), group signals (the supervisor is in the group) and changes to the limits.
REFUSED_EVENTS = {
    "subprocess.Popen": "running other programs", "os.exec": "running other programs",
    "os.posix_spawn": "running other programs", "os.system": "running other programs",
    "os.killpg": "signalling process groups", "resource.setrlimit": "changing its limits",
    "resource.prlimit": "changing its limits", "socket.getaddrinfo": "network access",
    "socket.gethostbyname": "network access", "socket.gethostbyaddr": "network access",
    "socket.getnameinfo": "network access", "socket.sethostname": "setting the host name",
    "syslog.openlog": "writing to the system log", "syslog.syslog": "writing to the system log",
}


class Policy:
    """The audit hook that refuses what the program may not do (see the module docstring for what it is worth).

    Reads are allowed in the sandbox folder, the Python installation (the interpreter needs its library), time
    zone data, the harmless devices and the process's own /proc entry; writes only in the folder and /dev/null.
    Paths are checked after resolving symbolic links, relative to the working directory or the given folder
    descriptor. Folders outside the sandbox cannot be opened at all, so none can serve as a `dir_fd`."""

    def __init__(self, folder: Path, forks: int, supervisor: int):
        self.folder = str(folder)
        prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
        devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
        self.installation = tuple(sorted(prefixes))
        self.readable = (self.folder, *self.installation, "/usr/share/zoneinfo", *devices)
        self.writable = (self.folder, "/dev/null")
        self.supervisor = supervisor
        # The fork budget: a pipe holding one byte per fork. Forked children share it, and a read takes a byte
        # atomically, so the whole tree together gets `forks`; nothing can add bytes once the writing end is shut.
        self.budget, filler = os.pipe()
        os.set_blocking(filler, False)
        try:
            os.write(filler, b"." * forks)
        except BlockingIOError:
            pass
        os.close(filler)
        os.set_blocking(self.budget, False)
        self.forks = forks
        # Each event's arguments, as Python announces them (see the audit events table in the docs).
        self.checks = {
            "open": self.open,
            "os.listdir": self.listing, "os.scandir": self.listing,
            "os.fwalk": lambda top, topdown, onerror, follow, dir_fd: self.reading(top, dir_fd),
            "os.remove": self.writing, "os.rmdir": self.writing, "shutil.rmtree": self.writing,
            "os.mkdir": lambda path, mode, dir_fd: self.writing(path, dir_fd),
            # Both ends of a rename or a hard link: a link to an outside file would make it writable from inside.
            "os.rename": lambda src, dst, src_fd, dst_fd: (self.writing(src, src_fd), self.writing(dst, dst_fd)),
            "os.link": lambda src, dst, src_fd, dst_fd: (self.writing(src, src_fd), self.writing(dst, dst_fd)),
            # Where a link points is checked whenever it is opened.
            "os.symlink": lambda src, dst, dir_fd: self.writing(dst, dir_fd),
            "os.chmod": lambda path, mode, dir_fd: self.writing(path, dir_fd),
            "os.chown": lambda path, uid, gid, dir_fd: self.writing(path, dir_fd),
            "os.utime": lambda path, times, ns, dir_fd: self.writing(path, dir_fd),
            "os.truncate": lambda path, length: self.writing(path),
            "os.setxattr": lambda path, *rest: self.writing(path),
            "os.removexattr": lambda path, *rest: self.writing(path),
            "sqlite3.connect": self.database,
            "os.fork": self.fork, "os.forkpty": self.fork, "os.kill": self.kill,
            "socket.__new__": self.new_socket, "socket.bind": self.address, "socket.connect": self.address,
            "socket.sendto": self.address, "socket.sendmsg": self.address, "import": self.module,
        }

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        check = self.checks.get(event)
        if check is not None:
            check(*args)
        elif event in REFUSED_EVENTS:
            raise Refused(errno.EPERM, f"sandbox: {REFUSED_EVENTS[event]} is not allowed")
        elif event == "ctypes.dlopen" and (args[0] is None or self.installed(args[0])):
            # Importing ctypes opens the running process (numpy imports it), and torch loads its own libraries
            # with ctypes when imported: a library of the Python installation is what importing an extension
            # module loads anyway. Not one from the sandbox folder, which the program can write.
            return
        elif event.startswith("ctypes."):
            # Looking up or calling a function, or reading and writing memory by address, goes past every check
            # here.
            raise Refused(errno.EPERM, "sandbox: ctypes is not allowed")

    def installed(self, path: Any) -> bool:
        """Whether `path` names a file inside the Python installation (a bare library name does not)."""
        if not isinstance(path, (str, bytes, os.PathLike)) or os.sep not in os.fsdecode(path):
            return False
        real = os.path.realpath(os.fsdecode(path))
        return (any(real.startswith(prefix + os.sep) for prefix in self.installation)
                and not real.startswith(self.folder + os.sep))

    def patch(self) -> None:
        """Guard the few calls that announce no audit event: leaving the process group (which would escape the
        group kill), creating special files, and the fork-and-exec primitive under subprocess."""
        import _posixsubprocess
        import posix

        def refuse(what: str) -> Any:
            def refused(*args: Any, **kwargs: Any) -> None:
                raise Refused(errno.EPERM, f"sandbox: {what} is not allowed")
            return refused

        def checked(original: Any) -> Any:
            def call(path: Any, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> Any:
                self.require(self.where(path, dir_fd), self.writable, "writing")
                return original(path, *args, dir_fd=dir_fd, **kwargs)
            return call

        for module in (os, posix):
            for name in ("setsid", "setpgid", "setpgrp"):
                setattr(module, name, refuse("leaving the process group"))
            for name in ("mkfifo", "mknod"):
                setattr(module, name, checked(getattr(posix, name)))
        _posixsubprocess.fork_exec = refuse("running other programs")

    # Paths.

    def where(self, path: Any, dir_fd: int | None = None) -> str:
        """The real absolute path `path` names (an int is an open file descriptor). Events give a `dir_fd` of
        None or -1 for the working directory."""
        if isinstance(path, int):
            return os.path.realpath(os.readlink(f"/proc/self/fd/{path}"))
        path = os.fsdecode(os.fspath(path))
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None and dir_fd >= 0 else os.getcwd()
        return os.path.realpath(os.path.join(base, path))

    def require(self, real: str, roots: tuple[str, ...], doing: str) -> None:
        if any(real == root or real.startswith(root + os.sep) for root in roots):
            return
        if doing == "reading" and real.startswith(os.path.realpath("/proc/self") + os.sep):
            return
        raise Refused(errno.EACCES, f"sandbox: {doing} outside the program's folder is not allowed", real)

    def open(self, path: Any, mode: str | None, flags: int) -> None:
        if isinstance(path, int):  # wrapping a descriptor already open: it was checked when it was opened
            return
        real = self.where(path)
        if (flags or 0) & WRITE_FLAGS or (mode and set(mode) & set("wax+")):
            self.require(real, self.writable, "writing")
            return
        self.require(real, self.readable, "reading")
        if real != self.folder and not real.startswith(self.folder + os.sep) and os.path.isdir(real):
            raise Refused(errno.EACCES, "sandbox: opening a folder outside the program's folder is not allowed", real)

    def listing(self, path: Any) -> None:
        if not isinstance(path, int):
            self.reading("." if path is None else path)

    def reading(self, path: Any, dir_fd: int | None = None) -> None:
        self.require(self.where(path, dir_fd), self.readable, "reading")

    def writing(self, path: Any, dir_fd: int | None = None) -> None:
        self.require(self.where(path, dir_fd), self.writable, "writing")

    def database(self, database: Any) -> None:
        name = os.fsdecode(os.fspath(database)) if not isinstance(database, str) else database
        if name in ("", ":memory:"):
            return
        self.writing(name)
        if name.startswith("file:"):  # a URI (uri=True): sqlite reads the path itself
            self.writing(name[len("file:"):].split("?")[0] or ".")

    # Processes and signals.

    def fork(self, *args: Any) -> None:
        try:
            if os.read(self.budget, 1):
                return
        except OSError:  # the budget is spent (or the program closed its descriptor)
            pass
        # The kernel's own answer to too many processes, so callers see one kind of error.
        raise BlockingIOError(errno.EAGAIN, f"sandbox: no more processes (at most {self.forks + 1})")

    def kill(self, pid: int, sig: int) -> None:
        if pid > 0 and pid != self.supervisor:
            try:
                if os.getpgid(pid) == os.getpgid(0):
                    return
            except OSError:
                pass
        raise Refused(errno.EPERM, f"sandbox: signalling process {pid} is not allowed (not one of the program's)")

    def module(self, name: str, *args: Any) -> None:
        # Loaded again after `patch`, these would bring back the calls it guards.
        if name in ("posix", "_posixsubprocess"):
            raise Refused(errno.EPERM, f"sandbox: importing {name} again is not allowed")

    # Sockets: only local ones without an address, such as socket.socketpair (asyncio's event loop makes one).

    def new_socket(self, sock: Any, family: int, kind: int, proto: int) -> None:
        if family != socket.AF_UNIX:
            raise Refused(errno.EACCES, "sandbox: network access is not allowed")

    def address(self, sock: Any, address: Any) -> None:
        if address is None:
            return
        name = address if isinstance(address, (str, bytes)) else None
        if not name or name[:1] in ("\0", b"\0"):  # abstract socket names are shared with the host's services
            raise Refused(errno.EACCES, f"sandbox: connecting to {address!r} is not allowed")
        self.writing(name)


def main(argv: list[str] | None = None) -> int:
    """`python -m corsa.sandbox FILE.py`: run one file under the sandbox and print its Outcome as one JSON line.
    Exit 0 whenever the sandbox ran, whatever the program did; 2 for a file that cannot be read."""
    parser = argparse.ArgumentParser(prog="python -m corsa.sandbox", description=main.__doc__)
    parser.add_argument("file", help="the Python program to run")
    for field in dataclasses.fields(Limits):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    try:
        source = Path(args.file).read_text(encoding="utf-8")
        limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    except OSError as exc:
        print(f"corsa.sandbox: error: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except UnicodeError:
        print(f"corsa.sandbox: error: {args.file}: not UTF-8 text", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"corsa.sandbox: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(run(source, limits))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == CHILD:
    supervise(json.loads(sys.argv[2]))
