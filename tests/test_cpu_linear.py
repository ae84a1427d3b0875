"""The batch-invariant CPU linear kernel (cpp/src/linear_cpu.cpp) against torch."""

import pytest
import torch

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError

pytestmark = pytest.mark.usefixtures("native_library")

DTYPES = (torch.float32, torch.bfloat16)


def _data(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(m, k, generator=g).to(dtype),
        torch.randn(n, k, generator=g).to(dtype),
        torch.randn(n, generator=g),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [576, 37, 16, 5])  # multiple of 16, tails, tail only
def test_matches_float64_reference(dtype, k):
    x, w, b = _data(9, 70, k, dtype)
    y = native.linear(x, w, b, out_dtype=torch.float32)
    ref = x.double() @ w.double().T + b.double()
    # float32 sums of k products: error grows like sqrt(k) * eps * |x||w|
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * k**0.5 * 4)
    yb = native.linear(x, w, b, out_dtype=torch.bfloat16)
    assert torch.equal(
        yb, y.to(torch.bfloat16)
    )  # bf16 output = round-to-nearest of the float32 one


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [576, 1536, 45])
def test_row_result_is_the_same_alone_or_among_17(dtype, k):
    x, w, b = _data(17, 96, k, dtype, seed=k)
    together = native.linear(x, w, b, out_dtype=torch.float32)
    for i in range(17):
        assert torch.equal(
            native.linear(x[i : i + 1], w, b, out_dtype=torch.float32), together[i : i + 1]
        )
    for lo, hi in ((0, 4), (3, 8), (5, 17), (1, 2)):  # any sub-batch, any position in the call
        assert torch.equal(native.linear(x[lo:hi], w, b, out_dtype=torch.float32), together[lo:hi])
    # the portable path reduces in the same order: the same bits
    assert torch.equal(native.linear(x, w, b, out_dtype=torch.float32, force_scalar=True), together)


def test_torch_float32_matmul_is_not_batch_invariant_here():
    """Why the kernel exists: torch's float32 GEMM changes a row's bits with the row count."""
    x, w, _ = _data(17, 1536, 576, torch.float32, seed=1)
    alone = torch.cat([x[i : i + 1] @ w.T for i in range(17)])
    if torch.equal(alone, x @ w.T):
        pytest.skip("this torch/CPU pair happens to be batch-invariant for this shape")
    together = native.linear(x, w, out_dtype=torch.float32)
    assert torch.equal(torch.cat([native.linear(x[i : i + 1], w) for i in range(17)]), together)


def test_leading_dims_and_empty_batch():
    x, w, b = _data(6, 8, 32, torch.float32)
    y = native.linear(x.view(2, 3, 32), w, b)
    assert y.shape == (2, 3, 8) and torch.equal(y.view(6, 8), native.linear(x, w, b))
    assert native.linear(x[:0], w).shape == (0, 8)


def test_bad_inputs_name_what_is_wrong():
    x, w, b = _data(2, 8, 32, torch.float32)
    with pytest.raises(RedrafterError, match="disagree"):
        native.linear(x, w[:, :16])
    with pytest.raises(RedrafterError, match="x must be a float32 or bfloat16"):
        native.linear(x.double(), w)
    with pytest.raises(RedrafterError, match="bias must be"):
        native.linear(x, w, b[:3])
    with pytest.raises(RedrafterError, match="out_dtype"):
        native.linear(x, w, out_dtype=torch.float16)


# ---------------------------------------------------------------------- bf16 on CPUs with bf16 units
from redrafter_trt.backends.torch_backend import auto_dtype, cpu_bf16_flags  # noqa: E402

AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN3_CPU = "processor\t: 0\nflags\t\t: fpu sse avx2 fma f16c\n"


def test_cpu_bf16_flags_and_auto_dtype(monkeypatch):
    assert cpu_bf16_flags(AMX_CPU) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(ZEN3_CPU) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_dtype(AMX_CPU)[0] == "bfloat16" and "amx_bf16" in auto_dtype(AMX_CPU)[1]
    dtype, why = auto_dtype(ZEN3_CPU)
    assert dtype == "float32" and "avx512_bf16" in why


def test_bf16_logits_are_float32_products():
    """lm_head in bf16 weights: logits come out of float32 products, not rounded to bf16."""
    from redrafter_trt.models.base import BaseConfig, BaseModel

    cfg = BaseConfig("LlamaForCausalLM", 97, 32, 64, 1, 4, 2, 8)
    m = BaseModel(cfg).to(torch.bfloat16)
    h = torch.randn(3, 32).to(torch.bfloat16)
    lg = m.logits(h, float32=True)
    ref = h.double() @ m.lm_head.weight.double().T
    assert lg.dtype == torch.float32 and torch.allclose(lg.double(), ref, atol=1e-5)
    assert not torch.equal(lg, lg.to(torch.bfloat16).float())  # finer than bf16 rounding
