"""Dynamic tree attention: packing beams into a prefix tree (docs/design.md section 5), PyTorch reference.

Layout facts (one place; ``cpp/`` and the engine import or mirror them):

- node (w, d) is kept iff no lower beam shares its prefix ``beams[w, :d+1]``; packed order is
  beam-major, depth-minor over kept nodes;
- outputs are padded to ``W*L``: padding tokens are :data:`PAD_TOKEN`, padding offsets 0, and
  padding rows of the mask are all zero;
- the packed mask is int32 words ``[W*L, ceil(W*L/32)]``: bit ``j % 32`` of word ``j // 32`` in
  row ``i`` is set iff packed node ``j`` is an ancestor of packed node ``i`` or ``i`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

PAD_TOKEN = 0


@dataclass(frozen=True)
class StepShape:
    """Static sizes of an engine's step: ``W`` beams of ``D`` draft tokens, each beam ``L = D + 1``
    tokens with its root, packed into a tree of at most ``N = W * L`` nodes. The step contract
    (:mod:`redrafter_trt.contract`, which hands it on), the backends and the runtime size their
    tensors from it.

    >>> s = StepShape(num_beams=4, draft_len=3)
    >>> s.beam_len, s.tree_size, mask_words(s.tree_size)
    (4, 16, 1)
    """

    num_beams: int  # W
    draft_len: int  # D

    @property
    def beam_len(self) -> int:  # L
        return self.draft_len + 1

    @property
    def tree_size(self) -> int:  # N
        return self.num_beams * self.beam_len


def mask_words(num_nodes: int) -> int:
    """Number of int32 words per row of the packed mask for ``num_nodes`` columns.

    One word holds 32 columns, so a 4x4 tree (12 nodes) needs one word per row and 33 nodes
    need two:

    >>> mask_words(12), mask_words(32), mask_words(33)
    (1, 1, 2)
    """
    return (num_nodes + 31) // 32


class PackedTree(NamedTuple):
    """Output of :func:`pack_tree` (all int32 except ``mask``).

    tokens: [B, W*L]; lengths: [B]; unpacker: [B, W, L]; offsets: [B, W*L];
    packed_mask: [B, W*L, ceil(W*L/32)] int32; mask: [B, W*L, W*L] bool.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    unpacker: torch.Tensor
    offsets: torch.Tensor
    packed_mask: torch.Tensor
    mask: torch.Tensor


def pack_tree(beams: torch.Tensor) -> PackedTree:
    """Pack beams [B, W, L] (int) into a prefix tree; see the module docstring for the layout.

    Worked example (docs/design.md section 5), one row with W=3 beams of length L=4. All three beams
    start ``91, 92``; beam 2 also shares ``93`` with beam 0, so only its last token is new:

    >>> import torch
    >>> beams = torch.tensor([[[91, 92, 93, 95],
    ...                        [91, 92, 94, 96],
    ...                        [91, 92, 93, 97]]])
    >>> tree = pack_tree(beams)
    >>> tree.lengths.tolist()  # 7 of the W*L = 12 nodes are kept
    [7]
    >>> tree.tokens.tolist()  # beam 0, then each later beam's unshared suffix, then padding
    [[91, 92, 93, 95, 94, 96, 97, 0, 0, 0, 0, 0]]
    >>> tree.unpacker.tolist()  # packed index of node (w, d)
    [[[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]]]
    >>> tree.offsets.tolist()  # depth of each packed node; siblings share a position
    [[0, 1, 2, 3, 2, 3, 3, 0, 0, 0, 0, 0]]

    Unpacking the packed tokens gives the beams back:

    >>> torch.equal(tree.tokens[0][tree.unpacker[0].long()], beams[0].int())
    True

    Each packed node sees its ancestors and itself. Node 5 (token 96) descends from 91, 92 and
    94 (packed 0, 1, 4), so its mask row sets bits 0, 1, 4 and 5: 1 + 2 + 16 + 32 = 51. Padding
    rows are all zero:

    >>> tree.mask[0, 5, :7].int().tolist()
    [1, 1, 0, 0, 1, 1, 0]
    >>> tree.packed_mask[0, :, 0].tolist()
    [1, 3, 7, 15, 19, 51, 71, 0, 0, 0, 0, 0]

    Two identical beams share every node, so the tree is the single chain of beam 0:

    >>> same = pack_tree(torch.tensor([[[7, 8, 9], [7, 8, 9]]]))
    >>> same.lengths.tolist(), same.tokens.tolist(), same.unpacker.tolist()
    ([3], [[7, 8, 9, 0, 0, 0]], [[[0, 1, 2], [0, 1, 2]]])
    """
    b, w, l = beams.shape
    n = w * l
    dev = beams.device
    beams = beams.to(torch.int64)
    # same[b, w, v, d]: beams w and v agree on positions 0..d.
    same = (beams[:, :, None, :] == beams[:, None, :, :]).to(torch.int64).cumprod(-1).bool()
    owner = same.to(torch.int64).argmax(dim=2)  # [B, W, L] lowest beam sharing the prefix
    kept = owner == torch.arange(w, device=dev)[None, :, None]
    kept_flat = kept.reshape(b, n)
    packed_of_kept = torch.cumsum(kept_flat.to(torch.int64), -1) - 1  # valid where kept
    depth = torch.arange(l, device=dev).expand(b, w, l)
    # unpacker[b, w, d] = packed index of node (owner[b, w, d], d).
    flat_owner = owner * l + depth
    unpacker = packed_of_kept.gather(1, flat_owner.reshape(b, n)).reshape(b, w, l)
    lengths = kept_flat.sum(-1)

    dest = torch.where(kept_flat, packed_of_kept, torch.full_like(packed_of_kept, n))  # n = drop
    tokens = torch.full((b, n + 1), PAD_TOKEN, dtype=torch.int64, device=dev)
    tokens.scatter_(1, dest, beams.reshape(b, n))
    offsets = torch.zeros((b, n + 1), dtype=torch.int64, device=dev)
    offsets.scatter_(1, dest, depth.reshape(b, n))

    # Row of node (w, d) in unpacked form: ancestors are (w, d') for d' <= d.
    onehot = torch.nn.functional.one_hot(unpacker, n).to(torch.int64)  # [B, W, L, n]
    rows = torch.cumsum(onehot, dim=2).bool().reshape(b, n, n)
    mask = torch.zeros((b, n + 1, n), dtype=torch.bool, device=dev)
    mask.scatter_(1, dest[:, :, None].expand(b, n, n), rows)
    mask = mask[:, :n]
    return PackedTree(
        tokens=tokens[:, :n].to(torch.int32),
        lengths=lengths.to(torch.int32),
        unpacker=unpacker.to(torch.int32),
        offsets=offsets[:, :n].to(torch.int32),
        packed_mask=bool_to_packed_mask(mask),
        mask=mask,
    )


def bool_to_packed_mask(mask: torch.Tensor) -> torch.Tensor:
    """[..., R, C] bool -> [..., R, ceil(C/32)] int32 words, LSB first.

    Column j is bit ``j % 32`` of word ``j // 32``; bit 31 is the sign bit of the int32 word:

    >>> import torch
    >>> bool_to_packed_mask(torch.tensor([[True, False, True], [False, True, True]])).tolist()
    [[5], [6]]
    >>> bool_to_packed_mask(torch.ones(1, 32, dtype=torch.bool)).tolist()  # all 32 bits set
    [[-1]]
    >>> bool_to_packed_mask(torch.eye(33, dtype=torch.bool))[32].tolist()  # column 32: word 1
    [0, 1]
    """
    *lead, r, c = mask.shape
    words = mask_words(c)
    padded = torch.zeros((*lead, r, words * 32), dtype=torch.int64, device=mask.device)
    padded[..., :c] = mask.to(torch.int64)
    bits = padded.reshape(*lead, r, words, 32) << torch.arange(32, device=mask.device)
    packed = bits.sum(-1)  # up to 2**32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def packed_mask_to_bool(packed: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[..., R, words] int32 -> [..., R, num_cols] bool (inverse of :func:`bool_to_packed_mask`).

    >>> import torch
    >>> packed_mask_to_bool(torch.tensor([[5], [6]], dtype=torch.int32), 3).tolist()
    [[True, False, True], [False, True, True]]
    >>> packed_mask_to_bool(torch.tensor([[-1]], dtype=torch.int32), 32).all().item()
    True
    """
    bits = (packed.to(torch.int64)[..., None] >> torch.arange(32, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 32)[..., :num_cols].bool()


def root_only_tree(root: torch.Tensor, shape: StepShape) -> tuple[PackedTree, torch.Tensor]:
    """The tree of plain decoding (``num_draft_steps`` 0): just the root token, padded to the
    engine's ``W*L`` layout. Returns (tree, beams [B, W, L] int32 = ``[root, -1, ...]``).

    root: [B] int (the token each row emitted last). For ``root = [7]`` with W=2, L=2:
    beams ``[[[7, -1], [7, -1]]]``, tokens ``[[7, 0, 0, 0]]``, lengths ``[1]``, unpacker all 0,
    offsets all 0, mask row 0 = ``{0}`` and rows 1.. empty (packed_mask ``[[[1], [0], [0], [0]]]``).
    """
    b = root.shape[0]
    w, l, n = shape.num_beams, shape.beam_len, shape.tree_size
    dev = root.device
    beams = torch.full((b, w, l), -1, dtype=torch.int32, device=dev)
    beams[:, :, 0] = root.to(torch.int32)[:, None]
    tokens = torch.full((b, n), PAD_TOKEN, dtype=torch.int32, device=dev)
    tokens[:, 0] = root.to(torch.int32)
    mask = torch.zeros((b, n, n), dtype=torch.bool, device=dev)
    mask[:, 0, 0] = True
    return PackedTree(
        tokens=tokens,
        lengths=torch.ones(b, dtype=torch.int32, device=dev),
        unpacker=torch.zeros((b, w, l), dtype=torch.int32, device=dev),
        offsets=torch.zeros((b, n), dtype=torch.int32, device=dev),
        packed_mask=bool_to_packed_mask(mask),
        mask=mask,
    ), beams
