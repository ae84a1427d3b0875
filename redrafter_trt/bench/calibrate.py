"""``redrafter-bench --calibrate``: measure and store an engine's cost model, and report it.

Reports the t(k)/t(1) curve of the base forward, the draft cost per step, the machine's
memory-bandwidth floor for one plain step (weight bytes / measured one-thread copy bandwidth),
and the beam shape :class:`~redrafter_trt.runtime.adaptive.AdaptivePolicy` picks per batch size
with its predicted speed-up over plain decoding.

A normal ``redrafter-bench`` run reports the same per run (:func:`bench_cost_model`,
:func:`cost_section`: the stored model when it matches this machine and engine, else one measured
in the run, saying why), the shape the policy picks per batch size given the acceptance measured
in the run, and for every configuration the speed-up the cost model predicts from the run's own
tokens per step next to the measured one (:func:`annotate_predictions`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..backends.torch_backend import TorchBackend
from ..errors import RedrafterError
from ..runtime.adaptive import (
    COST_MODEL_FILE,
    AdaptivePolicy,
    CostModel,
    load_cost_model,
    measure_cost_model,
    save_cost_model,
)


def copy_bandwidth(mib: int = 64, repeats: int = 5) -> float:
    """Bytes per second a copy reads (its read+write traffic is twice that), best of ``repeats``."""
    a = torch.empty(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best


def weight_bytes(backend: TorchBackend) -> int:
    """Bytes one plain step reads: every base weight as the step streams it (a projection on the
    CPU kernels: its packed panels, GGUF block panels or float32 / bf16 panels with their
    padding), each shared one once; the input embedding is a lookup of a few rows (a tied one
    is counted as the vocabulary projection)."""
    from ..models.base import Linear, StoredWeight

    base = backend.base
    seen, total = set(), 0
    for m in base.modules():
        if m is base.embedding:
            continue
        held: list[tuple[Any, int]] = [
            (p, p.numel() * p.element_size()) for p in m.parameters(recurse=False)
        ]
        if isinstance(m, Linear) and m.native and m.weight_device.type == "cpu":
            packed = m.packed_weight()
            held = [
                (p, p.numel() * p.element_size())
                for name, p in m.named_parameters(recurse=False)
                if name != "weight"
            ]
            held.append((packed.data, packed.nbytes))
        elif isinstance(m, StoredWeight) and m.streams_blocks():
            held.append((m.blocks, m.blocks.nbytes()))
        for obj, nbytes in held:
            if id(obj) not in seen:
                seen.add(id(obj))
                total += nbytes
    return total


#: rows per call (M) of the linear-work table
LINEAR_ROWS = (1, 4, 8, 17, 33, 64)


@torch.inference_mode()
def linear_work(
    backend: TorchBackend, rows: Sequence[int] = LINEAR_ROWS, repeats: int = 3
) -> dict[int, dict[str, float]]:
    """Seconds of one forward's linear work (every base projection and the vocabulary
    projection, on the engine's own weights) per rows M in the call: on the batch-invariant
    kernel (``kernel_s``) and on torch's ``F.linear`` (``torch_s``), interleaved, best of
    ``repeats``; with the bytes and flops each call moves."""
    from .. import native
    from ..models.base import Linear

    layers = [m for m in backend.base.modules() if isinstance(m, Linear)]
    madds = sum(m.in_features * m.out_features for m in layers)
    packed = [m.packed_weight() for m in layers] if native.linear_available() else None
    # the bytes the kernel streams (block panels for GGUF block weights), else the weights'
    # torch's F.linear reads float32 / bf16 weights: a layer whose stored form (GGUF blocks,
    # kernel panels) stands in for its weight is compared on its exact values, decoded here for
    # the run (not kept by the layer)
    dense = [m.weight_values() for m in layers]
    tbytes = sum(w.numel() * w.element_size() for w in dense)
    wbytes = sum(p.nbytes for p in packed) if packed else tbytes
    g = torch.Generator().manual_seed(0)
    out: dict[int, dict[str, float]] = {}
    for m_rows in rows:
        xs = {
            k: torch.randn(m_rows, k, generator=g).to(backend.dtype)
            for k in {m.in_features for m in layers}
        }

        def run_kernel(xs=xs):
            for m, p in zip(layers, packed):
                native.linear_packed(xs[m.in_features], p, m.bias)

        def run_torch(xs=xs):
            for m, w in zip(layers, dense):
                torch.nn.functional.linear(xs[m.in_features], w, m.bias)

        best = {"kernel_s": float("inf"), "torch_s": float("inf")}
        for _ in range(repeats + 1):
            for name, fn in (("kernel_s", run_kernel), ("torch_s", run_torch)):
                if name == "kernel_s" and packed is None:
                    continue
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        out[m_rows] = {**best, "bytes": wbytes, "torch_bytes": tbytes, "flops": 2 * m_rows * madds}
    return out


def limits_section(backend: TorchBackend, rows: Sequence[int] = LINEAR_ROWS) -> dict[str, Any]:
    """The machine's limits measured now, and the linear work per M against them."""
    from .. import native

    lim = native.machine_limits()
    work = linear_work(backend, rows)
    bw, peak = lim["read_bytes_per_s"], lim["fma_flops_per_s"]
    table = {}
    for m, w in work.items():
        row = {"torch_ms": round(w["torch_s"] * 1e3, 2)}
        if w["kernel_s"] < float("inf"):
            row.update(
                kernel_ms=round(w["kernel_s"] * 1e3, 2),
                kernel_over_torch=round(w["torch_s"] / w["kernel_s"], 2),
                kernel_of_read_bandwidth=round(w["bytes"] / w["kernel_s"] / bw, 3),
                kernel_of_fma_peak=round(w["flops"] / w["kernel_s"] / peak, 3) if peak else None,
            )
        row["torch_of_read_bandwidth"] = round(w["torch_bytes"] / w["torch_s"] / bw, 3)
        row["torch_of_fma_peak"] = round(w["flops"] / w["torch_s"] / peak, 3) if peak else None
        table[m] = row
    return {
        "threads": lim["threads"],
        "simd": lim["simd"],
        "read_gb_per_s": round(bw / 1e9, 2),
        "read_gb_per_s_1_thread": round(lim["read_bytes_per_s_1_thread"] / 1e9, 2),
        "fma_gflop_per_s": round(peak / 1e9, 1),
        "linear_weight_mb": round(next(iter(work.values()))["bytes"] / 1e6, 1),
        "linear_work": table,
    }


def calibration_report(
    model: CostModel,
    backend: TorchBackend,
    batch_sizes: Sequence[int],
    prior: Sequence[float] | None = None,
    limits: bool = False,
) -> dict[str, Any]:
    w, d = backend.shape.num_beams, backend.shape.draft_len
    pol = AdaptivePolicy(model, w, d, prior=prior, probe_every=0)
    t1 = model.t(1)
    floor = weight_bytes(backend) / copy_bandwidth()
    extra = {"limits": limits_section(backend)} if limits and backend.device.type == "cpu" else {}
    return {
        **extra,
        "t_ms": {k: round(v * 1e3, 3) for k, v in sorted(model.verify.items())},
        "t_over_t1": {k: round(v / t1, 3) for k, v in sorted(model.verify.items())},
        "draft_step_ms": {k: round(v * 1e3, 3) for k, v in sorted(model.draft.items())},
        "bandwidth_floor_ms": round(floor * 1e3, 4),
        "t1_over_floor": round(t1 / floor, 2),
        "assumed_acceptance": [round(p, 3) for p in pol.survival[w]],
        "chosen": {
            b: {
                "shape": list(pol.choose(b)),
                "predicted_speedup": round(
                    max(1.0, pol.best(b)[1]) if pol.choose(b)[1] else 1.0, 3
                ),
                "best_speculative": list(pol.best(b)[0]),
                "its_predicted_speedup": round(pol.best(b)[1], 3),
            }
            for b in batch_sizes
        },
        "machine": model.machine,
        "load_average": model.load_average,
    }


def calibrate(
    backend: TorchBackend,
    engine_dir: str,
    batch_sizes: Sequence[int],
    repeats: int = 5,
    prior: Sequence[float] | None = None,
    log=None,
) -> dict[str, Any]:
    """Measure, store ``engine_dir/cost_model.json``, and return the report."""
    model = measure_cost_model(backend, repeats=repeats, log=log)
    path = save_cost_model(model, engine_dir)
    report = calibration_report(model, backend, batch_sizes, prior, limits=True)
    report["cost_model_file"] = str(path)
    return report


def limits_markdown(lim: dict[str, Any]) -> list[str]:
    lines = [
        f"machine limits ({lim['threads']} threads, kernels on their {lim['simd']} path): "
        f"read {lim['read_gb_per_s']} GB/s ({lim['read_gb_per_s_1_thread']} with 1 thread), "
        "float32 FMA peak "
        f"{lim['fma_gflop_per_s']} GFLOP/s; linear weights {lim['linear_weight_mb']} MB per forward",
        "",
        "| M (rows per call) | kernel ms | torch ms | kernel/torch speed | kernel: of read bandwidth "
        "| kernel: of FMA peak | torch: of read bandwidth | torch: of FMA peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in lim["linear_work"].items():
        lines.append(
            f"| {m} | {r.get('kernel_ms', '-')} | {r['torch_ms']} | {r.get('kernel_over_torch', '-')} "
            f"| {r.get('kernel_of_read_bandwidth', '-')} | {r.get('kernel_of_fma_peak', '-')} "
            f"| {r['torch_of_read_bandwidth']} | {r['torch_of_fma_peak']} |"
        )
    return lines + [""]


def calibration_markdown(r: dict[str, Any]) -> str:
    ks = list(r["t_ms"])
    lines = [
        *(limits_markdown(r["limits"]) if "limits" in r else []),
        "| k (tokens per call) | " + " | ".join(map(str, ks)) + " |",
        "|---|" + "---|" * len(ks),
        "| t(k) ms | " + " | ".join(str(r["t_ms"][k]) for k in ks) + " |",
        "| t(k)/t(1) | " + " | ".join(str(r["t_over_t1"][k]) for k in ks) + " |",
        "",
        "draft step (ms) by beam rows: "
        + ", ".join(f"{k}: {v}" for k, v in r["draft_step_ms"].items()),
        f"bandwidth floor of a plain step: {r['bandwidth_floor_ms']} ms (t(1) = "
        f"{r['t1_over_floor']}x the floor)",
        f"acceptance P(>= j), j = 1..D ({r.get('acceptance_source', 'assumed')}): "
        f"{r['assumed_acceptance']}",
        "",
        "| batch | chosen (beams, depth) | predicted speed-up | best speculative | its prediction |",
        "|---|---|---|---|---|",
    ]
    for b, c in r["chosen"].items():
        lines.append(
            f"| {b} | {tuple(c['shape'])} | {c['predicted_speedup']} | {tuple(c['best_speculative'])} "
            f"| {c['its_predicted_speedup']} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- normal bench runs
class ChoiceLog(AdaptivePolicy):
    """:class:`AdaptivePolicy` that records every (batch size, chosen shape) it returns."""

    def __init__(self, cost: CostModel, max_beams: int, max_draft_steps: int, **kw):
        super().__init__(cost, max_beams, max_draft_steps, **kw)
        self.steps: list[tuple[int, tuple[int, int]]] = []

    def choose(self, batch_size: int) -> tuple[int, int]:
        shape = super().choose(batch_size)
        self.steps.append((int(batch_size), (int(shape[0]), int(shape[1]))))
        return shape

    def counts(self) -> list[dict[str, Any]]:
        """[{"batch": b, "shape": "WxD" ("1x0" = plain), "steps": n}] in first-seen order."""
        n: dict[tuple[int, tuple[int, int]], int] = {}
        for key in self.steps:
            n[key] = n.get(key, 0) + 1
        return [{"batch": b, "shape": f"{w}x{d}", "steps": c} for (b, (w, d)), c in n.items()]


def bench_cost_model(
    backend: Any, engine_dir: str | None, repeats: int = 3, log=None
) -> tuple[CostModel | None, str]:
    """The cost model a bench run reports and its adaptive configuration uses, and where it came
    from: ``engine_dir``'s stored one when it matches this machine and engine; else measured now
    (nothing is written; ``--calibrate`` stores one), saying why; None for a backend without
    torch weights."""
    if getattr(backend, "base", None) is None or getattr(backend, "name", None) != "torch":
        return None, (
            f"not measured: the {getattr(backend, 'name', '?')} backend has no torch base "
            "to time in this process (the cost model needs the torch backend on one rank)"
        )
    why = f"no {COST_MODEL_FILE} in the engine directory" if engine_dir else "no engine directory"
    if engine_dir is not None:
        try:
            stored = load_cost_model(engine_dir, backend)
        except RedrafterError as e:
            stored, why = None, str(e)
        if stored is not None:
            return (
                stored,
                f"stored {Path(engine_dir) / COST_MODEL_FILE} (measured {stored.measured_at})",
            )
    if log:
        log(f"[bench] measuring the cost model ({why})")
    model = measure_cost_model(backend, repeats=repeats, log=log)
    return model, f"measured in this run ({why}); redrafter-bench --calibrate stores one"


def _cost_ratio(model: CostModel, batch: int, shape: tuple[int, ...]) -> float:
    return model.step_cost(batch, *shape) / model.t(batch)


def annotate_predictions(configs: list[dict[str, Any]], model: CostModel) -> None:
    """Set each configuration's ``predicted_speedup``: its measured speculative tokens per step
    over the predicted cost of its steps relative to plain ones (``step_cost / t(batch)``; the
    adaptive configuration's recorded choices, averaged; prefill not modelled)."""
    for c in configs:
        tps = c["speculative"]["tokens_per_step"]
        if c["chosen_shapes"] is not None:
            steps = sum(x["steps"] for x in c["chosen_shapes"])
            if not steps:
                continue
            ratio = (
                sum(
                    x["steps"]
                    * _cost_ratio(model, x["batch"], tuple(int(v) for v in x["shape"].split("x")))
                    for x in c["chosen_shapes"]
                )
                / steps
            )
        else:
            ratio = _cost_ratio(model, c["batch_size"], (c["num_beams"], c["draft_len"]))
        c["predicted_speedup"] = round(tps / ratio, 3)


def cost_section(
    model: CostModel | None,
    source: str,
    backend: Any,
    configs: list[dict[str, Any]],
    batch_sizes: Sequence[int],
) -> dict[str, Any]:
    """The report's ``cost_model`` part: :func:`calibration_report` with the acceptance measured
    in this run at the engine's own shape (pooled over batch sizes) as the policy's estimate."""
    if model is None:
        return {"source": source}
    w, d = backend.shape.num_beams, backend.shape.draft_len
    own = [
        c
        for c in configs
        if (c["num_beams"], c["draft_len"]) == (w, d) and c["chosen_shapes"] is None
    ]
    prior = None
    if own:
        rates = [c["speculative"]["acceptance_rate_per_depth"] for c in own]
        prior = [min(1.0, max(0.0, sum(r[j] for r in rates) / len(rates))) for j in range(d)]
    rep = calibration_report(model, backend, batch_sizes, prior)
    rep["source"] = source
    rep["acceptance_source"] = (
        "measured in this run at the engine's shape" if prior is not None else "assumed 0.6^j"
    )
    return rep


def cost_markdown(r: dict[str, Any]) -> str:
    """The report's cost-model section as Markdown (empty-model case: one line)."""
    head = f"Cost model: {r['source']}."
    if "t_ms" not in r:
        return head + "\n"
    return head + "\n\n" + calibration_markdown(r)
