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
    import redrafter_trt.backends.torch_backend as tb

    monkeypatch.setattr(tb, "_cpu_kernels_run", lambda: False)  # torch's own matmuls
    assert auto_dtype(AMX_CPU)[0] == "bfloat16" and "amx_bf16" in auto_dtype(AMX_CPU)[1]
    monkeypatch.setattr(tb, "_cpu_kernels_run", lambda: True)  # the float32 CPU kernels
    dtype, why = auto_dtype(AMX_CPU)
    assert dtype == "float32" and "amx_bf16" in why and "kernels" in why
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


# ---------------------------------------------------------------------- packed kernel invariance
def rows_are_batch_invariant(linear_fn, x) -> bool:
    """True when every row's result has the same bits alone, in any sub-batch and whole."""
    whole = linear_fn(x)
    m = x.shape[0]
    if not all(torch.equal(linear_fn(x[i : i + 1]), whole[i : i + 1]) for i in range(m)):
        return False
    cuts = [(0, m // 2), (m // 3, m), (1, min(m, 7))]
    return all(torch.equal(linear_fn(x[a:b]), whole[a:b]) for a, b in cuts if a < b)


def test_the_invariance_check_catches_an_m_dependent_reduction():
    """Planted once: a product that splits K differently when there are more rows (as a GEMM
    picking another blocking does) must fail the check our kernel passes."""
    x, w, _ = _data(17, 48, 576, torch.float32, seed=3)

    def m_dependent(xs):
        split = 64 if xs.shape[0] > 4 else 192  # the reduction order follows M
        parts = [xs[:, i : i + split] @ w[:, i : i + split].T for i in range(0, 576, split)]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    assert not rows_are_batch_invariant(m_dependent, x)
    packed = native.pack_linear(w)
    assert rows_are_batch_invariant(lambda xs: native.linear_packed(xs, packed), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(960, 576), (70, 37), (33, 1536), (17, 5)])
def test_packed_rows_are_invariant_to_m_place_threads_and_path(dtype, n, k):
    x, w, b = _data(64, n, k, dtype, seed=n + k)
    packed = native.pack_linear(w)
    ref = native.linear_packed(x, packed, b, out_dtype=torch.float32, threads=1)
    for threads in (2, 3, 7):
        assert torch.equal(
            native.linear_packed(x, packed, b, out_dtype=torch.float32, threads=threads), ref
        )
    assert torch.equal(
        native.linear_packed(x, packed, b, out_dtype=torch.float32, force_scalar=True), ref
    )
    for m in (1, 2, 3, 5, 6, 7, 13, 17, 33):  # every tile shape, any place in the call
        lo = (m * 7) % (64 - m + 1)
        got = native.linear_packed(x[lo : lo + m], packed, b, out_dtype=torch.float32, threads=2)
        assert torch.equal(got, ref[lo : lo + m]), (m, lo)
    # within a float64 bound that scales with K, and the unpacked entry gives the same bits
    exact = x.double() @ w.double().T + b.double()
    bound = 4 * k * 6e-8 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    assert bool(((ref.double() - exact).abs() <= bound + 1e-30).all())
    assert torch.equal(native.linear(x, w, b, out_dtype=torch.float32), ref)


def test_packed_weight_follows_weight_changes():
    from redrafter_trt.models.base import Linear

    lin = Linear(32, 20)
    lin.native = True
    x = torch.randn(3, 32)
    with torch.inference_mode():
        y0 = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: the packed copy must not go stale
    with torch.inference_mode():
        y1 = lin(x)
    assert torch.allclose(y1 - lin.bias, 2 * (y0 - lin.bias), atol=1e-5)


def test_packed_bad_inputs_name_what_is_wrong():
    _, w, _ = _data(1, 8, 32, torch.float32)
    p = native.pack_linear(w)
    with pytest.raises(RedrafterError, match="threads must be in"):
        native.linear_packed(torch.randn(2, 32), p, threads=0)
    with pytest.raises(RedrafterError, match="disagree"):
        native.linear_packed(torch.randn(2, 16), p)
    with pytest.raises(RedrafterError, match="weight must be"):
        native.pack_linear(torch.randn(2, 3, 4))


# ---------------------------------------------------------------------- attention
def _attention_data(seed=0, b=3, t=5, nh=6, nkv=2, hd=64, slots=4, cap=48, s=40):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, slots, nkv, cap, hd, generator=g)
    q = torch.randn(b, t, nh, hd, generator=g)
    sl = torch.randperm(slots, generator=g)[:b]
    mask = torch.rand(b, t, s, generator=g) > 0.4
    return q, cache, sl, mask


def _attention_reference(q, cache, sl, mask):
    b, t, nh, hd = q.shape
    nkv, s = cache.shape[2], mask.shape[2]
    out = torch.zeros(b, t, nh, hd, dtype=torch.float64)
    for i in range(b):
        for h in range(nh):
            kv = h // (nh // nkv)
            keys, vals = cache[0, sl[i], kv, :s].double(), cache[1, sl[i], kv, :s].double()
            sc = (q[i, :, h].double() @ keys.T) / hd**0.5
            sc = sc.masked_fill(~mask[i], float("-inf"))
            p = torch.softmax(sc, -1).nan_to_num(0.0)
            out[i, :, h] = p @ vals
    return out


@pytest.mark.parametrize("cache_dtype", DTYPES)
def test_attention_matches_float64_and_is_invariant(cache_dtype):
    q, cache, sl, mask = _attention_data()
    cache = cache.to(cache_dtype)
    out = native.attention(q, cache, sl, mask, threads=1)
    ref = _attention_reference(q, cache.float(), sl, mask)
    assert torch.allclose(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(native.attention(q, cache, sl, mask, force_scalar=True), out)
    assert torch.equal(native.attention(q, cache, sl, mask, threads=3), out)
    # one query alone, any row of the batch: the same bits
    for i, j in ((0, 0), (2, 4), (1, 2)):
        alone = native.attention(
            q[i : i + 1, j : j + 1], cache, sl[i : i + 1], mask[i : i + 1, j : j + 1]
        )
        assert torch.equal(alone, out[i : i + 1, j : j + 1])
    # masked-out keys do not take part at all: changing them changes nothing
    poked = cache.clone()
    hidden = (~mask[0, 0]).nonzero().flatten()
    poked[:, sl[0], :, hidden] = 7.0
    assert torch.equal(native.attention(q[:1, :1], poked, sl[:1], mask[:1, :1]), out[:1, :1])


def test_attention_bad_inputs_name_what_is_wrong():
    q, cache, sl, mask = _attention_data()
    with pytest.raises(RedrafterError, match="slots"):
        native.attention(q, cache, torch.tensor([0, 1, 9]), mask)
    with pytest.raises(RedrafterError, match="mask must be"):
        native.attention(q, cache, sl, mask[:, :2])
    with pytest.raises(RedrafterError, match="S=49"):
        native.attention(q, cache, sl, torch.ones(3, 5, 49, dtype=torch.bool))
    with pytest.raises(RedrafterError, match="layer_cache must be"):
        native.attention(q, cache.transpose(3, 4), sl, mask)


def test_machine_limits_are_measured():
    lim = native.machine_limits(threads=1, mib=64, repeats=1)
    assert lim["read_bytes_per_s"] > 1e8 and lim["read_bytes_per_s_1_thread"] > 1e8
    assert (lim["fma_flops_per_s"] > 1e8) == (native.simd_level() > 0)


# ---------------------------------------------------------------------- whole steps on the kernels
@pytest.mark.parametrize(
    "arch,dtype", [("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16)]
)
def test_speculation_on_the_kernels_equals_plain_for_every_shape_batch_and_thread_count(
    tiny_dirs, arch, dtype
):
    """Greedy output with the CPU kernels (the default on x86): every shape the adaptive policy
    can choose, batch sizes 1 and 3, one and two threads, gives plain decoding's exact tokens."""
    from conftest import tiny_generator
    from redrafter_trt.runtime.adaptive import AdaptivePolicy

    gen = tiny_generator(tiny_dirs[arch], 3, 3, dtype=dtype)
    assert gen.backend.native_linear
    prompts = [[5, 9, 2, 7], [11, 3], [8, 8, 8, 1, 4, 6]]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for batch in (1, 3):
                ps = prompts[:batch]
                plain = [
                    r.token_ids for r in gen.generate(ps, max_new_tokens=12, speculative=False)
                ]
                shapes = [(w, d) for w in (1, 2, 3) for d in (1, 2, 3)]

                class Fixed(AdaptivePolicy):
                    def __init__(self, shape):
                        self.shape = shape

                    def choose(self, batch_size):
                        return self.shape

                    def observe(self, *a):
                        pass

                for shape in shapes:
                    gen.policy = Fixed(shape)
                    spec = [r.token_ids for r in gen.generate(ps, max_new_tokens=12)]
                    assert spec == plain, (threads, batch, shape)
                gen.policy = None
                # seeded sampling: the same draws, the same tokens
                kw = dict(max_new_tokens=12, temperature=0.8, seed=3)
                sampled = [r.token_ids for r in gen.generate(ps, speculative=False, **kw)]
                assert [r.token_ids for r in gen.generate(ps, **kw)] == sampled
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- small per-layer ops
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_ops_match_torch_and_are_row_invariant(dtype):
    from redrafter_trt.models.base import _rotate

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 100, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(100, generator=g)).to(dtype)
    y = native.rmsnorm(x, w, 1e-6)
    x32 = x.float()
    ref = w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.float(), ref, atol=tol, rtol=tol)
    assert torch.equal(native.rmsnorm(x[2:3, 1:2], w, 1e-6), y[2:3, 1:2])  # a row alone

    ab = torch.randn(5, 64, generator=g).to(dtype)
    got = native.silu_mul(ab)
    want = torch.nn.functional.silu(ab[:, :32].float()) * ab[:, 32:].float()
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)

    heads, hd = 3, 16
    qkv = torch.randn(4, 2 * heads * hd + 8, generator=g).to(dtype)
    ang = torch.rand(4, hd // 2, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    rotated = qkv.clone()
    native.rope_(rotated, heads * hd, heads, hd, cos, sin)  # the second group of heads only
    part = qkv[:, heads * hd : 2 * heads * hd].float().view(4, heads, hd)
    want = _rotate(part, cos[:, None], sin[:, None]).reshape(4, -1)
    assert torch.allclose(rotated[:, heads * hd : 2 * heads * hd].float(), want, atol=tol, rtol=tol)
    assert torch.equal(rotated[:, : heads * hd], qkv[:, : heads * hd])  # untouched around it
    assert torch.equal(rotated[:, 2 * heads * hd :], qkv[:, 2 * heads * hd :])
    with pytest.raises(RedrafterError, match="shapes disagree"):
        native.rope_(rotated, 2 * heads * hd, heads, hd, cos, sin)


def test_kernel_forward_matches_the_torch_forward():
    """The whole base forward on the kernels agrees with the torch path (the oracle) to float32
    rounding, on prompts and tree blocks."""
    from redrafter_trt.models.base import BaseConfig, BaseModel

    torch.manual_seed(0)
    for cfg in (
        BaseConfig("LlamaForCausalLM", 97, 64, 96, 2, 4, 2, 16),
        BaseConfig("QWenForCausalLM", 97, 64, 96, 2, 4, 1, 16, qkv_bias=True),
    ):
        m = BaseModel(cfg).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.2)
        ids = torch.randint(0, 97, (2, 9))
        pos = torch.arange(9)[None].expand(2, 9)
        mask = torch.ones(9, 9, dtype=torch.bool).tril()[None].expand(2, 9, 9)
        outs = []
        for on in (False, True):
            m.use_native_linear(on)
            cache = m.new_cache(2, 16)
            with torch.inference_mode():
                outs.append(
                    m(ids, pos, cache, torch.arange(2), torch.zeros(2, dtype=torch.long), mask)
                )
        assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_default_kernels_need_x86_simd_and_say_why_not(monkeypatch, capsys):
    import platform

    from redrafter_trt.backends import torch_backend as tb

    cpu = torch.device("cpu")
    monkeypatch.delenv(tb.CPU_LINEAR_ENV, raising=False)
    assert tb.default_native_linear(cpu, torch.float32) == (native.simd_level() > 0)
    assert not tb.default_native_linear(cpu, torch.float64)
    monkeypatch.setenv(tb.CPU_LINEAR_ENV, "torch")
    assert not tb.default_native_linear(cpu, torch.float32)
    monkeypatch.delenv(tb.CPU_LINEAR_ENV)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not tb.default_native_linear(cpu, torch.float32)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "simd_level", lambda: 0)
    monkeypatch.setattr(tb, "_NOTES_SAID", set())
    assert not tb.default_native_linear(cpu, torch.float32)
    assert "no AVX2+FMA" in capsys.readouterr().err
    # a library that does not load: torch's kernels, said once, with the command that builds it
    monkeypatch.setattr(native, "linear_available", lambda: False)
    assert not tb.default_native_linear(cpu, torch.float32)
    assert not tb.default_native_linear(cpu, torch.float32)
    err = capsys.readouterr().err
    assert (
        err.count("CPU kernels are not built (or do not load)") == 1
        and "build_cpp.sh --cpu-only" in err
    )
