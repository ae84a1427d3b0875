"""The C++ KV-relocation reference equals the PyTorch reference, in place, for every dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.ops.kv_cache import KvLayout, relocate_kv

pytestmark = pytest.mark.usefixtures("native_library")


def random_case(seed, b, l, dtype, layers=2, slots=5, heads=2, max_seq=40, head_dim=6):
    rng = np.random.default_rng(seed)
    cache = torch.from_numpy(
        rng.normal(size=(layers, 2, slots, heads, max_seq, head_dim)).astype(np.float32)
    )
    cache = cache.to(dtype)
    slot = torch.from_numpy(rng.permutation(slots)[:b].astype(np.int32))
    n = torch.from_numpy(rng.integers(0, l, size=b).astype(np.int32))
    q = np.zeros((b, l), dtype=np.int32)
    for r in range(b):
        q[r, 1:] = np.cumsum(rng.integers(1, 4, size=l - 1))
    span = int(q.max()) + 1
    lens = torch.from_numpy(rng.integers(0, max_seq - span, size=b).astype(np.int32))
    return cache, slot, lens, torch.from_numpy(q), n


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 5),
    l=st.integers(1, 6),
    dtype=st.sampled_from(
        [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]
    ),
)
def test_matches_pytorch_reference(seed, b, l, dtype):
    cache, slot, lens, q, n = random_case(seed, b, l, dtype)
    ref_cache = cache.clone()
    got = native.relocate_kv(cache, slot, lens, q, n)
    want = relocate_kv(ref_cache, slot, lens, q, n)
    assert torch.equal(got, want)
    assert torch.equal(cache, ref_cache)


def test_bad_rows_raise_and_leave_cache_untouched():
    cache, slot, lens, q, n = random_case(3, 3, 4, torch.float32)
    before = cache.clone()
    for mutate, needle in [
        (lambda s, le, qq, nn: s.__setitem__(1, s[0].item()), "same cache slot"),
        (lambda s, le, qq, nn: s.__setitem__(0, 99), "slot outside"),
        (
            lambda s, le, qq, nn: (nn.__setitem__(0, 2), qq.__setitem__((0, 2), qq[0, 1].item())),
            "not strictly increasing",
        ),
        (lambda s, le, qq, nn: (le.__setitem__(0, 39), nn.__setitem__(0, 1)), "exceeds max_seq"),
        (lambda s, le, qq, nn: nn.__setitem__(0, 4), "num_accepted outside"),
    ]:
        s2, l2, q2, n2 = slot.clone(), lens.clone(), q.clone(), n.clone()
        mutate(s2, l2, q2, n2)
        with pytest.raises(RedrafterError, match=needle):
            native.relocate_kv(cache, s2, l2, q2, n2)
        assert torch.equal(cache, before)


def test_bad_cache_shapes():
    with pytest.raises(RedrafterError, match="dim 1 must be 2"):
        native.relocate_kv(torch.zeros(1, 3, 1, 1, 4, 2), [0], [0], [[0, 1]], [0])
    with pytest.raises(RedrafterError, match="contiguous CPU"):
        native.relocate_kv(torch.zeros(1, 2, 1, 1, 4, 2).transpose(4, 5), [0], [0], [[0, 1]], [0])
    with pytest.raises(RedrafterError, match="accepted path length L"):
        native.relocate_kv(torch.zeros(1, 2, 1, 1, 80, 2), [0], [0], [list(range(65))], [0])


# --------------------------------------------------------------------------- strided layouts
# redrafter_kv_relocate_strided_cpu (blocked, strided layout of cpp/include/redrafter/kv_relocate.h)
# against the PyTorch references: ops.relocate_kv (contiguous) and ops.kv_cache.relocate_paged.

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
]  # 4, 2, 2, 8, 1 bytes


def random_values(rng, shape, dtype):
    x = torch.from_numpy(rng.normal(size=shape).astype(np.float32) * 50)
    return x.to(dtype)


def random_rows(rng, b, l, slots, capacity):
    """slots, cache lengths, accepted paths, counts of B rows fitting `capacity` positions per slot."""
    slot = torch.from_numpy(rng.permutation(slots)[:b].astype(np.int32))
    q = np.zeros((b, l), dtype=np.int32)
    for r in range(b):
        q[r, 1:] = np.cumsum(rng.integers(1, 4, size=l - 1))
    span = int(q.max()) + 1
    lens = torch.from_numpy(rng.integers(0, max(1, capacity - span), size=b).astype(np.int32))
    n = torch.from_numpy(rng.integers(0, l, size=b).astype(np.int32))
    return slot, lens, torch.from_numpy(q), n


def to_pool(cache, tpb):
    """Contiguous [layers, 2, slots, H, seq, D] -> paged pool [slots*blocks, layers, 2, H*tpb*D]."""
    ly, _, s, h, seq, d = cache.shape
    mb = seq // tpb
    x = cache.reshape(ly, 2, s, h, mb, tpb, d).permute(2, 4, 0, 1, 3, 5, 6)
    return x.reshape(s * mb, ly, 2, h * tpb * d).contiguous()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 4),
    l=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    layers=st.integers(1, 3),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 9),
)
def test_strided_contiguous_layout_matches_pytorch_reference(
    seed, b, l, dtype, layers, heads, head_dim
):
    rng = np.random.default_rng(seed)
    slots, max_seq = 4, 30
    cache = random_values(rng, (layers, 2, slots, heads, max_seq, head_dim), dtype)
    slot, lens, q, n = random_rows(rng, b, l, slots, max_seq)
    ref = cache.clone()
    layout = KvLayout.contiguous(slots, heads, max_seq, head_dim)
    assert layout == KvLayout(
        *(
            int(v)
            for v in (
                max_seq,
                *[cache.stride(2)] * 2,
                cache.stride(4),
                cache.stride(0),
                cache.stride(1),
                cache.stride(3),
            )
        )
    )
    got = native.relocate_kv_strided(
        cache,
        slot,
        lens,
        q,
        n,
        layout=layout,
        num_layers=layers,
        num_slots=slots,
        kv_heads=heads,
        max_seq=max_seq,
        head_dim=head_dim,
    )
    want = relocate_kv(ref, slot, lens, q, n)
    assert torch.equal(got, want)
    assert torch.equal(cache, ref)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 5),
    l=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    tpb=st.sampled_from([1, 2, 3, 4, 5, 8, 16]),
    layers=st.integers(1, 3),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 8),
    extra_blocks=st.integers(0, 2),
    pad=st.integers(0, 3),
)
def test_strided_paged_pool_matches_torch_relocation(
    seed, b, l, dtype, tpb, layers, heads, head_dim, extra_blocks, pad
):
    from redrafter_trt.ops.kv_cache import relocate_paged

    rng = np.random.default_rng(seed)
    slots = 5
    capacity = 20
    max_blocks = -(-capacity // tpb) + extra_blocks
    block_elems = heads * tpb * head_dim
    # pad > 0: a view of a wider allocation, so the pool's outer strides are not the dense ones
    full = random_values(rng, (slots * max_blocks, layers, 2, block_elems + pad), dtype)
    pool = full[..., :block_elems]
    ref = full.clone()[..., :block_elems]
    slot, lens, q, n = random_rows(rng, b, l, slots, capacity)
    got = native.relocate_paged_native(
        pool,
        slot,
        lens,
        q,
        n,
        max_blocks=max_blocks,
        kv_heads=heads,
        tokens_per_block=tpb,
        head_dim=head_dim,
    )
    relocate_paged(
        ref,
        slot,
        lens,
        q,
        n,
        max_blocks=max_blocks,
        kv_heads=heads,
        tokens_per_block=tpb,
        head_dim=head_dim,
    )
    assert torch.equal(got, lens + n + 1)
    assert torch.equal(pool, ref)
    if pad:  # the padding columns are outside the layout: untouched
        assert torch.equal(full[..., block_elems:], full.clone()[..., block_elems:])


@pytest.mark.parametrize("tpb", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_paged_moves_across_block_borders_equal_the_contiguous_reference(tpb, dtype):
    g = torch.Generator().manual_seed(tpb)
    layers, slots, heads, blocks, hd = 2, 5, 2, 24 // tpb, 3
    cache = (torch.randn(layers, 2, slots, heads, tpb * blocks, hd, generator=g) * 40).to(dtype)
    pool = to_pool(cache, tpb)
    row_slots = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    cache_len = torch.tensor([2, 7, 13, 0], dtype=torch.int32)
    path = torch.tensor([[0, 1, 4, 6], [0, 2, 3, 3], [0, 3, 5, 9], [0, 0, 0, 0]], dtype=torch.int32)
    n = torch.tensor([3, 2, 3, 0], dtype=torch.int32)
    want = relocate_kv(cache, row_slots, cache_len, path, n)
    got = native.relocate_paged_native(
        pool,
        row_slots,
        cache_len,
        path,
        n,
        max_blocks=blocks,
        kv_heads=heads,
        tokens_per_block=tpb,
        head_dim=hd,
    )
    assert torch.equal(got, want)
    assert torch.equal(pool, to_pool(cache, tpb))


def strided_params(
    cache,
    *,
    elems=None,
    tpb=None,
    strides=None,
    slots=None,
    lens=None,
    q=None,
    n=None,
    out=None,
    cache_ptr=True,
):
    """redrafter_kv_relocate_strided_{cpu,cuda}'s params for a contiguous cache [1, 2, 2, 1, 8, 4]."""
    lay = list(KvLayout.contiguous(2, 1, 8, 4))
    if tpb is not None:
        lay[0] = tpb
    if strides is not None:
        lay[1:] = strides
    return native.kv_relocate_params(
        cache if cache_ptr else None,
        slots,
        lens,
        q,
        n,
        out,
        num_layers=1,
        num_slots=2,
        kv_heads=1,
        max_seq=8,
        head_dim=4,
        elem_bytes=cache.element_size(),
        layout=KvLayout(*lay),
        cache_elems=cache.numel() if elems is None else elems,
    )


def bad_strided_cases():
    good = KvLayout.contiguous(2, 1, 8, 4)
    s = list(good[1:])  # slot, block, token, layer, kv, head
    neg = list(s)
    neg[2] = -4
    overlap = list(s)
    overlap[4] = s[0]  # kv stride == slot stride: K of slot 1 is V of slot 0
    return [
        (dict(strides=neg), "strides must be >= 0"),
        (dict(strides=overlap), "dims overlap"),
        (
            dict(elems=2 * 2 * 8 * 4 - 1),
            "reaches element offset 127 but the cache holds cache_elems=127",
        ),
        (dict(elems=0), "cache_elems"),
        (dict(tpb=0), "tokens_per_block must be in"),
        (dict(tpb=-2), "tokens_per_block must be in"),
        (dict(strides=[s[0], s[1], 2**62, s[3], s[4], s[5]]), "overflow int64"),
        (dict(cache_ptr=False), "null pointer"),
        (dict(slots=None), "null pointer"),
        (dict(out=None), "null pointer"),
    ]


@pytest.mark.parametrize("case", range(len(bad_strided_cases())))
def test_strided_cpu_rejects_bad_parameters_with_a_message(case):
    kwargs, needle = bad_strided_cases()[case]
    cache = torch.arange(2 * 2 * 8 * 4, dtype=torch.float32).reshape(1, 2, 2, 1, 8, 4)
    before = cache.clone()
    ints = dict(
        slots=torch.tensor([1], dtype=torch.int32),
        lens=torch.tensor([2], dtype=torch.int32),
        q=torch.tensor([[0, 2, 3]], dtype=torch.int32),
        n=torch.tensor([2], dtype=torch.int32),
        out=torch.zeros(1, dtype=torch.int32),
    )
    params = strided_params(cache, **{**ints, **kwargs})
    with pytest.raises(RedrafterError, match=needle):
        native.call("redrafter_kv_relocate_strided_cpu", params)
    assert torch.equal(cache, before)
    # the same arguments, valid: moves t=4 -> 3, t=5 -> 4 of slot 1
    native.call("redrafter_kv_relocate_strided_cpu", strided_params(cache, **ints))
    want = before.clone()
    want[:, :, 1, :, 3:5] = before[:, :, 1, :, 4:6]
    assert torch.equal(cache, want) and int(ints["out"][0]) == 5


def test_paged_binding_checks_the_pool():
    pool = torch.zeros(6, 2, 2, 2 * 4 * 3)
    rows = ([0], [0], [[0, 1]], [1])
    with pytest.raises(RedrafterError, match="whole number of slots"):
        native.relocate_paged_native(
            pool, *rows, max_blocks=4, kv_heads=2, tokens_per_block=4, head_dim=3
        )
    with pytest.raises(RedrafterError, match="last dim must be contiguous"):
        native.relocate_paged_native(
            pool, *rows, max_blocks=3, kv_heads=2, tokens_per_block=4, head_dim=2
        )
    with pytest.raises(RedrafterError, match="exceeds max_seq"):  # 3 blocks of 4 positions per slot
        native.relocate_paged_native(
            pool, [0], [11], [[0, 1]], [1], max_blocks=3, kv_heads=2, tokens_per_block=4, head_dim=3
        )


def test_runtime_relocation_kernel_path_equals_torch_path(monkeypatch):
    """TrtllmBackend's relocation with impl="kernel" runs the cpp/ operator (here its CPU reference on a CPU pool)."""
    from redrafter_trt.trtllm import runtime as rt

    rng = np.random.default_rng(7)
    layers, heads, tpb, hd, mb, slots = 2, 2, 4, 3, 6, 5
    pool = random_values(rng, (slots * mb, layers, 2, heads * tpb * hd), torch.float16)
    ref = pool.clone()
    slot, lens, q, n = random_rows(rng, 4, 5, slots, mb * tpb)
    kw = dict(max_blocks=mb, kv_heads=heads, tokens_per_block=tpb, head_dim=hd)
    rt.relocate_pool(pool, slot, lens, q, n, impl=rt.RELOCATE_KERNEL, **kw)
    rt.relocate_pool(ref, slot, lens, q, n, impl=rt.RELOCATE_TORCH, **kw)
    assert torch.equal(pool, ref)
    bad = lens.clone()
    bad[0] = mb * tpb  # out of the slot: the operator refuses, nothing moves
    with pytest.raises(RedrafterError, match="exceeds max_seq"):
        rt.relocate_pool(pool, slot, bad, q, n, impl=rt.RELOCATE_KERNEL, **kw)
    assert torch.equal(pool, ref)

    monkeypatch.delenv(rt.KV_RELOCATE_ENV, raising=False)
    impl, why = rt.choose_relocation(torch.device("cpu"))
    assert impl == rt.RELOCATE_TORCH and "needs a CUDA device" in why
    monkeypatch.setenv(rt.KV_RELOCATE_ENV, "torch")
    assert rt.choose_relocation(torch.device("cuda"))[0] == rt.RELOCATE_TORCH
    monkeypatch.setenv(rt.KV_RELOCATE_ENV, "kernel")
    with pytest.raises(RedrafterError, match="kernel cannot run"):
        rt.choose_relocation(torch.device("cpu"))
    monkeypatch.setenv(rt.KV_RELOCATE_ENV, "fast")
    with pytest.raises(RedrafterError, match="auto, kernel or torch"):
        rt.choose_relocation(torch.device("cpu"))


def test_cuda_library_is_optional_and_lazy(monkeypatch, tmp_path):
    from redrafter_trt.trtllm import runtime as rt

    monkeypatch.setattr(native, "_cuda_lib", None)
    monkeypatch.setattr(native, "_cuda_error", None)
    monkeypatch.setenv(native.CUDA_LIB_ENV, str(tmp_path / "missing.so"))
    monkeypatch.delenv(rt.KV_RELOCATE_ENV, raising=False)
    assert not native.cuda_available()
    with pytest.raises(RedrafterError, match="CUDA library not found"):
        native.load_cuda_library()
    impl, why = rt.choose_relocation(
        torch.device("cuda")
    )  # no library: the torch fallback, and why
    assert impl == rt.RELOCATE_TORCH and "CUDA library not found" in why


def test_cuda_entry_validates_like_the_cpu_entry():
    """libredrafter_cuda.so (when built from these sources) rejects bad layouts before touching the GPU."""
    try:
        lib = native.load_cuda_library()
    except RedrafterError as e:
        pytest.skip(f"CUDA library unavailable: {e}")
    cache = torch.zeros(1, 2, 2, 1, 8, 4)
    ints = dict(
        slots=torch.tensor([1], dtype=torch.int32),
        lens=torch.tensor([2], dtype=torch.int32),
        q=torch.tensor([[0, 2, 3]], dtype=torch.int32),
        n=torch.tensor([2], dtype=torch.int32),
        out=torch.zeros(1, dtype=torch.int32),
    )
    for kwargs, needle in bad_strided_cases():
        with pytest.raises(RedrafterError, match=needle):
            native.call(
                "redrafter_kv_relocate_strided_cuda",
                strided_params(cache, **{**ints, **kwargs}),
                lib=lib,
            )
