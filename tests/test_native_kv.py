"""The C++ KV-relocation reference equals the PyTorch reference, in place, for every dtype."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.ops.kv_cache import relocate_kv


pytestmark = pytest.mark.usefixtures("native_library")


def random_case(seed, b, l, dtype, layers=2, slots=5, heads=2, max_seq=40, head_dim=6):
    rng = np.random.default_rng(seed)
    cache = torch.from_numpy(rng.normal(size=(layers, 2, slots, heads, max_seq, head_dim)).astype(np.float32))
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
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 5), l=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]))
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
        (lambda s, le, qq, nn: (nn.__setitem__(0, 2), qq.__setitem__((0, 2), qq[0, 1].item())), "not strictly increasing"),
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
