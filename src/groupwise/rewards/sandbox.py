"""A process sandbox for running model-written Python (used by the `code_tests` reward).

Every execution is a fresh `python -I` (isolated mode, `sys.executable`) in its own session and
process group, started by `subprocess.Popen(start_new_session=True, preexec_fn=...)`. The
`preexec_fn` (run in the child between fork and exec) applies, in this order:

1. **namespaces** (where the platform allows): a new network namespace (`unshare(CLONE_NEWNET)`:
   no interfaces but a loopback that is down, so even 127.0.0.1 is unreachable) and a new mount
   namespace in which the whole file tree is made read-only (`mount_setattr(AT_RECURSIVE)`) and
   the working directory is a fresh, size-limited tmpfs. Not running as root, an unprivileged user
   namespace (`CLONE_NEWUSER`, mapping only our own uid) is created first to allow the others,
   and a PID namespace whose init is the program (see `sandbox_child._become_pid_namespace_init`) takes the
   place of the separate uid in killing everything the program started;
2. `PR_SET_NO_NEW_PRIVS` (no setuid binary or file capability can raise privileges again);
3. **identity** (when running as root): the child drops to its own unprivileged uid/gid, one per
   concurrent execution slot (`uid_base + k`, guarded across processes by a lock file), with no
   supplementary groups. Root is exempt from RLIMIT_NPROC and may signal or read anything, so this
   is what makes the process limit (fork bombs, thread bombs) bind, and what keeps the child away
   from the parent (signals, `/proc/<ppid>/environ`, files readable only by root, root's home);
4. `PR_SET_PDEATHSIG(SIGKILL)`: the child dies with the thread that started it;
5. **rlimits**, last: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_NPROC (processes
   and threads), RLIMIT_FSIZE (largest file), RLIMIT_NOFILE, RLIMIT_CORE = 0.

Without a network namespace the program is started through a prelude that replaces the socket
layer (`socket.socket`, `socket.create_connection`, ...) by one that raises `PermissionError`;
this is weaker (a new interpreter or ctypes gets around it) and is reported as such.

The environment is scrubbed to PATH, LANG, HOME (a directory inside the working directory),
PYTHONDONTWRITEBYTECODE and PYTHONHASHSEED. Stdout and stderr are read together up to
`max_output_bytes`, then the run is killed. On the wall-clock deadline, and after *every* run, the
whole process group is killed (`os.killpg(SIGKILL)`) and, under a dedicated uid, every process of
that uid too (`kill(-1, SIGKILL)` sent as that uid), so a daemon that left the session with
`setsid()` dies as well. The temporary working directory is removed afterwards.

`isolation()` says which of these mechanisms are in force on this machine; it is probed once, by
starting a child with each candidate configuration, strongest first.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

# The child's side (its setup between fork and exec, the code it runs) and the uid slots live in
# sandbox_child.py and sandbox_uids.py; this module is the parent's side.
from groupwise.rewards.sandbox_child import RUNNER_FILE, SOLUTION_FILE, _RUNNER, _SOCKET_PRELUDE, SandboxError, _make_preexec, _Plan, _write_file
from groupwise.rewards.sandbox_uids import _default_uid_base, _kill_uid, _UidSlots

logger = logging.getLogger("groupwise.rewards")


# ----------------------------------------------------------------------------- results and options


@dataclass
class ExecResult:
    """What one sandboxed execution did.

    `status` is one of: "ok" (exit code 0), "error" (non-zero exit code), "signal" (killed by a
    signal, e.g. a segfault or RLIMIT_CPU), "timeout" (wall-clock limit), "output_limit" (more
    than `max_output_bytes` written).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the program exited by itself with code 0."""
        return self.status == "ok"


@dataclass(frozen=True)
class Isolation:
    """Which protections are in force (see the module docstring). Probed once per process.

    - `network`: "netns" (own network namespace) or "prelude" (socket layer replaced in Python);
    - `filesystem`: "readonly+tmpfs" (mount namespace: everything read-only, tmpfs working
      directory) or "workdir" (only the cwd is private; the rest is guarded by file permissions);
    - `processes`: "uid" (root: each slot has its own unprivileged uid, so RLIMIT_NPROC binds and
      leftovers are killed by uid), "userns+pidns" (not root: own user namespace, in which
      RLIMIT_NPROC counts the sandbox's own processes, and own PID namespace, killed whole with
      the program), "userns" (the same without the PID namespace: a daemon can outlive the run),
      "rlimit" (RLIMIT_NPROC on the shared uid, relative to its current count) or "none" (root
      without a separate uid: RLIMIT_NPROC does not apply to root);
    - `user_namespace`: whether a user namespace was needed (not running as root).
    """

    network: str
    filesystem: str
    processes: str
    user_namespace: bool

    def as_metrics(self) -> dict[str, float]:
        """Numeric flags for a metrics log (1.0 = the strong mechanism is in force)."""
        return {
            "sandbox/network_namespace": float(self.network == "netns"),
            "sandbox/readonly_filesystem": float(self.filesystem == "readonly+tmpfs"),
            "sandbox/separate_uid": float(self.processes == "uid"),
            "sandbox/process_containment": float(self.processes in ("uid", "userns+pidns")),
        }

    def describe(self) -> str:
        """One line for logs and reports."""
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


# ----------------------------------------------------------------------------- probing

_isolation_lock = threading.Lock()
_isolation: tuple[Isolation, _Plan] | None = None
_uid_slots: _UidSlots | None = None


def _candidates() -> list[_Plan]:
    if os.geteuid() == 0:
        return [_Plan(True, True, False, True), _Plan(True, False, False, True), _Plan(False, False, False, True),
                _Plan(False, False, False, False)]
    return [_Plan(True, True, True, False, True), _Plan(True, True, True, False), _Plan(True, False, True, False, True),
            _Plan(True, False, True, False), _Plan(False, False, False, False)]


def _describe(plan: _Plan) -> Isolation:
    processes = "uid" if plan.uid else ("userns" if plan.userns else ("none" if os.geteuid() == 0 else "rlimit"))
    if plan.pidns:
        processes += "+pidns"
    return Isolation(network="netns" if plan.netns else "prelude",
                     filesystem="readonly+tmpfs" if plan.mountns else "workdir",
                     processes=processes, user_namespace=plan.userns)


_PROBE = r'''
import os, socket
try:
    s = socket.socket()
    s.settimeout(1)
    s.connect(("127.0.0.1", 9))
    net = "open"
except PermissionError:
    net = "denied"
except OSError as e:
    net = "refused" if e.errno == 111 else "unreachable"
probe = "/tmp/.gw-probe-%d" % os.getpid()
try:
    open(probe, "w").close(); os.remove(probe); fs = "writable"
except OSError as e:
    fs = "readonly" if e.errno == 30 else "denied"
open("here.txt", "w").write("x")
print(net, fs, os.getuid(), os.getcwd())
'''


def isolation() -> Isolation:
    """The protections in force here (probed once: the strongest configuration that starts a child
    which finds loopback unreachable, the file tree read-only and its working directory writable)."""
    return _probe()[0]


def _probe() -> tuple[Isolation, _Plan]:
    global _isolation, _uid_slots
    with _isolation_lock:
        if _isolation is not None:
            return _isolation
        failures = []
        for plan in _candidates():
            slots = _uid_slots or (_UidSlots(_default_uid_base()) if plan.uid else None)
            try:
                result = _execute(plan, slots, _PROBE, stdin=b"", timeout_s=10, memory_mb=512, max_output_bytes=4096,
                                  max_processes=16, file_size_mb=1, tmpfs_mb=4, mode="stdio")
            except (OSError, subprocess.SubprocessError, SandboxError) as e:
                failures.append(f"{_describe(plan).describe()}: {e}")
                continue
            words = result.stdout.split()
            good = result.ok and len(words) == 4 and words[0] in ("unreachable", "denied")
            if plan.mountns:
                good = good and words[1] == "readonly"
            if plan.uid and good:
                good = int(words[2]) != 0
            if not good:
                failures.append(f"{_describe(plan).describe()}: probe printed {result.stdout.strip()!r} "
                                f"(status {result.status}, stderr {result.stderr.strip()[-200:]!r})")
                continue
            if plan.uid:
                _uid_slots = slots
            _isolation = (_describe(plan), plan)
            for failure in failures:
                logger.info("sandbox: configuration not available: %s", failure)
            logger.info("sandbox isolation in force: %s", _isolation[0].describe())
            return _isolation
        raise SandboxError("no sandbox configuration could start a child: " + "; ".join(failures))


# ----------------------------------------------------------------------------- execution


def _count_user_tasks(uid: int) -> int:
    """Processes and threads of `uid` (RLIMIT_NPROC counts them all), for the shared-uid fallback."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return count


def _execute(plan: _Plan, slots: _UidSlots | None, code: str, *, stdin: bytes, timeout_s: float, memory_mb: int,
             max_output_bytes: int, max_processes: int, file_size_mb: int, tmpfs_mb: int, mode: str) -> ExecResult:
    global _uid_slots
    if slots is not None and slots.pid != os.getpid():  # we are a fork of the process that made them
        with _isolation_lock:
            if _uid_slots is slots:
                _uid_slots = _UidSlots(slots.base, slots.size)
            slots = _uid_slots
    options = dict(stdin=stdin, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                   max_processes=max_processes, file_size_mb=file_size_mb, tmpfs_mb=tmpfs_mb, mode=mode)
    try:
        if not (plan.uid and slots is not None):
            return _execute_as(plan, None, code, **options)  # type: ignore[arg-type]
        for attempt in range(4):
            uid = slots.acquire()
            quarantine = None
            try:
                return _execute_as(plan, uid, code, **options)  # type: ignore[arg-type]
            except OSError as e:
                # execve fails with EAGAIN when the uid is still over RLIMIT_NPROC (zombies not
                # yet reaped by init): put it aside for a while and take another one.
                if e.errno != errno.EAGAIN or attempt == 3:
                    raise
                quarantine = 30.0
            finally:
                slots.release(uid, quarantine)
        raise AssertionError("unreachable")
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"could not start a sandboxed process: {type(e).__name__}: {e}") from e


def _execute_as(plan: _Plan, uid: int | None, code: str, *, stdin: bytes, timeout_s: float, memory_mb: int,
                max_output_bytes: int, max_processes: int, file_size_mb: int, tmpfs_mb: int, mode: str) -> ExecResult:
    runner = _RUNNER.format(prelude="" if plan.netns else _SOCKET_PRELUDE)
    files = {SOLUTION_FILE: code.encode("utf-8", errors="surrogatepass"), RUNNER_FILE: runner.encode()}
    workdir = tempfile.mkdtemp(prefix="gw-sandbox-")
    try:
        if not plan.mountns:  # no tmpfs: the files go into the host directory itself
            for name, data in files.items():
                _write_file(os.path.join(workdir, name).encode(), data)
            os.mkdir(os.path.join(workdir, "home"), 0o700)
            if uid is not None:
                for path in (workdir, os.path.join(workdir, "home"), *(os.path.join(workdir, n) for n in files)):
                    os.chown(path, uid, uid)
        nproc = max_processes
        if not plan.uid and not plan.userns:  # the count is per user: allow this many more than now
            nproc += _count_user_tasks(os.getuid())
        cpu = max(1, math.ceil(timeout_s))
        limits = {
            resource.RLIMIT_CPU: (cpu, cpu + 1),
            resource.RLIMIT_AS: (memory_mb << 20, memory_mb << 20),
            resource.RLIMIT_NPROC: (nproc, nproc),
            resource.RLIMIT_FSIZE: (file_size_mb << 20, file_size_mb << 20),
            resource.RLIMIT_NOFILE: (256, 256),
            resource.RLIMIT_CORE: (0, 0),
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": os.path.join(workdir, "home"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        preexec = _make_preexec(plan, workdir, files, uid, limits, tmpfs_mb, os.getuid(), os.getgid())
        return _communicate(
            [sys.executable, "-I", RUNNER_FILE, mode], workdir, env, preexec, stdin, timeout_s, max_output_bytes, uid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _communicate(argv: list[str], workdir: str, env: dict[str, str], preexec: Callable[[], None], stdin: bytes,
                 timeout_s: float, max_output_bytes: int, uid: int | None) -> ExecResult:
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec, close_fds=True)
    deadline = start + timeout_s
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}  # type: ignore[union-attr]
    total, status, swept = 0, None, False
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno()  # type: ignore[union-attr]
    sel = selectors.DefaultSelector()
    try:
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)  # type: ignore[union-attr]
            sel.register(stream.fileno(), selectors.EVENT_READ)  # type: ignore[union-attr]
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)  # type: ignore[union-attr]
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)  # type: ignore[union-attr]
        else:
            proc.stdin.close()  # type: ignore[union-attr]
        exited_at = None
        while True:
            now = time.monotonic()
            if exited_at is None and _exited(proc.pid):
                exited_at = now
                # Kill before reaping (the zombie keeps the group id from being reused): a daemon
                # may hold stdout open, and nothing may outlive the program anyway.
                _kill_leftovers(proc.pid, uid)
                swept = True
            if exited_at is not None and (not sel.get_map() or now - exited_at > 1.0):
                break  # all read; or everything is dead and a pipe that stays open has no more for us
            if now >= deadline:
                status = "timeout" if exited_at is None else None
                break
            wait = min(deadline - now, 0.05 if exited_at is None else 0.01)
            if not sel.get_map():  # the program closed its pipes but still runs
                time.sleep(min(wait, 0.002))
                continue
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:65536]):]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:  # it does not read its input
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()  # type: ignore[union-attr]
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    continue
                chunks[fd].append(data[:max_output_bytes - total])
                total += len(data)
                if total > max_output_bytes:
                    status = "output_limit"
                    break
            if status == "output_limit":
                break
    finally:
        sel.close()
        if not swept:  # one kill(-1) after the exit suffices: nothing of that uid survives it
            _kill_leftovers(proc.pid, uid)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired as e:  # cannot happen after SIGKILL, short of a kernel problem
            raise SandboxError(f"sandboxed process {proc.pid} did not die after SIGKILL") from e
    elapsed = time.monotonic() - start
    if status is None:
        status = "ok" if returncode == 0 else ("signal" if returncode < 0 else "error")
    out_fd, err_fd = list(chunks)
    return ExecResult(status=status, returncode=returncode,
                      stdout=b"".join(chunks[out_fd]).decode("utf-8", errors="replace"),
                      stderr=b"".join(chunks[err_fd]).decode("utf-8", errors="replace"),
                      elapsed_s=elapsed, output_truncated=total > max_output_bytes)


def _exited(pid: int) -> bool:
    """Whether child `pid` has terminated, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_leftovers(pgid: int, uid: int | None) -> None:
    """SIGKILL the run's process group, and every process of its uid when it has its own."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)


# ----------------------------------------------------------------------------- public API


class Sandbox:
    """Runs Python programs in isolated child processes (see the module docstring).

    `timeout_s` is the wall-clock limit of one execution (RLIMIT_CPU is its ceiling in seconds),
    `memory_mb` the address-space limit, `max_output_bytes` the stdout+stderr cap, `max_processes`
    the process/thread limit, `file_size_mb` the largest file and `tmpfs_mb` the size of the
    working directory (when it is a tmpfs).
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1 << 20,
                 max_processes: int = 32, file_size_mb: int = 16, tmpfs_mb: int = 64):
        """Check the limits; the isolation is probed on first use (or by `isolation()`)."""
        for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_output_bytes", max_output_bytes),
                            ("max_processes", max_processes), ("file_size_mb", file_size_mb), ("tmpfs_mb", tmpfs_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"sandbox: {name} must be a positive number, not {value!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.max_processes = int(max_processes)
        self.file_size_mb = int(file_size_mb)
        self.tmpfs_mb = int(tmpfs_mb)

    @property
    def isolation(self) -> Isolation:
        """The protections in force (the same for every sandbox of this process)."""
        return isolation()

    def run(self, code: str, stdin: str | bytes = b"", mode: str = "stdio") -> ExecResult:
        """Run `code` as `__main__` with `stdin`; thread-safe (each call is its own process).

        `mode="assert"` is for assert-style tests: the runner consumes the first stdin line as a
        token and prints it after the program returned normally; see `passed_asserts`.
        """
        if mode not in ("stdio", "assert"):
            raise ValueError(f"sandbox: mode must be 'stdio' or 'assert', not {mode!r}")
        plan = _probe()[1]
        data = stdin.encode("utf-8", errors="surrogatepass") if isinstance(stdin, str) else bytes(stdin)
        return _execute(plan, _uid_slots, code, stdin=data, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                        max_output_bytes=self.max_output_bytes, max_processes=self.max_processes,
                        file_size_mb=self.file_size_mb, tmpfs_mb=self.tmpfs_mb, mode=mode)

    def run_asserts(self, code: str) -> tuple[bool, ExecResult]:
        """Run `code` (a program followed by its assert statements); passed = it ran to the end."""
        token = os.urandom(16).hex()
        result = self.run(code, stdin=token + "\n", mode="assert")
        lines = result.stdout.rstrip("\n").splitlines()
        return result.ok and bool(lines) and lines[-1] == token, result


def _reset_for_tests() -> None:
    """Forget the probed isolation (tests force other configurations)."""
    global _isolation
    with _isolation_lock:
        _isolation = None


def _force_plan(netns: bool, mountns: bool, uid: bool, userns: bool = False) -> Isolation:
    """Use a given configuration instead of the probed one (tests of the fallbacks)."""
    global _isolation, _uid_slots
    plan = _Plan(netns=netns, mountns=mountns, userns=userns, uid=uid)
    with _isolation_lock:
        if uid and _uid_slots is None:
            _uid_slots = _UidSlots(_default_uid_base())
        _isolation = (_describe(plan), plan)
    return _isolation[0]
