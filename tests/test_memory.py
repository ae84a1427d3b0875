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
