"""Keep glibc from returning tensor-sized blocks to the OS after every use.

glibc serves allocations above a dynamic threshold (128 KiB to start with) with fresh
``mmap`` pages and unmaps them on free. An interactive click allocates and frees a few
dozen 1-16 MiB tensors, so every click pays for tens of thousands of page faults and
zero-filled pages: on the 2-core VMs we measured, that was about a quarter of the
click-to-mask time. Raising the mmap threshold to its maximum (32 MiB on 64-bit) and the
trim threshold with it keeps those blocks on the heap for reuse.

This changes a process-wide setting, so it runs only when asked (predictors ask on
creation), only once, and only where glibc is the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory_for_reuse"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 256 * 1024 * 1024
_done: bool | None = None


def keep_freed_memory_for_reuse() -> bool:
    """Tune glibc malloc for many mid-sized tensors; returns whether it took effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
