"""``redrafter-bench --calibrate``: measure and store an engine's cost model, and report it.

Reports the t(k)/t(1) curve of the base forward, the draft cost per step, the machine's
memory-bandwidth floor for one plain step (weight bytes / measured one-thread copy bandwidth),
and the beam shape :class:`~redrafter_trt.runtime.adaptive.AdaptivePolicy` picks per batch size
with its predicted speed-up over plain decoding.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from ..backends.torch_backend import TorchBackend
from ..runtime.adaptive import AdaptivePolicy, CostModel, measure_cost_model, save_cost_model


def copy_bandwidth(mib: int = 64, repeats: int = 5) -> float:
    """Bytes per second a copy reads (its read+write traffic is twice that), best of ``repeats``."""
    a = torch.empty(mib * 2 ** 20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best


def weight_bytes(backend: TorchBackend) -> int:
    """Bytes one plain step reads: every base parameter except an untied input embedding."""
    base = backend.base
    tied = base.config.tie_word_embeddings
    return sum(p.numel() * p.element_size() for n, p in base.named_parameters()
               if tied or "vocab_embedding" not in n)


def calibration_report(model: CostModel, backend: TorchBackend, batch_sizes: Sequence[int],
                       prior: Sequence[float] | None = None) -> dict[str, Any]:
    w, d = backend.shape.num_beams, backend.shape.draft_len
    pol = AdaptivePolicy(model, w, d, prior=prior, probe_every=0)
    t1 = model.t(1)
    floor = weight_bytes(backend) / copy_bandwidth()
    return {
        "t_ms": {k: round(v * 1e3, 2) for k, v in sorted(model.verify.items())},
        "t_over_t1": {k: round(v / t1, 3) for k, v in sorted(model.verify.items())},
        "draft_step_ms": {k: round(v * 1e3, 2) for k, v in sorted(model.draft.items())},
        "bandwidth_floor_ms": round(floor * 1e3, 2),
        "t1_over_floor": round(t1 / floor, 2),
        "assumed_acceptance": [round(p, 3) for p in pol.survival[w]],
        "chosen": {b: {"shape": list(pol.choose(b)), "predicted_speedup": round(
            max(1.0, pol.best(b)[1]) if pol.choose(b)[1] else 1.0, 3),
            "best_speculative": list(pol.best(b)[0]), "its_predicted_speedup": round(pol.best(b)[1], 3)}
            for b in batch_sizes},
        "machine": model.machine, "load_average": model.load_average,
    }


def calibrate(backend: TorchBackend, engine_dir: str, batch_sizes: Sequence[int], repeats: int = 5,
              prior: Sequence[float] | None = None, log=None) -> dict[str, Any]:
    """Measure, store ``engine_dir/cost_model.json``, and return the report."""
    model = measure_cost_model(backend, repeats=repeats, log=log)
    path = save_cost_model(model, engine_dir)
    report = calibration_report(model, backend, batch_sizes, prior)
    report["cost_model_file"] = str(path)
    return report


def calibration_markdown(r: dict[str, Any]) -> str:
    ks = list(r["t_ms"])
    lines = ["| k (tokens per call) | " + " | ".join(map(str, ks)) + " |",
             "|---|" + "---|" * len(ks),
             "| t(k) ms | " + " | ".join(str(r["t_ms"][k]) for k in ks) + " |",
             "| t(k)/t(1) | " + " | ".join(str(r["t_over_t1"][k]) for k in ks) + " |", "",
             "draft step (ms) by beam rows: " + ", ".join(f"{k}: {v}" for k, v in r["draft_step_ms"].items()),
             f"bandwidth floor of a plain step: {r['bandwidth_floor_ms']} ms (t(1) = "
             f"{r['t1_over_floor']}x the floor)",
             f"assumed acceptance P(>= j), j = 1..D: {r['assumed_acceptance']}", "",
             "| batch | chosen (beams, depth) | predicted speed-up | best speculative | its prediction |",
             "|---|---|---|---|---|"]
    for b, c in r["chosen"].items():
        lines.append(f"| {b} | {tuple(c['shape'])} | {c['predicted_speedup']} | {tuple(c['best_speculative'])} "
                     f"| {c['its_predicted_speedup']} |")
    return "\n".join(lines) + "\n"
