"""Acceptance of a verified tree (docs/design.md section 6), the PyTorch reference.

One tree walk serves greedy and sampling rows alike. At depth d the walk stands at a packed node
whose path equals ``beams[w, :d+1]`` for every beam w in the row's ``match`` set; it draws token
x from the target distribution at that node (:func:`~redrafter_trt.ops.sampling.draw_tokens`,
uniform ``uniforms[:, d]``), moves to the child carrying x if any beam in the set continues with
x, else emits x as the bonus token and stops. At depth D (a leaf) the draw is the bonus.

For greedy rows this is exactly the rule of docs/design.md section 6: the beams still in ``match`` when the walk stops
are those with the longest accepted prefix, and the accepted beam is the lowest of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .sampling import draw_tokens


class Acceptance(NamedTuple):
    """num_accepted: [B] int32 (draft tokens accepted, 0..D); best_beam: [B] int32;
    bonus: [B] int32; accepted_indices: [B, L] int32, packed indices of the accepted path
    (index 0 is the root, entries past ``num_accepted`` repeat the last node);
    emitted: [B, L] int32, the tokens the step adds (``num_accepted + 1`` of them, then -1)."""

    num_accepted: torch.Tensor
    best_beam: torch.Tensor
    bonus: torch.Tensor
    accepted_indices: torch.Tensor
    emitted: torch.Tensor


def accept(
    logits: torch.Tensor,
    beams: torch.Tensor,
    unpacker: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> Acceptance:
    """Walk each row's tree and decide what the step emits.

    Args:
        logits: [B, N, V] base logits at the packed nodes (N >= packed length; padding unread).
        beams: [B, W, L] int draft beams (``beams[:, :, 0]`` is the root token g0).
        unpacker: [B, W, L] int packed index of each node.
        temperature: [B] float (<= 0 = greedy); top_k: [B] int (0 = off); top_p: [B] float.
        uniforms: [B, L] float32, the uniform of the k-th emitted token in column k.
    Returns:
        :class:`Acceptance`.
    """
    b, w, l = beams.shape
    dev = logits.device
    rows = torch.arange(b, device=dev)
    beams = beams.to(torch.int64)
    unpacker = unpacker.to(torch.int64)
    match = torch.ones((b, w), dtype=torch.bool, device=dev)
    node = torch.zeros(b, dtype=torch.int64, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    num_accepted = torch.zeros(b, dtype=torch.int64, device=dev)
    best = torch.zeros(b, dtype=torch.int64, device=dev)
    bonus = torch.zeros(b, dtype=torch.int64, device=dev)
    path = torch.zeros((b, l), dtype=torch.int64, device=dev)
    emitted = torch.full((b, l), -1, dtype=torch.int64, device=dev)
    for d in range(l):
        x = draw_tokens(logits[rows, node], temperature, top_k, top_p, uniforms[:, d])
        emitted[:, d] = torch.where(active, x, emitted[:, d])
        if d + 1 < l:
            child = match & (beams[:, :, d + 1] == x[:, None])
            moves = active & child.any(-1)
        else:
            child = match
            moves = torch.zeros_like(active)
        stops = active & ~moves
        lowest = match.to(torch.int64).argmax(-1)
        num_accepted = torch.where(stops, d, num_accepted)
        best = torch.where(stops, lowest, best)
        bonus = torch.where(stops, x, bonus)
        if d + 1 < l:
            next_beam = child.to(torch.int64).argmax(-1)
            next_node = unpacker[rows, next_beam, d + 1]
            node = torch.where(moves, next_node, node)
            match = torch.where(moves[:, None], child, match)
            path[:, d + 1] = node
        active = moves
    return Acceptance(
        num_accepted.to(torch.int32),
        best.to(torch.int32),
        bonus.to(torch.int32),
        path.to(torch.int32),
        emitted.to(torch.int32),
    )
