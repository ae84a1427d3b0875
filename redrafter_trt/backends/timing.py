"""A backend's phase timer: cumulative seconds per phase of its steps, read only when asked.

On a CPU each phase boundary reads ``time.perf_counter``. On CUDA it records an event on the
current stream instead of synchronising the device; the intervals are read (and the device
waited for) only when :attr:`PhaseTimer.totals` is read, so a step runs without a host-device
round trip for its timing. A CUDA interval is the device's time between the two boundaries on
that stream, host work queued behind it included.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseTimer:
    """``mark = timer.start()`` at a step's start, ``mark = timer.tick(phase, mark)`` at the end
    of each phase; :attr:`totals` the cumulative seconds per phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def tick(self, name: str, mark: float | torch.cuda.Event) -> float | torch.cuda.Event:
        now = self.start()
        if isinstance(mark, float) or isinstance(now, float):
            assert isinstance(mark, float) and isinstance(now, float)
            self._totals[name] += now - mark
        else:
            self._pending.append((name, mark, now))
            if len(self._pending) > PENDING_EVENTS:  # nobody reads: fold in what has finished
                self._settle(wait=False)
        return now

    def _settle(self, wait: bool) -> None:
        done = 0
        for name, a, b in self._pending:  # recorded in stream order: they finish in order
            if not wait and not b.query():
                break
            b.synchronize()
            self._totals[name] += a.elapsed_time(b) / 1e3
            done += 1
        del self._pending[:done]

    @property
    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (on CUDA: waits for the recorded events)."""
        self._settle(wait=True)
        return self._totals


#: Unread CUDA intervals a timer keeps before folding in the finished ones.
PENDING_EVENTS = 256
