"""The Python half of ``build_scripts/gpu_check.sh`` (a CUDA GPU with PyTorch, no TensorRT).

Subcommands (``python -m redrafter_trt.bench.gpu_check CMD``):

- ``peak``: the device's peak DRAM bandwidth in GB/s (CUDA driver: memory clock x bus width x 2).
- ``kernels LOG``: the kernel check's table (``redrafter_gpu_check`` output) with each row's
  achieved bandwidth as a fraction of that peak.
- ``torch``: the torch backend on CUDA: which operators ran (cpp/ kernels or PyTorch), greedy
  parity with the CPU on a tiny random model, then on randomly initialised models shaped like a
  1B and a 7B Llama in bf16: the verify cost curve t(k)/t(1) for k = 1..64 tokens per row and the
  draft cost per beam step; one summary table. ``--quick`` shrinks the shapes (a smoke run).

Nothing is downloaded and no model file is read: every model is generated here.
Exit status: 0 all checks passed, 1 a parity or kernel failure, 77 no CUDA device.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NO_GPU = 77
#: Models the cost curves are measured on (random weights): Llama-3.2-1B and Llama-2-7B shapes.
SHAPES = {
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_size=64,
    ),
    "llama-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_size=128,
    ),
}
QUICK_SHAPES = {
    "llama-1b/8": dict(
        vocab_size=16032,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_size=64,
    ),
}
TOKENS = tuple(range(1, 65))
CACHE_LEN = 512


def peak_bandwidth_gbs(device: int = 0) -> float | None:
    """Peak DRAM bandwidth from the CUDA driver (``cuDeviceGetAttribute`` memory clock in kHz and
    bus width in bits; DDR: two transfers per clock); None where the driver does not say."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, clock, width = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cu.cuInit(0) != 0 or cu.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE = 36, CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH = 37
    if cu.cuDeviceGetAttribute(ctypes.byref(clock), 36, dev) or cu.cuDeviceGetAttribute(
        ctypes.byref(width), 37, dev
    ):
        return None
    if clock.value <= 0 or width.value <= 0:
        return None
    return 2.0 * clock.value * 1e3 * width.value / 8 / 1e9


ROW = re.compile(
    r"^(?P<op>\S+)\s+(?P<cfg>.+?)\s+(?P<ok>ok|FAIL)\s+(?P<us>[\d.]+) us\s+(?P<mb>[\d.]+) MB\s+"
    r"(?P<gbs>[\d.]+) GB/s"
)


def kernel_table(log: str, peak: float | None) -> tuple[str, int]:
    """The kernel check's rows with ``GB/s / peak``; and the number of failed rows."""
    lines, failed = [], 0
    head = f"{'kernel':<12} {'config':<44} {'ok':<4} {'us':>9} {'GB/s':>8} {'of peak':>8}"
    lines.append(head)
    for raw in log.splitlines():
        m = ROW.match(raw.strip())
        if not m:
            continue
        gbs = float(m["gbs"])
        failed += m["ok"] != "ok"
        frac = f"{gbs / peak:8.1%}" if peak else f"{'?':>8}"
        lines.append(
            f"{m['op']:<12} {m['cfg']:<44} {m['ok']:<4} {float(m['us']):9.1f} {gbs:8.1f} {frac}"
        )
    return "\n".join(lines), failed


# --------------------------------------------------------------------------- torch backend on CUDA
def _time(fn, reps: int, device, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (CUDA events on a CUDA device, else wall clock)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.device(device).type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def greedy_parity(
    num_prompts: int = 4, max_new: int = 24, device: str = "cuda"
) -> tuple[bool, str]:
    """Same random tiny model (float64) on the CPU and on ``device``: identical greedy tokens,
    speculative and plain. Returns (ok, the ``device`` backend's operator set and why)."""
    import torch

    from ..backends.torch_backend import TorchBackend
    from ..models.base import ARCH_LLAMA, BaseConfig, BaseModel
    from ..models.drafter import DrafterConfig, init_drafter
    from ..runtime import Generator

    torch.manual_seed(0)
    cfg = BaseConfig(
        architecture=ARCH_LLAMA,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_size=16,
    )
    base = BaseModel(cfg).double().eval()
    drafter = init_drafter(
        DrafterConfig(cfg.vocab_size, 64, 128, 1, True), seed=1, std=0.5
    ).double()
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(0, cfg.vocab_size, (int(n),), generator=g).tolist() for n in (5, 9, 17, 33)
    ][:num_prompts]
    outs, ops = [], ""
    for i, dev in enumerate(("cpu", device)):
        be = TorchBackend(
            base.to(dev),
            drafter.to(dev),
            4,
            3,
            warp_k=8,
            max_batch_size=4,
            max_input_len=64,
            max_seq_len=128,
        )
        gen = Generator(be)
        outs.append(
            [
                [r.token_ids for r in gen.generate(prompts, max_new_tokens=max_new, speculative=s)]
                for s in (True, False)
            ]
        )
        if i == 1:
            ops = f"{be.ops.name} ({be.ops.reason})"
    cpu, gpu = outs
    ok = cpu == gpu and cpu[0] == cpu[1]
    return ok, ops


@dataclass
class Curve:
    model: str
    verify_ms: dict[int, float]
    draft_ms: dict[str, float]  # per beam step, by operator set


def cost_curve(name: str, shape: dict, reps: int, device: str = "cuda", tokens=TOKENS) -> Curve:
    """t(k) of one verify call (batch 1, k tokens, tree-style mask, CACHE_LEN cached tokens) and the
    draft cost per beam step (W = 4: RNN state, head, beam-search step) in bf16."""
    import torch

    from ..backends import cuda_ops
    from ..models.base import ARCH_LLAMA, BaseConfig, BaseModel
    from ..models.drafter import DrafterConfig, init_drafter

    dev, dt = torch.device(device), torch.bfloat16
    torch.manual_seed(0)
    cfg = BaseConfig(architecture=ARCH_LLAMA, **shape)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with dev:  # built in place on the device, in bf16 (a 7B model never exists in fp32)
            base = BaseModel(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    # init_drafter draws from a CPU generator: built on the CPU, then moved
    drafter = init_drafter(
        DrafterConfig(cfg.vocab_size, cfg.hidden_size, 2 * cfg.hidden_size, 1, True), seed=1
    ).to(dev, dt)
    cache = base.new_cache(1, CACHE_LEN + max(tokens) + 1)
    slots = torch.zeros(1, dtype=torch.int64, device=dev)
    cache_len = torch.full((1,), CACHE_LEN, dtype=torch.int64, device=dev)
    verify = {}
    with torch.inference_mode():
        for k in tokens:
            ids = torch.randint(0, cfg.vocab_size, (1, k), device=dev)
            pos = cache_len[:, None] + torch.arange(k, device=dev)[None]
            mask = torch.ones(k, k, dtype=torch.bool, device=dev).tril()[None]
            verify[k] = 1e3 * _time(
                lambda ids=ids, pos=pos, mask=mask: base.logits(
                    base(ids, pos, cache, slots, cache_len, mask)
                ),
                reps,
                dev,
            )
        w = 4
        ctx = torch.randn(1, w, cfg.hidden_size, device=dev, dtype=dt)
        state = torch.zeros_like(ctx)
        tok = torch.randint(0, cfg.vocab_size, (1, w), device=dev)
        scores = torch.zeros(1, w, device=dev)
        draft = {}
        sets: list[tuple[str, Callable[..., Any]]] = [("torch", cuda_ops.TORCH_OPS[2])]
        if cuda_ops.select_ops(dev).name == cuda_ops.KERNEL:
            sets.append(("kernel", cuda_ops.KERNEL_OPS[2]))
        for label, step in sets:

            def one(step=step):
                s = drafter.update_state(state, base.embedding(tok).to(dt))
                return step(drafter.logits(ctx, s), scores, 8)

            draft[label] = 1e3 * _time(one, reps, dev)
    base = drafter = cache = None  # release the model before emptying the CUDA cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return Curve(name, verify, draft)


def summary(curves: list[Curve]) -> str:
    cols = tuple(
        k for k in (1, 2, 4, 8, 16, 20, 24, 32, 40, 48, 64) if all(k in c.verify_ms for c in curves)
    )
    out = [
        f"verify cost t(k)/t(1) (batch 1, bf16, {CACHE_LEN} cached tokens; t(1) in ms):",
        f"{'model':<12} {'t(1) ms':>8} " + " ".join(f"{'k=' + str(k):>6}" for k in cols),
    ]
    for c in curves:
        t1 = c.verify_ms[1]
        ratios = " ".join(f"{c.verify_ms[k] / t1:6.2f}" for k in cols if k in c.verify_ms)
        out.append(f"{c.model:<12} {t1:8.3f} {ratios}")
    out.append("full curve (k: t(k)/t(1)):")
    for c in curves:
        t1 = c.verify_ms[1]
        out.append(
            f"  {c.model}: "
            + " ".join(f"{k}:{c.verify_ms[k] / t1:.2f}" for k in sorted(c.verify_ms))
        )
    out.append("draft cost per beam step (W=4; RNN state + head + beam-search step), ms:")
    for c in curves:
        out.append(
            f"  {c.model}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in c.draft_ms.items())
            + f"  (= {c.draft_ms['torch'] / c.verify_ms[1]:.2f} x t(1) with torch ops)"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m redrafter_trt.bench.gpu_check", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("peak", help="print the device's peak DRAM bandwidth (GB/s)")
    k = sub.add_parser(
        "kernels", help="annotate a redrafter_gpu_check log with the fraction of peak bandwidth"
    )
    k.add_argument("log", help="file holding redrafter_gpu_check's output")
    t = sub.add_parser("torch", help="torch backend on CUDA: parity, verify cost curve, draft cost")
    t.add_argument(
        "--quick", action="store_true", help="small shapes and few repetitions (smoke run)"
    )
    t.add_argument(
        "--reps", type=int, default=10, help="timed repetitions per point (median; default 10)"
    )
    a = ap.parse_args(argv)
    if a.cmd == "kernels":
        with open(a.log) as f:
            table, failed = kernel_table(f.read(), peak_bandwidth_gbs())
        print(table)
        return 1 if failed else 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: PyTorch sees no CUDA device", file=sys.stderr)
        return NO_GPU
    if a.cmd == "peak":
        p = peak_bandwidth_gbs()
        print(f"{p:.1f}" if p else "unknown")
        return 0
    t0 = time.perf_counter()
    ok, ops = greedy_parity()
    print(f"torch backend on CUDA uses: {ops}")
    print(
        f"greedy parity CPU vs CUDA (speculative and plain, tiny random model, float64): {'ok' if ok else 'FAIL'}"
    )
    shapes = QUICK_SHAPES if a.quick else SHAPES
    reps = 3 if a.quick else a.reps
    curves = []
    for name, shape in shapes.items():
        t1 = time.perf_counter()
        curves.append(cost_curve(name, shape, reps))
        print(f"[gpu_check] {name}: measured in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    print(summary(curves))
    print(f"[gpu_check] torch part: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
