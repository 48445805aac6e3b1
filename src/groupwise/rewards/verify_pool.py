r"""Math-Verify runs in a `VerifyPool`: a few persistent worker processes, each a fresh interpreter
(`sys.executable -P -c <worker program>`, started by `subprocess.Popen`, i.e. fork+exec with no
Python code between the two, so it is safe in a process with torch threads) that imports only
math-verify and sympy, and handles one (gold, prediction) pair at a time. Why processes: for an
answer such as `9^{9^{9}}` sympy computes 9**387420489, a 1.2-gigabit integer. Math-Verify's own
timeouts use `signal.alarm`, which only the main thread may set; off it they must be disabled,
and then that one completion ran for over 120 s in-process (measured) while holding the GIL, so
not even a watchdog thread of the caller could run. And no signal handler can interrupt a
computation stuck inside one C call that does not check for signals. Each job has three limits,
innermost first:

1. a timer inside the worker (`setitimer`, `timeout_s`) raises an exception that Math-Verify's
   `except Exception` cannot swallow; the job scores 0 and the worker lives on;
2. the parent waits for each job until `timeout_s` + 1 s; a worker still busy then (stuck in C)
   is killed (SIGKILL) and replaced, and the job scores 0;
3. RLIMIT_CPU, set by the worker before each job to its CPU time so far + `timeout_s` + 5 s, makes
   the kernel end a worker whose parent died while it was stuck.

Jobs that overran are counted in `reward.timeouts` (the first is logged as a warning, the rest at
debug level). Workers start on first use, are reused across calls, and are killed by
`reward.close()`, when the reward is garbage-collected, or at interpreter exit.

Why not `multiprocessing`: its "spawn" and "forkserver" children re-import the user's `__main__`
script (running a training script without a `__main__` guard once per worker) and would import
this package, hence torch, in every worker; a fresh `-c` interpreter does neither.
"""
from __future__ import annotations

import json
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from collections import deque
from typing import Any, Sequence

from groupwise.rewards.contract import RewardError

logger = logging.getLogger("groupwise.rewards")

#: The worker program; see its docstring for the job protocol.
WORKER_PROGRAM = str(Path(__file__).with_name("verify_worker.py"))

_GRACE_S = 1.0    # the parent kills a worker this long after the job's own timer should have fired
_BOOT_S = 120.0   # the longest a worker may take to import math-verify and sympy


class _Worker:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.fd = proc.stdout.fileno() if proc.stdout else -1
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None
        self.deadline = math.inf


def _kill_processes(procs: list[subprocess.Popen[bytes]], owner: list[int]) -> None:
    """SIGKILL, reap and close every worker (also the finalizer at exit or garbage collection).

    Only in the process that started them: a forked copy of the pool (a data-loader worker, say)
    must not kill its parent's workers."""
    if owner[0] != os.getpid():
        return
    for proc in procs:
        try:
            proc.kill()
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (uninterruptible sleep): nothing more to do
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
    procs.clear()


class VerifyPool:
    """Persistent Math-Verify worker processes; `run(jobs)` answers each (gold, prediction) job within a deadline.

    Not for concurrent use from several threads at once: calls are serialized by a lock.
    """

    def __init__(self, workers: int, timeout_s: float, owner: str) -> None:
        self.size, self.timeout_s, self.owner = workers, timeout_s, owner
        self.timeouts = 0   # jobs that overran timeout_s (all calls)
        self.restarts = 0   # workers killed (stuck) or found dead, and replaced (all calls)
        self._workers: list[_Worker] = []
        self._procs: list[subprocess.Popen[bytes]] = []  # shared with the finalizer, which must not hold `self`
        self._owner = [os.getpid()]
        self._lock = threading.Lock()
        self._warned = False
        self._finalizer = weakref.finalize(self, _kill_processes, self._procs, self._owner)

    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Kill all workers; a later `run` starts new ones."""
        with self._lock:
            self._workers.clear()
            _kill_processes(self._procs, self._owner)

    # -- workers

    def _spawn(self) -> _Worker:
        if not self._finalizer.alive:  # the exit hook has run; a call still going on a daemon thread ends here
            raise RewardError(f"{self.owner}: the Math-Verify workers were shut down (interpreter exit)")
        proc = subprocess.Popen([sys.executable, "-P", WORKER_PROGRAM], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self._procs.append(proc)
        return _Worker(proc)

    def _replace(self, worker: _Worker) -> None:
        worker.proc.kill()
        worker.proc.wait()
        for stream in (worker.proc.stdin, worker.proc.stdout):
            if stream:
                stream.close()
        if worker.proc in self._procs:
            self._procs.remove(worker.proc)
        self._workers[self._workers.index(worker)] = self._spawn()
        self.restarts += 1

    def _send(self, worker: _Worker, job: dict[str, Any]) -> bool:
        """Write the job; False if the worker is gone."""
        if worker.proc.poll() is not None or worker.proc.stdin is None:
            return False
        try:
            worker.proc.stdin.write((json.dumps({**job, "timeout": self.timeout_s}) + "\n").encode())
            worker.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def _overran(self, what: str) -> None:
        self.timeouts += 1
        if not self._warned:
            self._warned = True
            logger.warning("%s: Math-Verify took longer than timeout_s = %g s (%s); scoring that completion 0 "
                           "(further timeouts are only counted, in reward.timeouts)", self.owner, self.timeout_s, what)
        else:
            logger.debug("%s: Math-Verify timed out (%s)", self.owner, what)

    def _receive(self, worker: _Worker, results: list[Any]) -> None:
        """Read what the worker wrote: its ready line, replies, or end of file (it died)."""
        data = os.read(worker.fd, 1 << 16)
        if not data:
            code = worker.proc.wait()
            if not worker.ready:
                raise RewardError(f"{self.owner}: a Math-Verify worker exited with code {code} before it started")
            if worker.job is not None:  # died on this job (a crash, or RLIMIT_CPU): the job scores 0
                results[worker.job] = ("crash", code)
                logger.warning("%s: a Math-Verify worker died (exit code %s); scoring its completion 0", self.owner, code)
            self._replace(worker)
            return
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "error" in message:
                raise RewardError(f"{self.owner}: the Math-Verify worker cannot start: {message['error']} "
                                  f"(is math-verify installed? pip install 'math-verify[antlr4_13_2]')")
            if "ready" in message:
                worker.ready = True
            elif worker.job is not None:
                if message["status"] == "timeout":
                    self._overran(f"stopped by its timer during {message.get('value')}")
                elif message["status"] == "error":
                    logger.debug("%s: Math-Verify failed: %s", self.owner, message.get("value"))
                results[worker.job] = (message["status"], message.get("value"))
                worker.job, worker.deadline = None, math.inf

    # -- running jobs

    def run(self, jobs: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
        """One `(status, value)` per job: ("ok", 0|1), ("gold", None), ("timeout", …), ("error", …), ("crash", code)."""
        results: list[Any] = [None] * len(jobs)
        if not jobs:
            return results
        with self._lock:
            try:
                self._run(jobs, results)
            except BaseException:
                # an interrupted call (KeyboardInterrupt, a RewardTimeout of the runner, a startup error) may
                # leave workers busy on jobs nobody waits for: start afresh next time
                self._workers.clear()
                _kill_processes(self._procs, self._owner)
                raise
        return results

    def _run(self, jobs: Sequence[dict[str, Any]], results: list[Any]) -> None:
        if self._owner[0] != os.getpid():  # a forked copy: the workers are the parent's; start our own
            self._workers.clear()
            self._procs.clear()
            self._owner[0] = os.getpid()
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())
        queue = deque(range(len(jobs)))
        while True:
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.ready and worker.job is None and queue:
                    index = queue.popleft()
                    if self._send(worker, jobs[index]):
                        worker.job, worker.deadline = index, now + self.timeout_s + _GRACE_S
                    else:  # it died while idle: the job never ran, so it goes back to the queue
                        queue.appendleft(index)
                        self._replace(worker)
            waiting = [w for w in self._workers if w.job is not None or not w.ready]
            if not queue and all(w.job is None for w in self._workers):
                return
            deadline = min(w.deadline if w.ready else w.started + _BOOT_S for w in waiting)
            readable, _, _ = select.select([w.fd for w in waiting], [], [], max(0.0, deadline - now))
            by_fd = {w.fd: w for w in waiting}
            for fd in readable:
                self._receive(by_fd[fd], results)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.job is not None and now >= worker.deadline:  # stuck where its timer cannot reach
                    results[worker.job] = ("timeout", "killed")
                    self._overran("the worker was killed")
                    self._replace(worker)
                elif not worker.ready and now >= worker.started + _BOOT_S:
                    raise RewardError(f"{self.owner}: a Math-Verify worker did not start within {_BOOT_S:g} s")


def pool_options(owner: str, timeout_s: Any, workers: Any) -> int:
    """Check `timeout_s` and `workers`; the number of workers."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (0 < timeout_s < math.inf):
        raise RewardError(f"{owner}: timeout_s must be a positive number of seconds, not {timeout_s!r}")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise RewardError(f"{owner}: workers must be a positive integer, not {workers!r}")
    return workers


def attach_pool(reward: Any, pool: VerifyPool) -> None:
    reward.pool = pool
    reward.close = pool.close
    reward.timeouts = 0
    reward.last_metrics = {}


def record_pool_metrics(reward: Any, prefix: str, pool: VerifyPool, before: tuple[int, int], jobs: int, start: float) -> None:
    reward.timeouts = pool.timeouts
    reward.last_metrics = {
        f"{prefix}/jobs": float(jobs),
        f"{prefix}/timeouts": float(pool.timeouts - before[0]),
        f"{prefix}/worker_restarts": float(pool.restarts - before[1]),
        f"{prefix}/wall_time_s": time.monotonic() - start,
    }


