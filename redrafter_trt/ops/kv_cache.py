"""The contiguous KV cache and its in-place relocation after acceptance (SPEC section 7).

Layout (shared with ``cpp/``): one tensor ``[layers, 2, slots, kv_heads, max_seq, head_dim]``;
index 0 of dim 1 is K, 1 is V; a row of the batch owns one slot.
"""

from __future__ import annotations

import torch


def relocate_kv(cache: torch.Tensor, slots: torch.Tensor, cache_lengths: torch.Tensor,
                accepted_indices: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
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
            raise ValueError(f"relocate_kv: rows must use distinct cache slots, got {slots.tolist()}")
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
