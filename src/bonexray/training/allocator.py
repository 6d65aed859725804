"""Keep freed memory inside the process during CPU training (glibc only).

glibc serves every block above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``. A CPU
training step allocates and frees many activation tensors that large, so each step re-faults
the same pages from the kernel, as system time (``bench/cpu_allocator.py`` measures it; the
figures are in the README's Results). Turning off mmap for large blocks and never trimming the heap lets those
pages be reused. The price is that the process keeps its peak heap until it exits, which is what
a training process wants anyway. Set ``BONEXRAY_MALLOC_TUNING=0`` to leave glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1  # <malloc.h> parameter numbers
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Apply the glibc settings once per process; returns whether they are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("BONEXRAY_MALLOC_TUNING", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok
