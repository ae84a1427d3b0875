"""The C++ acceptance and sampling references equal the PyTorch references, bit for bit.

Greedy rows, sampling rows with temperature / top-k / top-p, ties in the logits (argmax ties,
ties at the top-k and top-p cuts), and the docs/design.md section 5 tree, all through the native path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.ops.accept import accept
from redrafter_trt.ops.sampling import draw_tokens
from redrafter_trt.ops.tree import pack_tree

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TEMPERATURES = [0.0, -1.0, 0.5, 1.0, 2.0]
TOP_PS = [1.0, 0.95, 0.5, 0.2, 0.0]


pytestmark = pytest.mark.usefixtures("native_library")


def sampling_params(rng, rows, v):
    temperature = torch.tensor(rng.choice(TEMPERATURES, size=rows), dtype=torch.float32)
    top_k = torch.tensor(rng.choice([0, 1, 3, v, v + 2], size=rows), dtype=torch.int32)
    top_p = torch.tensor(rng.choice(TOP_PS, size=rows), dtype=torch.float32)
    return temperature, top_k, top_p


def uniforms(rng, shape):
    # 24-bit uniforms, as redrafter_trt.ops.sampling.position_uniforms makes them.
    return torch.from_numpy((rng.integers(0, 2**24, size=shape) / 2**24).astype(np.float32))


def with_ties(rng, x, coarse):
    if coarse:  # many exact ties, at every cut
        x = np.round(x * 2.0) / 2.0
    v = x.shape[-1]
    for _ in range(max(1, v // 4)):
        i, j = rng.integers(0, v, size=2)
        x[..., j] = x[..., i]
    return x


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 8),
    v=st.integers(1, 50),
    dtype=st.sampled_from(DTYPES),
    coarse=st.booleans(),
)
def test_draw_tokens_matches_pytorch(seed, rows, v, dtype, coarse):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(
        with_ties(rng, rng.normal(0, 2, size=(rows, v)), coarse).astype(np.float32)
    ).to(dtype)
    temperature, top_k, top_p = sampling_params(rng, rows, v)
    u = uniforms(rng, rows)
    want = draw_tokens(logits, temperature, top_k, top_p, u)
    assert torch.equal(
        native.draw_tokens(logits, temperature, top_k, top_p, u), want.to(torch.int32)
    )


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 3),
    w=st.integers(1, 6),
    l=st.integers(1, 6),
    v=st.integers(2, 40),
    dtype=st.sampled_from(DTYPES),
    coarse=st.booleans(),
    follow=st.booleans(),
)
def test_accept_matches_pytorch(seed, b, w, l, v, dtype, coarse, follow):
    rng = np.random.default_rng(seed)
    beams = rng.integers(0, min(v, 3), size=(b, w, l)).astype(np.int32)
    beams[:, :, 0] = 1
    tree = pack_tree(torch.from_numpy(beams))
    n = w * l
    x = with_ties(rng, rng.normal(0, 2, size=(b, n, v)), coarse)
    if follow:  # push each node's logits towards a child so walks go deep
        for r in range(b):
            for d in range(l - 1):
                wb = rng.integers(0, w)
                x[r, tree.unpacker[r, wb, d], beams[r, wb, d + 1]] += 6.0
    logits = torch.from_numpy(x.astype(np.float32)).to(dtype)
    temperature, top_k, top_p = sampling_params(rng, b, v)
    u = uniforms(rng, (b, l))
    args = (logits, torch.from_numpy(beams), tree.unpacker, temperature, top_k, top_p, u)
    want = accept(*args)
    for packed_len in (None, tree.lengths):
        got = native.accept(*args, packed_len=packed_len)
        for field in want._fields:
            assert torch.equal(getattr(got, field), getattr(want, field)), (
                field,
                getattr(got, field),
                getattr(want, field),
            )


def test_spec_worked_example_greedy():
    """The docs/design.md section 5 tree: the base model agrees with beam 1 up to its last token."""
    beams = torch.tensor([[[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]]])
    tree = pack_tree(beams)
    logits = torch.zeros(1, 12, 100)
    for node, nxt in [(0, 92), (1, 94), (4, 96), (5, 42)]:  # packed node -> argmax token
        logits[0, node, nxt] = 1.0
    logits[0, 2, 95] = 1.0
    args = (
        logits,
        beams,
        tree.unpacker,
        torch.zeros(1),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1),
        torch.zeros(1, 4),
    )
    got = native.accept(*args, packed_len=tree.lengths)
    assert (
        got.num_accepted.tolist() == [3]
        and got.best_beam.tolist() == [1]
        and got.bonus.tolist() == [42]
    )
    assert got.accepted_indices.tolist() == [[0, 1, 4, 5]]
    assert got.emitted.tolist() == [[92, 94, 96, 42]]
    for field in got._fields:
        assert torch.equal(getattr(got, field), getattr(accept(*args), field))


def test_argmax_ties_go_to_lowest_id_and_lowest_beam():
    beams = torch.tensor([[[1, 2, 3], [1, 4, 5], [1, 2, 6]]])
    tree = pack_tree(beams)
    logits = torch.zeros(1, 9, 8)
    logits[0, 0, [2, 4]] = 3.0  # tie between children 2 and 4: the lower id (2) wins
    got = native.accept(
        logits,
        beams,
        tree.unpacker,
        torch.zeros(1),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1),
        torch.zeros(1, 3),
    )
    assert got.num_accepted.item() == 1 and got.best_beam.item() == 0 and got.bonus.item() == 0


def test_bad_inputs_raise_with_message():
    beams = torch.ones(1, 2, 3, dtype=torch.int32)
    tree = pack_tree(beams)
    args = [
        torch.zeros(1, 6, 5),
        beams,
        tree.unpacker,
        torch.zeros(1),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1),
        torch.zeros(1, 3),
    ]
    bad = tree.unpacker.clone()
    bad[0, 1, 2] = 6
    with pytest.raises(RedrafterError, match=r"unpacker\[0, 1, 2\] = 6 is outside"):
        native.accept(*args[:2], bad, *args[3:])
    with pytest.raises(RedrafterError, match="packed_len"):
        native.accept(*args, packed_len=torch.tensor([0]))
    with pytest.raises(RedrafterError, match="outside"):
        native.accept(*args, packed_len=torch.tensor([1]))
    with pytest.raises(RedrafterError, match="beam length L"):
        long_beams = torch.ones(1, 1, 65, dtype=torch.int32)
        native.accept(
            torch.zeros(1, 65, 5),
            long_beams,
            torch.zeros(1, 1, 65, dtype=torch.int32),
            torch.zeros(1),
            torch.zeros(1, dtype=torch.int32),
            torch.ones(1),
            torch.zeros(1, 65),
        )
    with pytest.raises(RedrafterError, match=r"uniforms: expected shape \[1, 3\]"):
        native.accept(*args[:6], torch.zeros(1, 4))
