"""Process-level settings for training and scoring on the CPU: the memory allocator, oneDNN's kernel caches and
peak-memory readings.

A training step allocates and frees gigabytes of activation tensors. glibc returns every freed block of more than
128 kB (a threshold that then adapts) to the kernel, and the next allocation of that size faults its pages in and
zeroes them again. `tune_allocator()` keeps freed memory in the heap for reuse instead (mmap and trim thresholds at
1 GiB). That does not raise peak RSS, because a step runs in passes of at most `training.pass_tokens` positions
(train.py): the activations of one pass are all that is ever live. scripts/bench_train.py --variants measures it on
its own (docs/benchmarks.md). `ftcli merge` gains the same way: each shape group's batches reuse the last one's
memory (docs/merge.md).

bf16 matrix products on the CPU go through oneDNN, which compiles a kernel for every new product shape and keeps
up to 1,024 of them in each of two caches (ideep's, sized by LRU_CACHE_CAPACITY, and oneDNN's primitive cache,
ONEDNN_PRIMITIVE_CACHE_CAPACITY), ≈ 0.8 MB each. Packed rows change length every step, so a bf16 run's memory grew
by hundreds of MB as its kernels piled up: LoRA on the built-in model, 96 alpaca rows in bf16 (bench_train.py's
worker, one run each), peak RSS 2,841 MB with the defaults (fp32: 2,313), 2,139 with both caches at 64, 1,940 at
32, 1,877 at 16, at 545, 579, 596 and 582 tokens/s; full fine-tuning 5,379 MB with the defaults, 4,329 at 64 and
3,997 at 32 (449, 462 and 452 tokens/s). A step's ≈ 25 product shapes fit in 32, and a kernel evicted is
recompiled only for a length that comes back. `tune_process()` sets both to KERNEL_CACHE unless the user set them;
it must run before the process's first bf16 product (the caches read the variables then).

`training.compile` (ftcli/compiled.py) keeps inductor's compiled graphs on disk; `tune_process()` puts them beside
ftcli's other caches (`FTCLI_CACHE`, default ~/.cache/ftcli, folder inductor) unless TORCHINDUCTOR_CACHE_DIR is set,
so they outlive /tmp and a later run of the same model reuses them.
"""

from __future__ import annotations

import os
import resource

HEAP_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3


KERNEL_CACHE = 32


def tune_process() -> None:
    """The process-wide settings a training or scoring command makes (the commands', not the library's): glibc's
    heap thresholds, the size of oneDNN's kernel caches and where inductor caches (see the module docstring)."""
    from ftcli.models import cache_root

    tune_allocator()
    for var in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(KERNEL_CACHE))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver; AMD's (ROCm)


def gpu_driver() -> bool:
    """Whether a GPU driver is installed (the files its kernel module creates), without importing torch."""
    return any(os.path.exists(f) for f in GPU_DRIVER_FILES)


def bf16_units() -> str | None:
    """What makes bf16 pay on this machine: a CUDA GPU with bf16, or the CPU's AMX or AVX-512 BF16 units; None
    where there is none (bf16 there is emulated and slower than fp32). torch is asked about a GPU only where a GPU
    driver is present or torch is loaded already: importing it costs seconds, and `ftcli check` resolves the
    precision without it on a CPU machine."""
    import sys

    if "torch" in sys.modules or gpu_driver():
        import torch

        if torch.cuda.is_available():
            return f"CUDA GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_bf16_supported() else None
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "the CPU's AMX units"), ("avx512_bf16", "the CPU's AVX-512 BF16 units")):
        if flag in flags:
            return name
    return None


def resolve_precision(asked: str) -> tuple[str, str]:
    """(fp32 | bf16, why) for `training.precision` (or `ftcli eval --precision`): auto is bf16 where the machine
    has bf16 matrix units, fp32 elsewhere."""
    if asked not in ("auto", "fp32", "bf16"):
        from ftcli.errors import UserError

        raise UserError(f"--precision {asked!r}: choose from auto, fp32, bf16")
    if asked != "auto":
        return asked, "as the recipe asks"
    units = bf16_units()
    if units:
        return "bf16", f"auto: bf16 on {units}"
    return "fp32", "auto: fp32, no bf16 matrix units here (a CUDA GPU with bf16, AMX or AVX-512 BF16)"


def autocast(precision: str, device_type: str = "cpu"):
    """A context factory for `precision`: torch's bf16 autocast on `device_type`, or nothing (fp32). Used by
    training, scoring and the benchmark alike, so every path computes bf16 the same way."""
    from contextlib import nullcontext

    if precision != "bf16":
        return nullcontext
    import torch

    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_gpu_mb() -> float | None:
    """The CUDA caching allocator's peak (tensors alone) where the process used a GPU; None elsewhere."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
