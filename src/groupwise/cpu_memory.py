"""Keep freed CPU tensor memory in the process, so a training step does not page-fault it back.

PyTorch's CPU allocator is plain `malloc`. glibc serves every block over its mmap threshold
(at most 32 MiB) with a fresh `mmap` and returns it with `munmap` on free, and trims the heap's
top whenever more than 128 KiB is free there. A step allocates and frees the same large
activations, gradients and `[chunk, vocab]` head blocks every time, so each step faults all of
them in again, one zeroed 4 KiB page at a time: 7.5 million minor faults and 34 s of system time
in four SmolLM2-135M steps on 2 cores (benchmarks/vs_trl.py's settings), a third of the update.

`retain_freed_memory()` sets `M_MMAP_MAX = 0` (every block comes from the heap) and a huge
`M_TRIM_THRESHOLD` (the heap shrinks only when 2 GiB are free at its top), as a caching allocator does on a GPU: the process
keeps its peak footprint and reuses it. Blocks already mapped are unaffected. A no-op where
the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
_applied = False


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module doc); True when it took effect."""
    global _applied
    if _applied:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int: 2 GiB − 1 is "never" for a step.
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        logger.debug("mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD; CPU memory is returned to the OS as usual")
    _applied = ok
    return ok
