"""Beam-search step of the drafter (docs/design.md section 4), the PyTorch reference.

``beam_search_step`` is the operator the CUDA kernel and the C++ reference implement; the draft
loop that calls it D times lives in :mod:`redrafter_trt.models.drafter`.

Rules (shared with ``cpp/``):

- warp: with ``warp_k > 0`` and ``warp_k < V``, logits are shifted by their row max, and every
  logit below the ``warp_k``-th largest of its row (ties at the boundary kept) becomes
  :data:`WARP_FILL`; then ``log_softmax`` in float32.
- candidate score = beam score + logp, flat index ``w * V + v``; the top W candidates are
  taken in descending score, ties to the lower flat index; ``parent = idx // V``,
  ``token = idx % V``.
- reduced draft vocabulary: the logits' last dim is then the head's K columns, every rule above
  runs over K (warp, log_softmax, ties by ``w * K + k``), and ``token = vocab_map[idx % K]``
  maps the column to its full-vocabulary id.
"""

from __future__ import annotations

import torch

#: Value given to warped-out logits (after the row-max shift), as Apple's reference does.
WARP_FILL = -50000.0
#: Default top-k warp of the drafter's logits (0 turns it off).
DEFAULT_WARP_K = 50


def warped_log_softmax(logits: torch.Tensor, warp_k: int) -> torch.Tensor:
    """log_softmax of top-k-warped logits over the last dim, in float32.

    Args:
        logits: [..., V] float32/float16/bfloat16.
        warp_k: keep the top ``warp_k`` logits (ties kept); 0 or >= V = no warp.
    Returns:
        logp: [..., V] float32.
    """
    x = logits.to(torch.float32)
    x = x - x.amax(dim=-1, keepdim=True)
    v = x.shape[-1]
    if 0 < warp_k < v:
        kth = torch.topk(x, warp_k, dim=-1).values[..., -1:]
        x = torch.where(x >= kth, x, torch.full_like(x, WARP_FILL))
    return torch.log_softmax(x, dim=-1)


def _top_w_lowest_index(values: torch.Tensor, w: int) -> torch.Tensor:
    """Indices of the top ``w`` entries of each row, ties to the lower index (unordered).

    Fast path: ``topk(w + 1)``; a row whose w-th and (w+1)-th values differ has exactly its
    first ``w`` indices as the answer, whatever order ``topk`` returned them in. Rows with a tie
    at the boundary take the exact path (count the strictly greater, then the lowest-indexed
    equal ones).

    Args:
        values: [N, M] float32; w <= M.
    Returns:
        idx: [N, w] int64, the selected set (in no particular order).
    """
    n, m = values.shape
    if w == m:
        return torch.arange(m, device=values.device).expand(n, m)
    top_vals, top_idx = torch.topk(values, w + 1, dim=-1)
    out = top_idx[:, :w].clone()
    tied = top_vals[:, w - 1] == top_vals[:, w]
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)[0]
        sub = values[rows]
        thr = top_vals[rows, w - 1 : w]
        greater = sub > thr
        equal = sub == thr
        need = w - greater.sum(-1, keepdim=True)
        take_equal = equal & (torch.cumsum(equal.to(torch.int64), dim=-1) <= need)
        selected = greater | take_equal
        # Distinct positive keys for selected entries; topk then returns exactly that set.
        key = torch.where(selected, m - torch.arange(m, device=values.device), 0)
        out[rows] = torch.topk(key, w, dim=-1).indices
    return out


def _mapped(column: torch.Tensor, vocab_map: torch.Tensor | None) -> torch.Tensor:
    """Logit column [B, W] -> full-vocabulary token id through ``vocab_map`` [K] (None = identity)."""
    return (
        column
        if vocab_map is None
        else vocab_map.to(device=column.device, dtype=torch.int64)[column]
    )


def beam_search_step(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    warp_k: int = DEFAULT_WARP_K,
    vocab_map: torch.Tensor | None = None,
):
    """One beam-search step over W beams.

    Two-stage, as the kernels do: each beam's own top W (ties to the lower token id), then the
    top W of the W*W union (ties to the lower flat index). Equal to the top W over all W*V
    candidates with the same tie rule, because a candidate outside its beam's top W has W better
    (or equal, lower-indexed) candidates in the same beam.

    Args:
        logits: [B, W, V] drafter logits (float32/float16/bfloat16).
        beam_scores: [B, W] float32, ``-inf`` for dead beams.
        warp_k: top-k warp of the logits (0 = off).
        vocab_map: None, or [V] int (V = logits' last dim, a head's draft vocabulary K): the
            full-vocabulary id of each logit column.
    Returns:
        new_scores: [B, W] float32, descending; parent: [B, W] int64; token: [B, W] int64
        (a full-vocabulary id with ``vocab_map``).
    """
    b, w, v = logits.shape
    logp = warped_log_softmax(logits, warp_k)  # [B, W, V]
    scores = beam_scores.to(torch.float32)[:, :, None] + logp
    local = _top_w_lowest_index(scores.reshape(b * w, v), w).reshape(b, w, w)  # token ids
    local_scores = scores.gather(2, local)  # [B, W, W]
    flat = local + (torch.arange(w, device=logits.device) * v)[None, :, None]
    flat = flat.reshape(b, w * w)
    local_scores = local_scores.reshape(b, w * w)
    # Order the union by flat index, then stable-sort by score so ties keep the lower index.
    by_index = torch.argsort(flat, dim=-1)
    flat = flat.gather(1, by_index)
    local_scores = local_scores.gather(1, by_index)
    order = torch.sort(local_scores, dim=-1, descending=True, stable=True).indices[:, :w]
    top = flat.gather(1, order)
    return local_scores.gather(1, order), top // v, _mapped(top % v, vocab_map)


def beam_search_step_naive(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    warp_k: int = DEFAULT_WARP_K,
    vocab_map: torch.Tensor | None = None,
):
    """The same step by a full stable sort of all W*V candidates (test oracle)."""
    b, w, v = logits.shape
    logp = warped_log_softmax(logits, warp_k)
    cand = (beam_scores.to(torch.float32)[:, :, None] + logp).reshape(b, w * v)
    order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[:, :w]
    return cand.gather(1, order), order // v, _mapped(order % v, vocab_map)
