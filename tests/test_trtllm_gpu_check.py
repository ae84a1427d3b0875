"""build_scripts/gpu_check.sh and its Python half where there is no GPU.

The script's checks before the build are rehearsed as a bare machine would meet them: each test
runs it with a PATH holding only the system's ordinary tools plus the fake CUDA pieces it names
(``nvidia-smi``, ``nvcc``, ``cmake`` and a Python as shell scripts printing what the real ones
print), and checks the message and the exit status; nothing may be configured or built. The
bandwidth table reads the kernel check's rows. (On a GPU machine the script itself is the test;
docs/gpu.md says whether it has run.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from redrafter_trt.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "build_scripts" / "gpu_check.sh"
#: what the sandbox PATH must not offer from the system (the pieces each test fakes or leaves out)
WITHHELD = re.compile(r"^(nvidia-smi|nvcc|cmake|ctest|python.*|pip.*|ninja)$")


@pytest.fixture(scope="module")
def system_bin(tmp_path_factory) -> Path:
    """/usr/bin and /bin as links, less the CUDA pieces, cmake and every Python."""
    d = tmp_path_factory.mktemp("system-bin")
    for src in (Path("/usr/bin"), Path("/bin")):
        if not src.is_dir():
            continue
        for f in src.iterdir():
            if not WITHHELD.match(f.name) and not (d / f.name).exists() and os.access(f, os.X_OK):
                (d / f.name).symlink_to(f)
    return d


def fake(bin_dir: Path, name: str, body: str) -> None:
    f = bin_dir / name
    f.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    f.chmod(0o755)


def fake_nvidia_smi(bin_dir: Path, driver_cuda="12.4", gpus=True) -> None:
    listing = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'" if gpus else "exit 6"
    fake(
        bin_dir,
        "nvidia-smi",
        f"""
        case "$*" in
          -L) {listing} ;;
          *name,compute_cap*) echo 'NVIDIA H100 80GB HBM3, 9.0, 550.54.15, 81559 MiB' ;;
          *compute_cap*) echo '9.0' ;;
          '') echo '| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: {driver_cuda}     |' ;;
          *) exit 9 ;;
        esac
        """,
    )


def fake_nvcc(bin_dir: Path, cuda="12.4") -> None:
    fake(bin_dir, "nvcc", f"echo 'Cuda compilation tools, release {cuda}, V{cuda}.99'\n")


def fake_cmake(bin_dir: Path, version="3.22.1") -> Path:
    """``cmake --version``; any other call is recorded in ``cmake.calls`` and fails."""
    calls = bin_dir / "cmake.calls"
    fake(
        bin_dir,
        "cmake",
        f"""
        if [ "$1" = --version ]; then echo 'cmake version {version}'; exit 0; fi
        echo "$*" >> '{calls}'
        exit 1
        """,
    )
    return calls


def fake_python_with_cuda(bin_dir: Path) -> Path:
    """A Python whose numpy and torch are there and whose torch sees a GPU (to reach the build)."""
    f = bin_dir / "fakepython"
    f.write_text(
        textwrap.dedent("""\
        #!/bin/bash
        case "$*" in
          *find_spec*) echo '' ;;
          *torch.cuda.is_available*) echo 'PyTorch 2.9.0 CUDA 12.4' >&2 ;;
          *) exit 3 ;;
        esac
        """)
    )
    f.chmod(0o755)
    return f


def run_check(
    tmp_path: Path, fake_bin: Path, system_bin: Path, **env
) -> subprocess.CompletedProcess:
    build = tmp_path / "build"
    base = {
        "PATH": f"{fake_bin}:{system_bin}",
        "HOME": str(tmp_path),
        "GPU_CHECK_BUILD_DIR": str(build),
        "GPU_CHECK_NVCC_DIRS": str(tmp_path / "no-cuda" / "bin"),
        "PYTHON": sys.executable,
    }
    t0 = time.monotonic()
    r = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, env={**base, **env}
    )
    assert time.monotonic() - t0 < 60, "the checks before the build must be quick"
    assert not build.exists(), f"{build} was created before the prerequisites passed:\n{r.stderr}"
    return r


def expect(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    msg = f"exit {r.returncode}, expected {code}; stderr:\n{r.stderr}"
    assert r.returncode == code, msg
    for w in words:
        assert w in r.stderr, f"{w!r} not in the message; {msg}"


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    d = tmp_path / "fake-bin"
    d.mkdir()
    return d


def test_sandbox_path_has_no_cuda_pieces(system_bin):
    for name in ("nvidia-smi", "nvcc", "cmake", "python3"):
        assert not (system_bin / name).exists(), name
    assert (system_bin / "bash").exists() and (system_bin / "sed").exists()


def test_no_nvidia_smi_exits_77(tmp_path, fake_bin, system_bin):
    r = run_check(tmp_path, fake_bin, system_bin)
    expect(r, 77, "no NVIDIA GPU visible", "nothing built or run")


def test_nvidia_smi_listing_no_gpu_exits_77(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin, gpus=False)
    expect(run_check(tmp_path, fake_bin, system_bin), 77, "no NVIDIA GPU visible")


def test_missing_python_exits_2(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin)
    r = run_check(tmp_path, fake_bin, system_bin, PYTHON=str(tmp_path / "no-python"))
    expect(r, 2, "Python not found", "numpy and torch")


def test_python_without_numpy_and_torch_exits_2_naming_them(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin)
    bare = fake_bin / "barepython"  # the same interpreter without site-packages
    bare.write_text(f'#!/bin/bash\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    r = run_check(tmp_path, fake_bin, system_bin, PYTHON=str(bare))
    expect(r, 2, "has no numpy torch", "needs numpy and torch", "nothing else")


def test_missing_nvcc_exits_2(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin)
    fake_cmake(fake_bin)
    r = run_check(tmp_path, fake_bin, system_bin)
    expect(r, 2, "nvcc not found", "install the CUDA toolkit")


def test_nvcc_found_in_the_cuda_dirs_when_not_on_path(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin)
    cuda = tmp_path / "cuda-12.4" / "bin"
    cuda.mkdir(parents=True)
    fake_nvcc(cuda)
    r = run_check(tmp_path, fake_bin, system_bin, GPU_CHECK_NVCC_DIRS=f"/nonexistent {cuda}")
    expect(r, 2, "cmake not found")  # got past nvcc


def test_missing_cmake_exits_2(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin)
    fake_nvcc(fake_bin)
    expect(run_check(tmp_path, fake_bin, system_bin), 2, "cmake not found", "CMake >= 3.21")


def test_old_cmake_exits_2(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin)
    fake_nvcc(fake_bin)
    calls = fake_cmake(fake_bin, "3.20.6")
    r = run_check(tmp_path, fake_bin, system_bin)
    expect(r, 2, "CMake 3.20 is older than 3.21", "install CMake >= 3.21")
    assert not calls.exists()


def test_cmake_3_21_and_3_22_are_enough(tmp_path, fake_bin, system_bin):
    """Ubuntu 22.04's CMake 3.22 passes: the script goes on to configure the build."""
    fake_nvidia_smi(fake_bin)
    fake_nvcc(fake_bin)
    for v in ("3.21.0", "3.22.1"):
        calls = fake_cmake(fake_bin, v)
        r = run_check(tmp_path, fake_bin, system_bin, PYTHON=str(fake_python_with_cuda(fake_bin)))
        assert "older than" not in r.stderr, r.stderr
        expect(r, 1, "build failed")
        assert calls.read_text().startswith("-S cpp"), calls.read_text()
        calls.unlink()


def test_nvcc_newer_than_the_driver_exits_2_saying_what_to_do(tmp_path, fake_bin, system_bin):
    fake_nvidia_smi(fake_bin, driver_cuda="12.4")
    fake_nvcc(fake_bin, "13.0")
    calls = fake_cmake(fake_bin)
    r = run_check(tmp_path, fake_bin, system_bin)
    expect(
        r,
        2,
        "nvcc is CUDA 13.0 but the driver supports CUDA 12.4 at most",
        "Use a CUDA 12.x toolkit",
        "install a driver for CUDA 13.0",
    )
    assert not calls.exists()


@pytest.mark.parametrize(
    "nvcc, driver, words",
    [
        ("12.6", "12.4", "minor-version compatibility"),
        ("12.4", "12.4", "CUDA: nvcc 12.4, driver 12.4"),
        ("12.2", "13.0", "CUDA: nvcc 12.2, driver 13.0"),
    ],
)
def test_compatible_cuda_versions_go_on(tmp_path, fake_bin, system_bin, nvcc, driver, words):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU: the script would go on to the build")
    fake_nvidia_smi(fake_bin, driver_cuda=driver)
    fake_nvcc(fake_bin, nvcc)
    calls = fake_cmake(fake_bin)
    r = run_check(tmp_path, fake_bin, system_bin)
    # the real (CPU-only) torch of this environment is the last check before the build
    expect(r, 77, words, "PyTorch sees no CUDA device", "nothing built or run")
    assert not calls.exists()


@pytest.mark.parametrize("strict, werror", [(None, "OFF"), ("0", "OFF"), ("1", "ON")])
def test_build_gets_werror_off_unless_strict(tmp_path, fake_bin, system_bin, strict, werror):
    """Past every check (a fake Python whose torch sees a GPU), the build is configured for this
    GPU's architecture with warnings and spills as errors only under GPU_CHECK_STRICT=1."""
    fake_nvidia_smi(fake_bin)
    fake_nvcc(fake_bin)
    calls = fake_cmake(fake_bin)
    env = {"PYTHON": str(fake_python_with_cuda(fake_bin))}
    if strict is not None:
        env["GPU_CHECK_STRICT"] = strict
    r = run_check(tmp_path, fake_bin, system_bin, **env)
    expect(r, 1, "build failed", f"as errors: {werror}")
    configure = calls.read_text().splitlines()[0]
    assert f"-DREDRAFTER_CUDA_WERROR={werror}" in configure, configure
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in configure and "-S cpp" in configure, configure


def test_help_names_the_requirements_and_bad_arguments_exit_2():
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "numpy and PyTorch" in r.stdout and "GPU_CHECK_STRICT" in r.stdout
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


# --------------------------------------------------------------------------- CMake: minimum, strictness
def cmake_minimum() -> str:
    text = (ROOT / "cpp" / "CMakeLists.txt").read_text()
    m = re.search(r"cmake_minimum_required\(VERSION ([0-9]+\.[0-9]+)", text)
    assert m, "cpp/CMakeLists.txt: no cmake_minimum_required"
    return m.group(1)


def test_cmake_minimum_is_3_21_and_the_script_checks_the_same():
    assert cmake_minimum() == "3.21"
    assert re.search(r"^CMAKE_MIN=3\.21$", SCRIPT.read_text(), re.M)
    assert "cmake (>= 3.21)" in (ROOT / "build_scripts" / "build_cpp.sh").read_text()


def test_ci_build_keeps_cuda_warnings_and_spills_as_errors():
    """REDRAFTER_CUDA_WERROR defaults to ON with nvcc -Werror and ptxas -warn-spills,-Werror, and
    build_scripts/build_cpp.sh (CI's build) configures ON and turns an OFF cache back ON."""
    text = (ROOT / "cpp" / "CMakeLists.txt").read_text()
    assert re.search(r'option\(REDRAFTER_CUDA_WERROR "[^"]*" ON\)', text), "option default"
    on = re.search(r"if\(REDRAFTER_CUDA_WERROR\)\n\s*set\(_redrafter_cuda_warn ([^)]*)\)", text)
    assert on, "the ON branch of the CUDA flags"
    flags = on.group(1).split()
    assert "--Werror=all-warnings" in flags
    assert "-Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror" in flags
    assert "${_redrafter_cuda_warn}" in text
    build_cpp = (ROOT / "build_scripts" / "build_cpp.sh").read_text()
    assert (
        "-DREDRAFTER_CUDA_WERROR=ON" in build_cpp and "REDRAFTER_CUDA_WERROR:BOOL=OFF" in build_cpp
    )
    assert "REDRAFTER_CUDA_WERROR" not in (ROOT / "build_scripts" / "test.sh").read_text()


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
