"""Tree packing (docs/design.md section 5): the worked example and properties over random beams."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt.contract import StepShape
from redrafter_trt.ops import (
    bool_to_packed_mask,
    mask_words,
    pack_tree,
    packed_mask_to_bool,
    root_only_tree,
)


def test_spec_worked_example():
    beams = torch.tensor([[[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]]])
    t = pack_tree(beams)
    assert t.lengths.tolist() == [7]
    assert t.tokens[0, :7].tolist() == [91, 92, 93, 95, 94, 96, 97]
    assert t.unpacker[0].tolist() == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]]
    assert t.offsets[0, :7].tolist() == [0, 1, 2, 3, 2, 3, 3]
    # Node 6 (token 97) sees 91, 92, 93 and itself: bits 0, 1, 2, 6.
    assert t.packed_mask.shape == (1, 12, 1)
    assert t.packed_mask[0, 6, 0].item() == (1 << 0) | (1 << 1) | (1 << 2) | (1 << 6)
    assert t.packed_mask[0, 7:].eq(0).all()


beam_sets = st.integers(1, 6).flatmap(
    lambda w: st.integers(1, 6).flatmap(
        lambda l: st.lists(
            st.lists(st.integers(0, 2), min_size=l, max_size=l), min_size=w, max_size=w
        )
    )
)


def ancestor_or_self(beams, unpacker):
    """Reference: packed j visible from packed i iff node j is on the path of node i."""
    w, l = beams.shape
    n = w * l
    ref = torch.zeros((n, n), dtype=torch.bool)
    for wi in range(w):
        for d in range(l):
            i = unpacker[wi, d]
            for d2 in range(d + 1):
                ref[i, unpacker[wi, d2]] = True
    return ref


@settings(max_examples=200, deadline=None)
@given(beam_sets, st.integers(1, 3))
def test_pack_properties(rows, batch):
    beams = torch.tensor([[[7] + [10 + t for t in beam[1:]] for beam in rows]] * batch)
    w, l = beams.shape[1:]
    t = pack_tree(beams)
    for b in range(batch):
        p = int(t.lengths[b])
        un = t.unpacker[b].long()
        # Unpacking gives the beams back, every packed node is used, padding is padding.
        assert torch.equal(t.tokens[b].long()[un], beams[b])
        assert sorted(set(un.flatten().tolist())) == list(range(p))
        assert t.tokens[b, p:].eq(0).all() and t.offsets[b, p:].eq(0).all()
        # Offsets are depths; shared prefixes are stored once.
        for wi in range(w):
            for d in range(l):
                assert int(t.offsets[b, un[wi, d]]) == d
                dup = any(
                    torch.equal(beams[b, v, : d + 1], beams[b, wi, : d + 1]) for v in range(wi)
                )
                assert un[wi, d] < un[wi].max() + 1
                owner = next(
                    v
                    for v in range(wi + 1)
                    if torch.equal(beams[b, v, : d + 1], beams[b, wi, : d + 1])
                )
                assert int(un[wi, d]) == int(un[owner, d])
                if not dup:
                    assert owner == wi
        # Packed order is beam-major, depth-minor over kept nodes.
        order = [
            (wi, d)
            for wi in range(w)
            for d in range(l)
            if not any(torch.equal(beams[b, v, : d + 1], beams[b, wi, : d + 1]) for v in range(wi))
        ]
        assert [int(un[wi, d]) for wi, d in order] == list(range(p))
        # The mask is exactly ancestor-or-self, and the packed words encode it.
        assert torch.equal(t.mask[b], ancestor_or_self(beams[b], un))
        assert torch.equal(packed_mask_to_bool(t.packed_mask[b], w * l), t.mask[b])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 100), st.data())
def test_packed_mask_roundtrip(rows, cols, data):
    bits = data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    m = torch.tensor(bits).reshape(rows, cols)
    packed = bool_to_packed_mask(m)
    assert packed.dtype == torch.int32 and packed.shape == (rows, mask_words(cols))
    assert torch.equal(packed_mask_to_bool(packed, cols), m)
    # Bit j % 32 of word j // 32, LSB first.
    for r in range(rows):
        for j in range(cols):
            word = int(packed[r, j // 32]) & 0xFFFFFFFF
            assert bool((word >> (j % 32)) & 1) == bool(m[r, j])


def test_root_only_tree_is_the_root_alone():
    """Plain decoding's tree: one node (the root) in the W*L layout, as pack_tree pads it."""
    tree, beams = root_only_tree(torch.tensor([7, 11]), StepShape(2, 1))
    assert beams.tolist() == [[[7, -1], [7, -1]], [[11, -1], [11, -1]]]
    assert tree.lengths.tolist() == [1, 1]
    assert tree.tokens.tolist() == [[7, 0, 0, 0], [11, 0, 0, 0]]
    assert tree.unpacker.eq(0).all() and tree.offsets.eq(0).all()
    assert tree.packed_mask.tolist() == [[[1], [0], [0], [0]]] * 2
    # node 0 as pack_tree lays out a tree whose only node is the root
    one = pack_tree(torch.tensor([[[7]], [[11]]]))
    assert (
        tree.tokens[:, :1].tolist() == one.tokens.tolist()
        and tree.mask[:, :1, :1].tolist() == one.mask.tolist()
    )
