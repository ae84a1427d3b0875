"""Target distributions, inverse-CDF draws and the counter-based uniforms (docs/design.md section 6).

Plain sampling and the speculative tree walk both draw through :func:`draw_tokens`, with the
uniform of the token's absolute position from :func:`position_uniforms`; with equal seeds they
therefore emit the same tokens (up to floating-point ties in the logits themselves).

Rules (shared with the C++ reference, ``cpp/include/redrafter/sampling.h``):

- ``temperature <= 0`` means greedy: argmax, ties to the lowest token id.
- Otherwise, in float64: ``z = logits / temperature``; top-k (``k > 0``) keeps every token whose
  ``z`` is >= the k-th largest ``z`` (ties at the boundary are kept); then softmax; top-p
  (``p < 1``) sorts the kept tokens by probability, descending, ties by lower token id, and keeps
  the shortest prefix whose exclusive running sum is below ``p`` (the first token is always
  kept); renormalise.
- Inverse CDF over token ids in id order: the drawn token is the smallest id whose inclusive
  cumulative probability exceeds ``u * total``; clamped to the last token with non-zero
  probability.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = x
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def position_uniforms(seed: int, request: np.ndarray | int, positions: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) for absolute token positions, keyed by (seed, request).

    Counter-based: the value depends only on (seed, request, position), never on how many values
    were drawn before, so plain and speculative decoding see the same uniform for the same
    position. Exactly representable in float32 (24 random bits).

    Args:
        seed: int (any Python int; reduced modulo 2**64).
        request: int or int array broadcastable against ``positions``.
        positions: int array of absolute token positions (prompt tokens count).
    Returns:
        float32 array with the broadcast shape of ``request`` and ``positions``.
    """
    with np.errstate(over="ignore"):
        s = _splitmix64(np.asarray(seed % (1 << 64), dtype=np.uint64))
        key = _splitmix64(s ^ np.asarray(request, dtype=np.int64).astype(np.uint64))
        ctr = np.asarray(positions, dtype=np.int64).astype(np.uint64)
        h = _splitmix64(key ^ ((ctr * np.uint64(0xD1B54A32D192ED03)) & _MASK64))
    return ((h >> np.uint64(40)).astype(np.float64) * (1.0 / (1 << 24))).astype(np.float32)


def target_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The sampling distribution of each row, exactly as plain sampling defines it.

    Args:
        logits: [N, V] any float dtype.
        temperature: [N] float, > 0 for the rows that matter (greedy rows give garbage here).
        top_k: [N] int, 0 = off.
        top_p: [N] float in (0, 1], 1 = off.
    Returns:
        probs: [N, V] float64, each row summing to 1.
    """
    n, v = logits.shape
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    z = logits.to(torch.float64) / temp.to(torch.float64)[:, None]
    k = top_k.to(torch.int64).clamp(min=0)
    k = torch.where((k == 0) | (k > v), torch.full_like(k, v), k)
    if bool((k < v).any()):
        kth = torch.sort(z, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    p = top_p.to(torch.float64)
    if bool((p < 1).any()):
        # Stable descending sort: equal probabilities keep ascending token-id order.
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        exclusive = torch.cumsum(sorted_p, dim=-1) - sorted_p
        keep_sorted = exclusive < p[:, None]
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        cut = probs * keep
        # Only rows with a real top-p cut are renormalised, so a row never depends on the others.
        probs = torch.where((p < 1)[:, None], cut / cut.sum(-1, keepdim=True), probs)
    return probs


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row by inverse CDF over token ids.

    Args:
        probs: [N, V] float64 (need not be normalised).
        uniforms: [N] float in [0, 1).
    Returns:
        tokens: [N] int64.
    """
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms.to(torch.float64) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    v = probs.shape[-1]
    ids = torch.arange(v, device=probs.device)
    last_nonzero = torch.where(probs > 0, ids, torch.zeros_like(ids)).amax(-1)
    return torch.minimum(tok, last_nonzero)


def draw_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """One token per row: greedy where ``temperature <= 0``, else exact sampling.

    Args:
        logits: [N, V]; temperature, top_p: [N] float; top_k: [N] int; uniforms: [N] float.
    Returns:
        tokens: [N] int64.
    """
    greedy = torch.argmax(logits, dim=-1)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    probs = target_probs(logits, temperature, top_k, top_p)
    sampled = inverse_cdf(probs, uniforms)
    return torch.where(sampled_rows, sampled, greedy)
