"""Peak-memory measurement (redrafter_trt/memory.py): bytes, checked against /proc."""

from __future__ import annotations

import sys

import pytest
import torch

from redrafter_trt.memory import cuda_peak_bytes, peak_rss_bytes, reset_cuda_peak


def proc_status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            value, unit = line.split()[1:3]
            assert unit == "kB"
            return int(value) * 1024
    raise AssertionError(f"/proc/self/status has no {field}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_peak_rss_is_the_kernels_high_water_mark_in_bytes():
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    hwm = proc_status_bytes("VmHWM")
    peak = peak_rss_bytes()
    del block
    # the same high-water mark, in bytes (not KiB): equal up to pages touched in between
    assert abs(peak - hwm) <= 8 * 2**20, (peak, hwm)
    assert peak >= proc_status_bytes("VmRSS") - 8 * 2**20


def test_cuda_peak_is_none_off_cuda():
    reset_cuda_peak(torch.device("cpu"))  # nothing to reset, no error
    assert cuda_peak_bytes(torch.device("cpu")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim, /proc")
def test_trim_heap_gives_freed_heap_pages_back():
    """In a child (a clean heap): 64 MiB of small freed allocations stay resident until
    trim_heap hands them back."""
    import subprocess
    from pathlib import Path

    code = """
import ctypes, sys
from redrafter_trt.memory import trim_heap
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: every block from the heap
ptrs = [libc.malloc(4096) for _ in range(16384)]
for p in ptrs:
    ctypes.memset(p, 1, 4096)
keep = libc.malloc(16)  # the top of the heap stays in use: free alone cannot shrink it
for p in ptrs:
    libc.free(p)
before = rss()
assert trim_heap()
print(before - rss())
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert int(out.stdout.split()[-1]) > 48 * 2**20, out.stdout
