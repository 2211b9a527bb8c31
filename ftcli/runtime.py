"""Process-level settings for training and scoring on the CPU: the memory allocator and peak-memory readings.

glibc's malloc raises its mmap threshold after the first large block is freed, so later activation tensors
(megabytes each) come from the heap and stay mapped after they are freed: peak RSS of a LoRA step on the built-in
model measured 5.0 GB that way against 2.6 GB with the threshold pinned at 1 MiB (scripts/bench_train.py shows
the effect on whole runs). Pinning it keeps every large tensor in its own mapping, returned to the OS on free.
"""

from __future__ import annotations

import resource

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def tune_allocator() -> bool:
    """Pin glibc's mmap threshold (no-op elsewhere, or when MALLOC_MMAP_THRESHOLD_ is set by the user)."""
    import ctypes
    import ctypes.util
    import os
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
