"""Process memory as the OS sees it: resident set size, and handing freed heap pages back.

Used by the node (after refusing an oversize image, so a burst of them does not leave the RSS
high) and by the memory benchmarks (so RSS shows live memory, not the allocator's free lists).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``). False where unavailable.

    Without it RSS swings by tens of MB with the allocator's arenas (one 640x480 float32 logit map
    of 9 classes is 11 MB), which hides or fakes a slow leak.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def rss_mb(pid: int | None = None) -> float:
    """Resident set size in MB of this process, or of process ``pid`` (Linux ``/proc``; psutil elsewhere)."""
    path = f"/proc/{pid or 'self'}/status"
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    try:
        import psutil

        return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20
    except ImportError:
        raise RuntimeError("cannot read the resident set size: neither /proc nor psutil is available") from None
