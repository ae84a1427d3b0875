"""build_scripts/gpu_check.sh and its Python half where there is no GPU: the script exits 77
before building anything, and the bandwidth table reads the kernel check's rows.
(On a GPU machine the script itself is the test; docs/gpu.md says whether it has run.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from redrafter_trt.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="an NVIDIA driver is present here"
)


@no_gpu
def test_script_exits_77_without_a_gpu_and_builds_nothing(tmp_path):
    build = tmp_path / "build"
    t0 = time.monotonic()
    r = subprocess.run(
        ["bash", str(ROOT / "build_scripts" / "gpu_check.sh")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "GPU_CHECK_BUILD_DIR": str(build), "PYTHON": sys.executable},
    )
    assert r.returncode == 77, r.stderr
    assert "no NVIDIA GPU" in r.stderr and not build.exists()
    assert time.monotonic() - t0 < 30


@pytest.mark.full
def test_python_half_exits_77_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = subprocess.run(
        [sys.executable, "-m", "redrafter_trt.bench.gpu_check", "torch", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == gpu_check.NO_GPU == 77, r.stderr


def kernel_row(op, cfg, ok, us, mb, gbs):
    # the row layout of cpp/tests/gpu_kernel_check.cu's report(): "%-12s %-44s %-4s %8.1f us %10.3f MB %8.1f GB/s"
    return f"{op:<12} {cfg:<44} {ok:<4} {us:8.1f} us {mb:10.3f} MB {gbs:8.1f} GB/s"


def test_kernel_table_reports_the_fraction_of_peak():
    log = "\n".join(
        [
            "device: NVIDIA H100 80GB HBM3 (sm_90)",
            kernel_row("beam_search", "bf16 B=8 W=4 V=152064 warp_k=8", "ok", 40.0, 9.733, 243.3),
            kernel_row("kv_relocate", "fp16 layers=32 B=8", "ok", 12.0, 40.2, 3350.0),
            "2 passed, 0 failed",
        ]
    )
    table, failed = gpu_check.kernel_table(log, 3350.0)
    rows = table.splitlines()
    assert failed == 0 and len(rows) == 3
    assert rows[1].split()[-1] == "7.3%" and rows[2].split()[-1] == "100.0%"
    _, failed = gpu_check.kernel_table(
        kernel_row("accept", "fp32 W=4", "FAIL", 1.0, 0.1, 100.0), None
    )
    assert failed == 1


def test_cost_shapes_are_llama_1b_and_7b():
    one, seven = gpu_check.SHAPES["llama-1b"], gpu_check.SHAPES["llama-7b"]
    for s in (one, seven):
        assert s["hidden_size"] == s["num_attention_heads"] * s["head_size"]

    def params(s):  # q, o full; k, v by the KV-head share; gate, up, down
        h, kv_share = s["hidden_size"], s["num_key_value_heads"] / s["num_attention_heads"]
        return s["num_hidden_layers"] * (
            h * h * (2 + 2 * kv_share) + 3 * h * s["intermediate_size"]
        )

    assert 0.9e9 < params(one) + 2 * one["vocab_size"] * one["hidden_size"] < 1.6e9
    assert 6.0e9 < params(seven) + 2 * seven["vocab_size"] * seven["hidden_size"] < 7.5e9
    assert gpu_check.TOKENS == tuple(range(1, 65))


def test_torch_part_runs_its_code_on_the_cpu():
    """The measurement code path on the CPU (timings meaningless): parity CPU vs CPU, a tiny
    model's curve over a few k and its draft cost, and the summary table built from them."""
    ok, ops = gpu_check.greedy_parity(num_prompts=2, max_new=6, device="cpu")
    assert ok and ops.startswith("torch")
    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_size=16,
    )
    c = gpu_check.cost_curve("tiny", shape, reps=1, device="cpu", tokens=(1, 2, 4))
    assert sorted(c.verify_ms) == [1, 2, 4] and all(v > 0 for v in c.verify_ms.values())
    assert set(c.draft_ms) == {"torch"} and c.draft_ms["torch"] > 0
    table = gpu_check.summary([c])
    assert "tiny" in table and "k=4" in table and "draft cost per beam step" in table
