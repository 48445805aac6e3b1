"""Unprivileged uids for sandboxed executions when running as root (see `groupwise.rewards.sandbox`).

One uid per concurrent execution, held with an flock across processes, and `_kill_uid`, which
kills every process of a uid by signalling as that uid.
"""
from __future__ import annotations

import collections
import ctypes
import fcntl
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from groupwise.rewards.sandbox_child import SandboxError, _libc


# ----------------------------------------------------------------------------- uid slots (root only)


def _default_uid_base() -> int:
    """A uid range nobody uses: GROUPWISE_SANDBOX_UID_BASE, else high in this user namespace's map."""
    if os.environ.get("GROUPWISE_SANDBOX_UID_BASE"):
        return int(os.environ["GROUPWISE_SANDBOX_UID_BASE"])
    preferred = 1_900_000_000
    try:
        ranges = [tuple(int(x) for x in line.split()) for line in open("/proc/self/uid_map")]
    except OSError:
        return preferred
    for inside, _, count in ranges:
        if inside <= preferred and preferred + 65536 <= inside + count:
            return preferred
    inside, _, count = max(ranges, key=lambda r: r[2])  # a limited map (rootless container)
    return max(inside + count - 4096, inside + 1000)


class _UidSlots:
    """Unprivileged uids, one per concurrent execution; a uid is held with an flock so that two
    processes on one machine (two trainer ranks, a test run) never share one.

    A uid goes back to the end of a queue after use and is handed out again only `cool_down_s`
    later when possible (new uids are taken meanwhile, up to `size`): killed processes stay
    zombies, still counted by RLIMIT_NPROC, until init reaps them, and must not eat into the
    next program's process budget.
    """

    def __init__(self, base: int, size: int = 4096, cool_down_s: float = 2.0, max_held: int = 256):
        self.base, self.size, self.cool_down_s, self.max_held = base, size, cool_down_s, max_held
        self._free: collections.deque[tuple[float, int]] = collections.deque()  # (usable from, uid)
        self._locks: dict[int, int] = {}
        self._mutex = threading.Lock()
        self._dir = os.path.join(tempfile.gettempdir(), "groupwise-sandbox-uids")
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        self._next = base
        self.pid = os.getpid()  # a forked child must not use its parent's uids (it shares their locks)

    def acquire(self) -> int:
        """A uid for one execution: the longest-unused one after its cool-down, else a new one."""
        with self._mutex:
            now = time.monotonic()
            if self._free and (self._free[0][0] <= now or len(self._locks) >= self.max_held):
                return self._free.popleft()[1]
            uid = self._new_uid()
            if uid is not None:
                return uid
            if self._free:
                return self._free.popleft()[1]
        raise SandboxError(f"no free sandbox uid in [{self.base}, {self.base + self.size})")

    def _new_uid(self) -> int | None:
        while self._next < self.base + self.size:
            uid, self._next = self._next, self._next + 1
            try:
                pwd.getpwuid(uid)
                continue  # a real account: never borrow it
            except KeyError:
                pass
            fd = os.open(os.path.join(self._dir, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # another process owns this uid
            self._locks[uid] = fd
            _kill_uid(uid)  # leftovers of a process that died holding it
            return uid
        return None

    def release(self, uid: int, quarantine_s: float | None = None) -> None:
        """Give `uid` back; it is handed out again after `quarantine_s` (default: the cool-down)."""
        with self._mutex:
            self._free.append((time.monotonic() + (self.cool_down_s if quarantine_s is None else quarantine_s), uid))


# setresuid system call numbers: the raw call changes the calling thread only (glibc's wrapper
# changes every thread of the process).
_SYS_SETRESUID = {"x86_64": 117, "aarch64": 147}.get(os.uname().machine)


def _thread_effective_caps() -> int:
    """The calling thread's effective capability set (-1 if unreadable)."""
    try:
        with open("/proc/thread-self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return -1


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` by sending `kill(-1, SIGKILL)` as that uid: the kernel then
    signals exactly the processes whose real or saved uid is `uid`, under the tasklist lock (a fork
    bomb cannot outrun it), and never the sender.

    Fast path: the calling *thread* alone takes ruid = euid = `uid` (saved uid stays 0, so it can
    come back; its effective capabilities are dropped meanwhile, so CAP_KILL does not widen the
    kill), sends the signal, and returns to root. Otherwise `kill -KILL -1` is run as that uid.
    """
    if _SYS_SETRESUID is not None and os.geteuid() == 0:
        dropped = _libc.syscall(ctypes.c_long(_SYS_SETRESUID), ctypes.c_long(uid), ctypes.c_long(uid), ctypes.c_long(0))
        if dropped == 0:
            try:
                if _thread_effective_caps() == 0:  # no CAP_KILL left: kill(-1) reaches `uid` only
                    _libc.kill(-1, signal.SIGKILL)
                    return
            finally:
                restored = _libc.syscall(ctypes.c_long(_SYS_SETRESUID), ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
                if restored != 0 or os.geteuid() != 0 or os.getuid() != 0:
                    raise SandboxError(f"could not return to uid 0 after signalling sandbox uid {uid}")
    kill = shutil.which("kill", path="/usr/bin:/bin") or "/bin/kill"
    try:
        subprocess.run([kill, "-KILL", "--", "-1"], user=uid, group=uid, extra_groups=[], env={},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       close_fds=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"could not kill the processes of sandbox uid {uid}: {e}") from e
