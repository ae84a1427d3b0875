"""The KV-cache layouts and their in-place relocation after acceptance (docs/design.md section 7).

The one module that knows where a token's K/V lives (``cpp/`` mirrors it in
``cpp/include/redrafter/kv_relocate.h``; :mod:`redrafter_trt.native` binds the C++ twins):

- **contiguous** (the torch backend): one tensor ``[layers, 2, slots, kv_heads, max_seq, head_dim]``;
  index 0 of dim 1 is K, 1 is V; a row of the batch owns one slot. :func:`relocate_kv`.
- **paged** (the TensorRT-LLM backend): one pool ``[slots * max_blocks, layers, 2, kv_heads *
  tokens_per_block * head_dim]``; slot s owns blocks ``s*max_blocks .. (s+1)*max_blocks - 1``;
  token t of slot s lives in block ``s*max_blocks + t // tokens_per_block`` at position
  ``t % tokens_per_block``. TensorRT-LLM addresses a block as ``pool + offset * bytes_per_block``
  with the layer's pool pointer advanced by ``layer * 2 * bytes_per_block``, so the K (V) offset
  of block id is ``id * layers * 2`` (+ 1): :func:`paged_block_offsets`. :func:`relocate_paged`.
- both as a blocked, strided :class:`KvLayout` (what the C++ operator takes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import RedrafterError


def contiguous_cache_shape(
    layers: int, slots: int, kv_heads: int, max_seq: int, head_dim: int
) -> tuple[int, int, int, int, int, int]:
    """Shape of the contiguous cache: ``[layers, 2, slots, kv_heads, max_seq, head_dim]``."""
    return (layers, 2, slots, kv_heads, max_seq, head_dim)


def relocate_kv(
    cache: torch.Tensor,
    slots: torch.Tensor,
    cache_lengths: torch.Tensor,
    accepted_indices: torch.Tensor,
    num_accepted: torch.Tensor,
) -> torch.Tensor:
    """Move the accepted path's K/V next to the row's cache, in place.

    The verify forward wrote packed node i of row b at ``cache_lengths[b] + i``; the accepted
    path is packed nodes ``q_0 = 0, q_1 .. q_n``. Slot ``cache_lengths + q_k`` moves to
    ``cache_lengths + k`` for k = 1..n. Only the n moved positions are read and written.

    Args:
        cache: [layers, 2, slots, kv_heads, max_seq, head_dim], updated in place.
        slots: [B] int cache slot of each row.
        cache_lengths: [B] int tokens in the cache before the step's tree.
        accepted_indices: [B, L] int packed indices q_0..q_D.
        num_accepted: [B] int n.
    Returns:
        new cache lengths: [B] int32 = cache_lengths + n + 1.
    """
    b, l = accepted_indices.shape
    dev = cache.device
    k = torch.arange(1, l, device=dev)[None, :]
    valid = k <= num_accepted.to(torch.int64)[:, None]
    # The in-place move is well defined only for distinct slots and strictly increasing paths
    # (q_k >= k, so no destination is read after it is written); the kernels assume the same.
    if b and bool((num_accepted > 0).any()):
        if torch.unique(slots).numel() != b:
            raise ValueError(
                f"relocate_kv: rows must use distinct cache slots, got {slots.tolist()}"
            )
        steps = accepted_indices[:, 1:].to(torch.int64) - accepted_indices[:, :-1].to(torch.int64)
        if bool(((steps <= 0) & valid).any()) or bool((accepted_indices[:, 0] != 0).any()):
            raise ValueError("relocate_kv: accepted packed indices must start at 0 and increase")
    row, col = valid.nonzero(as_tuple=True)
    if row.numel():
        base = cache_lengths.to(torch.int64)[row]
        src = base + accepted_indices.to(torch.int64)[row, col + 1]
        dst = base + col + 1
        slot = slots.to(torch.int64)[row]
        moved = cache[:, :, slot, :, src]  # [M, layers, 2, kv_heads, head_dim]
        cache[:, :, slot, :, dst] = moved
    return (cache_lengths.to(torch.int64) + num_accepted.to(torch.int64) + 1).to(torch.int32)


# --------------------------------------------------------------------------- the paged pool
def blocks_per_slot(positions: int, tokens_per_block: int) -> int:
    """Blocks a slot of ``positions`` KV positions owns: ceil(positions / tokens_per_block)."""
    return -(-positions // tokens_per_block)


def paged_pool_shape(
    slots: int, max_blocks: int, layers: int, kv_heads: int, tokens_per_block: int, head_dim: int
) -> tuple[int, int, int, int]:
    """Shape of the paged pool: ``[slots * max_blocks, layers, 2, kv_heads * tokens_per_block * head_dim]``."""
    return (slots * max_blocks, layers, 2, kv_heads * tokens_per_block * head_dim)


def paged_block_offsets(slots: torch.Tensor, max_blocks: int, layers: int) -> torch.Tensor:
    """``kv_cache_block_offsets`` [1, B, 2, max_blocks] int32 of rows whose slots are ``slots`` [B]."""
    j = torch.arange(max_blocks, device=slots.device, dtype=torch.int64)
    block = slots.to(torch.int64)[:, None] * max_blocks + j[None, :]  # [B, max_blocks]
    kv = torch.arange(2, device=slots.device, dtype=torch.int64)
    return (block[:, None, :] * (layers * 2) + kv[None, :, None]).to(torch.int32)[None]


def relocate_paged(
    pool: torch.Tensor,
    slots: torch.Tensor,
    cache_lengths: torch.Tensor,
    accepted_indices: torch.Tensor,
    num_accepted: torch.Tensor,
    *,
    max_blocks: int,
    kv_heads: int,
    tokens_per_block: int,
    head_dim: int,
) -> None:
    """docs/design.md section 7 on the paged pool, in place: token ``cache_len + q_k`` moves to
    ``cache_len + k`` for k = 1..n, every row and layer at once (all sources are read before any
    destination is written, which equals the ascending in-place order because q_k >= k).

    slots, cache_lengths, num_accepted: [B] int; accepted_indices: [B, L] int.
    """
    b, l = accepted_indices.shape
    k = torch.arange(1, l, device=pool.device)
    keep = k[None, :] <= num_accepted.to(pool.device, torch.int64)[:, None]  # [B, L-1]
    if not bool(keep.any()):
        return
    base = cache_lengths.to(pool.device, torch.int64)[:, None]
    src = (base + accepted_indices.to(pool.device, torch.int64)[:, 1:])[keep]
    dst = (base + k[None, :]).expand(b, l - 1)[keep]
    first = (slots.to(pool.device, torch.int64)[:, None] * max_blocks).expand(b, l - 1)[keep]
    tpb = tokens_per_block
    view = pool.view(pool.shape[0], pool.shape[1], 2, kv_heads, tpb, head_dim)
    moved = view[first + src // tpb, :, :, :, src % tpb]  # [M, layers, 2, H, D]
    view[first + dst // tpb, :, :, :, dst % tpb] = moved


# --------------------------------------------------------------------------- strided layouts
class KvLayout(NamedTuple):
    """A blocked, strided KV-cache layout (``cpp/include/redrafter/kv_relocate.h``), in elements.

    Element (layer, kv, slot, head, t, e) lives at ``slot*stride_slot + (t // tokens_per_block) *
    stride_block + (t % tokens_per_block)*stride_token + layer*stride_layer + kv*stride_kv +
    head*stride_head + e``.
    """

    tokens_per_block: int
    stride_slot: int
    stride_block: int
    stride_token: int
    stride_layer: int
    stride_kv: int
    stride_head: int

    @classmethod
    def contiguous(cls, num_slots: int, kv_heads: int, max_seq: int, head_dim: int) -> KvLayout:
        """``[layers, 2, slots, kv_heads, max_seq, head_dim]`` row-major (:mod:`redrafter_trt.ops.kv_cache`)."""
        head = max_seq * head_dim
        slot = kv_heads * head
        return cls(max_seq, slot, slot, head_dim, 2 * num_slots * slot, num_slots * slot, head)

    @classmethod
    def paged(
        cls,
        layers: int,
        kv_heads: int,
        tokens_per_block: int,
        head_dim: int,
        max_blocks: int,
        block_stride: int | None = None,
        layer_stride: int | None = None,
        kv_stride: int | None = None,
    ) -> KvLayout:
        """TensorRT-LLM's pool ``[slots * max_blocks, layers, 2, kv_heads * tokens_per_block * head_dim]``
        (slot s owns blocks s*max_blocks ..); the outer strides default to the contiguous pool's."""
        head = tokens_per_block * head_dim
        kv = kv_heads * head if kv_stride is None else kv_stride
        layer = 2 * kv_heads * head if layer_stride is None else layer_stride
        block = layers * 2 * kv_heads * head if block_stride is None else block_stride
        return cls(tokens_per_block, max_blocks * block, block, head_dim, layer, kv, head)

    def offset(self, layer: int, kv: int, slot: int, head: int, t: int) -> int:
        """Element offset of (layer, kv, slot, head, t, 0)."""
        return (
            slot * self.stride_slot
            + (t // self.tokens_per_block) * self.stride_block
            + (t % self.tokens_per_block) * self.stride_token
            + layer * self.stride_layer
            + kv * self.stride_kv
            + head * self.stride_head
        )


def paged_pool_layout(
    pool: torch.Tensor, *, max_blocks: int, kv_heads: int, tokens_per_block: int, head_dim: int
) -> KvLayout:
    """The :class:`KvLayout` of a paged pool tensor (its outer strides taken from the tensor);
    raises :class:`~redrafter_trt.errors.RedrafterError` when ``pool`` is not such a pool."""
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or pool.shape[2] != 2:
        raise RedrafterError(
            "paged KV pool: must be a torch.Tensor [num_blocks, layers, 2, "
            f"kv_heads * tokens_per_block * head_dim], got {getattr(pool, 'shape', type(pool))}"
        )
    blocks, layers, _, block_elems = pool.shape
    if block_elems != kv_heads * tokens_per_block * head_dim or pool.stride(3) != 1:
        raise RedrafterError(
            f"paged KV pool: the last dim must be contiguous kv_heads * tokens_per_block * "
            f"head_dim = {kv_heads * tokens_per_block * head_dim}, got shape {list(pool.shape)} "
            f"strides {list(pool.stride())}"
        )
    if max_blocks < 1 or blocks % max_blocks:
        raise RedrafterError(
            f"paged KV pool: {blocks} blocks are not a whole number of slots of {max_blocks} blocks"
        )
    return KvLayout.paged(
        layers,
        kv_heads,
        tokens_per_block,
        head_dim,
        max_blocks,
        block_stride=pool.stride(0),
        layer_stride=pool.stride(1),
        kv_stride=pool.stride(2),
    )
