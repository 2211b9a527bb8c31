"""Process-level settings for training and scoring on the CPU: the memory allocator and peak-memory readings.

A training step allocates and frees gigabytes of activation tensors. Two settings make that cheap:

- `prepare_process()` (before torch is imported) sets THP_MEM_ALLOC_ENABLE=1: torch then aligns tensors of 2 MB
  and more to huge pages and asks the kernel for transparent huge pages (where /sys/kernel/mm/transparent_hugepage
  allows `madvise`), so a fresh tensor costs one page fault per 2 MB instead of one per 4 kB.
- `tune_allocator()` keeps freed memory in glibc's heap for reuse (mmap threshold and trim threshold at 1 GiB)
  instead of returning every large tensor to the kernel and faulting its pages in again on the next allocation.

Keeping the heap does not raise peak RSS because a step runs in passes of at most `training.pass_tokens`
positions (train.py): the activations of one pass are all that is ever live. `scripts/bench_train.py --variants`
measures each setting on its own (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import resource

HEAP_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def prepare_process() -> None:
    """Environment torch reads once, when it is first imported (a user's own setting wins)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def tune_allocator() -> bool:
    """Keep freed tensors in the heap (no-op off glibc, or when the user sets MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_, or FTCLI_ALLOCATOR=default)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("FTCLI_ALLOCATOR") == "default":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, HEAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
