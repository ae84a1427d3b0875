"""The C++ tree-pack reference equals the PyTorch reference (every output, bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.ops.tree import pack_tree

pytestmark = pytest.mark.usefixtures("native_library")


def assert_same_tree(beams):
    got, ref = native.pack_tree(beams), pack_tree(beams)
    for field in ref._fields:
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    # Property: packed tokens unpack to the beams.
    assert torch.equal(
        got.tokens.gather(1, got.unpacker.flatten(1).long()).reshape(beams.shape),
        beams.to(torch.int32),
    )
    return got


def test_spec_worked_example():
    beams = torch.tensor([[[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]]])
    got = assert_same_tree(beams)
    assert got.tokens[0, :7].tolist() == [91, 92, 93, 95, 94, 96, 97]
    assert got.lengths.tolist() == [7]
    assert got.unpacker[0].tolist() == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]]
    assert got.offsets[0, :7].tolist() == [0, 1, 2, 3, 2, 3, 3]
    # Node 5 (token 96) sees 0, 1, 4 and itself: bits 0b110011.
    assert got.packed_mask[0, 5, 0].item() == 0b110011


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 3),
    w=st.integers(1, 9),
    l=st.integers(1, 9),
    alphabet=st.integers(1, 4),
    duplicate=st.booleans(),
)
def test_matches_pytorch_reference(seed, b, w, l, alphabet, duplicate):
    rng = np.random.default_rng(seed)
    beams = rng.integers(0, alphabet, size=(b, w, l)).astype(np.int32)
    beams[:, :, 0] = 5
    if duplicate and w > 1:
        beams[:, -1] = beams[:, 0]
    assert_same_tree(torch.from_numpy(beams))


@pytest.mark.parametrize(
    "w,l", [pytest.param(64, 64, marks=pytest.mark.full), (64, 5), (33, 3), (1, 64)]
)
def test_large_trees(w, l):
    rng = np.random.default_rng(w * 100 + l)
    beams = torch.from_numpy(rng.integers(0, 3, size=(2, w, l)).astype(np.int32))
    assert_same_tree(beams)


@pytest.mark.parametrize(
    "shape,needle",
    [
        ((1, 2, 65), "beam length L"),
        ((1, 65, 2), "num_beams W"),
        ((1, 0, 3), "num_beams W"),
        ((1, 3, 0), "beam length L"),
    ],
)
def test_bad_parameters_raise_with_message(shape, needle):
    with pytest.raises(RedrafterError, match=needle):
        native.pack_tree(torch.zeros(shape, dtype=torch.int32))


def test_empty_batch():
    got = native.pack_tree(torch.zeros(0, 3, 4, dtype=torch.int32))
    assert got.tokens.shape == (0, 12) and got.packed_mask.shape == (0, 12, 1)
