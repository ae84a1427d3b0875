"""Per-step host work of the in-flight scheduler around the model, on the CPU.

Runs a fixed workload (8 requests, greedy, a W=4 x D=4 tree, a small random Llama in float32)
through :class:`~redrafter_trt.runtime.scheduler.Scheduler` and, for every iteration that is one
generation call, reports:

- the main thread's CPU time (``time.thread_time``: waiting for a core does not count) of the
  whole iteration, of the model inside it (base forward, logits, draft head) and the rest: the
  scheduler's packing and output handling, the backend's input handling, acceptance, relocation
  and tree packing; medians over the steps of ``--repeats`` runs;
- counts that do not depend on the machine's load: the torch operators dispatched outside the
  model per step, and the tensor elements they produce (``TorchDispatchMode``), split into the
  scheduler's side and the backend's.

Uses only the public API, so the same script measures any checkout:
``cd <checkout> && OMP_NUM_THREADS=1 python build_scripts/step_host_time.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.getcwd())  # the checkout to measure, not an installed copy

import redrafter_trt
from redrafter_trt.backends.torch_backend import TorchBackend
from redrafter_trt.models.base import BaseConfig, BaseModel
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.runtime.scheduler import SamplingParams, Scheduler


class Where:
    """Which side the current thread is on: "sched", "backend" or "model"."""

    side = "sched"


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = defaultdict(int)
        self.elems: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if Where.side != "model":
            self.ops[Where.side] += 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.elems[Where.side] += t.numel()
        return out


def timed(fn, side, clock):
    def wrapper(*a, **k):
        prev, Where.side = Where.side, side
        t0 = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            clock[side] += time.thread_time() - t0
            Where.side = prev

    return wrapper


def make_backend() -> TorchBackend:
    torch.manual_seed(0)
    cfg = BaseConfig("LlamaForCausalLM", 1000, 128, 256, 2, 4, 2, 32)
    base = BaseModel(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    head = init_drafter(DrafterConfig(1000, 128, 256, 1, True), seed=0, std=0.3)
    return TorchBackend(base.float(), head.float(), 4, 4, max_batch_size=8, max_seq_len=512)


def run(be: TorchBackend, count: bool) -> list[dict[str, float]]:
    clock: dict[str, float] = defaultdict(float)
    base, head = be.base, be.drafter
    base.forward = timed(base.forward, "model", clock)
    base.logits = timed(base.logits, "model", clock)
    head.beam_search = timed(head.beam_search, "model", clock)
    be.step = timed(be.step, "backend", clock)
    counter = Counter() if count else None
    steps = []
    try:
        s = Scheduler(be, max_slots=8, tokens_per_slot=160)
        reqs = [
            s.submit(
                [(7 * i + 13 * j) % 1000 for j in range(24)],
                SamplingParams(max_new_tokens=96, ignore_eos=True),
            )
            for i in range(8)
        ]
        while not all(r.finished for r in reqs):
            gen_only = all(r.slot is not None and not r.prefilling for r in reqs if not r.finished)
            clock.clear()
            if counter is not None:
                counter.ops.clear()
                counter.elems.clear()
                with counter:
                    t0 = time.thread_time()
                    s.step()
            else:
                t0 = time.thread_time()
                s.step()
            total = time.thread_time() - t0
            if gen_only:
                row = {
                    "total": total,
                    "model": clock["model"],
                    "backend_excl_model": clock["backend"] - clock["model"],
                    "scheduler": total - clock["backend"],
                }
                if counter is not None:
                    for side in ("sched", "backend"):
                        row[f"ops_{side}"] = counter.ops[side]
                        row[f"elems_{side}"] = counter.elems[side]
                steps.append(row)
    finally:
        del base.forward, base.logits, head.beam_search, be.step
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    be = make_backend()
    run(be, count=False)  # warm-up
    rows = [r for _ in range(args.repeats) for r in run(be, count=False)]
    counted = run(be, count=True)
    where = os.path.dirname(redrafter_trt.__file__)
    print(f"{where}: native_linear={be.native_linear}, {len(rows)} generation steps timed")
    for k in ("total", "model", "backend_excl_model", "scheduler"):
        v = [r[k] * 1e6 for r in rows]
        q = statistics.quantiles(v, n=4)
        print(
            f"  {k:>20}: median {statistics.median(v):9.1f} us  (quartiles {q[0]:.1f}..{q[2]:.1f})"
        )
    outside = [(r["total"] - r["model"]) * 1e6 for r in rows]
    print(f"  {'outside the model':>20}: median {statistics.median(outside):9.1f} us")
    for k in ("ops_sched", "ops_backend", "elems_sched", "elems_backend"):
        v = [r[k] for r in counted]
        print(
            f"  {k:>20}: median {statistics.median(v):9.0f} per step (min {min(v)}, max {max(v)})"
        )


if __name__ == "__main__":
    main()
