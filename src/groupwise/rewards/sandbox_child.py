"""What runs in a sandboxed child (see `groupwise.rewards.sandbox` for the whole design).

The kernel constants and libc handle, the Python prelude and runner the child executes, and the
`preexec_fn` that sets the child up between fork and exec: namespaces, read-only mounts and the
tmpfs working directory, PR_SET_NO_NEW_PRIVS, identity, PR_SET_PDEATHSIG and rlimits, in that
order. Split from `sandbox.py` (the parent's side: probing, uid slots' use, execution, the API).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import signal
import sys
from dataclasses import dataclass
from typing import Callable


# ----------------------------------------------------------------------------- kernel constants

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # one number on all architectures but alpha (syscalls since 5.1 share one table)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start a child, create a directory, ...): not the program's fault."""


# ----------------------------------------------------------------------------- the code run in the child

_SOCKET_PRELUDE = r'''
def _gw_block_network():
    import socket, _socket
    def _denied(*args, **kwargs):
        raise PermissionError(13, "network access is disabled in this sandbox")
    class _BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _denied()
    for _mod in (socket, _socket):
        for _name in ("socket", "SocketType"):
            if hasattr(_mod, _name):
                setattr(_mod, _name, _BlockedSocket)
        for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                      "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "fromshare"):
            if hasattr(_mod, _name):
                setattr(_mod, _name, _denied)
_gw_block_network()
del _gw_block_network
'''

# The runner: reads the token of an assert-style run from stdin (before the program can), then
# runs solution.py as __main__ and, only if it returned normally, prints the token on its own line.
# An early exit (sys.exit(0), os._exit(0)) therefore cannot pass the tests.
_RUNNER = r'''import sys
{prelude}
def _gw_main():
    import os
    token = sys.stdin.readline().strip() if sys.argv[1] == "assert" else ""
    path = "solution.py"
    with open(path, encoding="utf-8", errors="replace") as handle:
        code = compile(handle.read(), path, "exec")
    sys.argv = [path]
    scope = {{"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}}
    exec(code, scope)
    if token:
        sys.stdout.flush()
        os.write(1, ("\n" + token + "\n").encode())
_gw_main()
'''

SOLUTION_FILE = "solution.py"
RUNNER_FILE = "_gw_runner.py"


# ----------------------------------------------------------------------------- the child's setup


@dataclass(frozen=True)
class _Plan:
    """What the preexec function does (one candidate of the probe)."""

    netns: bool
    mountns: bool
    userns: bool
    uid: bool
    pidns: bool = False


@functools.lru_cache(maxsize=1)
def _hidden_interpreter_paths() -> dict[str, list[str]]:
    """Directories of the interpreter that another uid cannot reach (e.g. a pyenv/conda install
    under root's 0700 home), grouped by the closed ancestor: `{"/root": ["/root/.pyenv/versions/3.11"]}`.
    In the mount namespace a tmpfs (0755) replaces each such ancestor and only these directories
    are bind-mounted back into it, so the interpreter runs while the rest of the home stays hidden."""
    wanted = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                            os.path.dirname(os.path.realpath(sys.executable)))}
    wanted = {p for p in wanted if not any(p.startswith(other.rstrip("/") + "/") for other in wanted)}  # outermost only
    hidden: dict[str, list[str]] = {}
    for path in sorted(wanted):
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            try:
                if not os.stat(ancestor).st_mode & 0o001:
                    hidden.setdefault(ancestor, []).append(path)
                    break
            except OSError:
                break
    return hidden


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _make_preexec(plan: _Plan, workdir: str, files: dict[str, bytes], uid: int | None, limits: dict[int, tuple[int, int]],
                  tmpfs_mb: int, outer_uid: int, outer_gid: int) -> Callable[[], None]:
    """The function run in the child between fork and exec. It imports nothing (another thread of
    the parent may hold the import lock at fork time) and only makes system calls."""
    workdir_b = workdir.encode()
    tmpfs_opts = f"size={tmpfs_mb}m,nr_inodes=4096,mode=0700,uid={uid if uid is not None else outer_uid}," \
                 f"gid={uid if uid is not None else outer_gid}".encode()
    if plan.userns:
        tmpfs_opts = f"size={tmpfs_mb}m,nr_inodes=4096,mode=0700".encode()
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)  # not NODEV: /dev/null must open
    flags = ((plan.netns and CLONE_NEWNET) | (plan.mountns and CLONE_NEWNS) | (plan.userns and CLONE_NEWUSER)
             | (plan.pidns and CLONE_NEWPID))
    libc, write_file = _libc, _write_file
    setrlimit = resource.setrlimit
    hidden = _hidden_interpreter_paths() if plan.uid else {}

    def preexec() -> None:
        """Namespaces, mounts, identity, limits (see the module docstring)."""
        if flags:
            _check(libc.unshare(flags), "unshare")
        if plan.userns:  # map only ourselves; no setgroups
            write_file(b"/proc/self/setgroups", b"deny")
            write_file(b"/proc/self/uid_map", f"{outer_uid} {outer_uid} 1".encode())
            write_file(b"/proc/self/gid_map", f"{outer_gid} {outer_gid} 1".encode())
        if plan.mountns:
            _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
            for ancestor, paths in hidden.items():
                fds = [os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in paths]
                _check(libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755"),
                       "mount tmpfs over " + ancestor)
                for path, fd in zip(paths, fds):
                    os.makedirs(path, 0o755, exist_ok=True)
                    _check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None),
                           "bind " + path)
                    os.close(fd)
            _check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), b"/",
                                ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
                   "mount_setattr / read-only")
            _check(libc.mount(b"tmpfs", workdir_b, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_opts), "mount tmpfs")
            os.chdir(workdir)  # the new tmpfs, not the directory underneath
            for name, data in files.items():
                write_file(name.encode(), data, 0o644)
            os.mkdir("home", 0o700)
            if uid is not None:
                os.chown("home", uid, uid)
        if plan.pidns:
            _become_pid_namespace_init()
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        if plan.uid and uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")  # after setuid, which clears it
        # Last: this child is still a copy of the parent (maybe gigabytes of address space), and
        # with RLIMIT_AS in force any further allocation before exec could fail.
        for which, value in limits.items():
            setrlimit(which, value)

    return preexec


def _become_pid_namespace_init() -> None:
    """After unshare(CLONE_NEWPID), in the preexec: fork; the child (pid 1 of the new namespace)
    returns and goes on to exec the program, this process stays behind as its stand-in for
    Popen and exits with its status. When pid 1 dies the kernel kills everything else in the
    namespace, so nothing the program started (even after setsid) outlives it."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    child = os.fork()
    if child == 0:
        return
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # hold none of Popen's pipes (nor its exec-error pipe, closed below)
        os.dup2(devnull, fd)
    os.closerange(3, 1 << 16)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        except (OSError, ValueError, RuntimeError):
            pass
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _write_file(path: bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
