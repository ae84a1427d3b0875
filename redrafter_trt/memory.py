"""Peak-memory measurement, in bytes (the one place that reads ``ru_maxrss`` and CUDA's peak).

Callers that report another unit divide these (``bytes / 2**20`` = MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_cuda_peak(device: torch.device) -> None:
    """Start a new CUDA peak on ``device`` (nothing on a non-CUDA device)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on CUDA ``device`` since the last reset (None off CUDA)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``): loading an engine frees
    temporaries (file reads, the tokenizer's construction) whose pages the allocator otherwise
    keeps resident. False where the C library has no ``malloc_trim``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    fn(0)
    return True
