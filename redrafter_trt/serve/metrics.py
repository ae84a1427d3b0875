"""Prometheus metrics of the server (prometheus-client, a private registry per app)."""

from __future__ import annotations

import threading
import time

from ..runtime.scheduler import Request, Scheduler, StepReport


class ServeMetrics:
    """Requests, queue depth, batch occupancy, tokens/s, step time, tokens per step and the
    acceptance rate per draft depth (``redrafter_draft_accepted_total{depth=k}`` counts the
    generation row-steps that accepted at least k draft tokens; divide by
    ``redrafter_generation_row_steps_total``)."""

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.scheduler = scheduler
        self.requests = Counter(
            "redrafter_requests",
            "Requests by outcome (ok, cancelled, HTTP status)",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge("redrafter_queue_depth", "Requests waiting for a slot", registry=r)
        self.live = Gauge("redrafter_batch_rows", "Rows in the running batch", registry=r)
        self.occupancy = Gauge("redrafter_batch_occupancy", "Running rows / KV slots", registry=r)
        self.tokens = Counter("redrafter_output_tokens", "Output tokens emitted", registry=r)
        self.tps = Gauge(
            "redrafter_output_tokens_per_second",
            "Output tokens per second over the last 5 s of steps",
            registry=r,
        )
        self.step_time = Histogram(
            "redrafter_step_seconds",
            "Wall time of one scheduler iteration",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.row_tokens = Histogram(
            "redrafter_tokens_per_step",
            "Tokens one generation row gained per step",
            buckets=tuple(range(1, scheduler.shape.beam_len + 1)),
            registry=r,
        )
        self.row_steps = Counter(
            "redrafter_generation_row_steps", "Generation row-steps", registry=r
        )
        self.accepted = Counter(
            "redrafter_draft_accepted",
            "Row-steps accepting at least `depth` draft tokens",
            ["depth"],
            registry=r,
        )
        for k in range(1, scheduler.shape.draft_len + 1):
            self.accepted.labels(depth=str(k))
        self._window: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        scheduler.step_listener = self.on_step

    def on_step(self, rep: StepReport) -> None:
        now = time.monotonic()
        self.queue_depth.set(rep.queue_depth)
        self.live.set(rep.live_rows)
        self.occupancy.set(rep.live_rows / max(self.scheduler.num_slots, 1))
        self.tokens.inc(rep.emitted_tokens)
        self.step_time.observe(rep.seconds)
        for n in rep.accepted:
            self.row_steps.inc()
            self.row_tokens.observe(n + 1)
            for k in range(1, n + 1):
                self.accepted.labels(depth=str(k)).inc()
        with self._lock:
            self._window.append((now, rep.emitted_tokens))
            self._window = [(t, n) for t, n in self._window if t > now - 5.0]
            span = now - self._window[0][0] if len(self._window) > 1 else 0.0
            self.tps.set(sum(n for _, n in self._window[1:]) / span if span > 0 else 0.0)

    def finished(self, req: Request) -> None:
        self.requests.labels(outcome="ok").inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        s = self.scheduler
        self.queue_depth.set(s.queue_depth)
        self.live.set(s.live_rows)
        self.occupancy.set(s.live_rows / max(s.num_slots, 1))
        return generate_latest(self.registry)
