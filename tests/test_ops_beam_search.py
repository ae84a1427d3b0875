"""Beam-search step (docs/design.md section 4) against a naive full sort of all W*V candidates."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt.ops.beam_search import (
    WARP_FILL,
    beam_search_step,
    beam_search_step_naive,
    warped_log_softmax,
)


def naive_python(logits, scores, warp_k):
    """Per-row Python oracle: warp, log-softmax, enumerate every candidate, sort by (-score, idx)."""
    b, w, v = logits.shape
    out_s, out_p, out_t = [], [], []
    for r in range(b):
        cands = []
        for wi in range(w):
            x = logits[r, wi].float() - logits[r, wi].float().max()
            if 0 < warp_k < v:
                kth = sorted(x.tolist(), reverse=True)[warp_k - 1]
                x = torch.where(x >= kth, x, torch.tensor(WARP_FILL))
            lp = torch.log_softmax(x, -1)
            for t in range(v):
                cands.append((-(scores[r, wi].float() + lp[t]).item(), wi * v + t))
        cands.sort()
        top = cands[:w]
        out_s.append([-c[0] for c in top])
        out_p.append([c[1] // v for c in top])
        out_t.append([c[1] % v for c in top])
    return torch.tensor(out_s), torch.tensor(out_p), torch.tensor(out_t)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 40),
    st.integers(0, 12),
    st.integers(0, 2**31),
    st.booleans(),
    st.booleans(),
)
def test_two_stage_equals_full_sort(b, w, v, warp_k, seed, tie_logits, tie_scores):
    if w > v:
        w = v
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((b, w, v), generator=g)
    if tie_logits:  # quantise so equal values abound
        logits = (logits * 2).round() / 2
    scores = torch.randn((b, w), generator=g)
    if tie_scores:
        scores[:] = scores[:, :1]
    scores[:, -1] = float("-inf") if w > 1 else scores[:, -1]
    got = beam_search_step(logits, scores, warp_k)
    want = beam_search_step_naive(logits, scores, warp_k)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    if b * w * v <= 400:
        ref = naive_python(logits, scores, warp_k)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])


def test_scores_descending_and_first_step_only_beam_zero():
    logits = torch.randn(2, 4, 30)
    scores = torch.tensor([[0.0] + [float("-inf")] * 3] * 2)
    s, parent, token = beam_search_step(logits, scores, 0)
    assert (parent == 0).all()
    assert (s[:, :-1] >= s[:, 1:]).all()
    lp = torch.log_softmax(logits[:, 0], -1)
    assert torch.equal(token, lp.sort(dim=-1, descending=True, stable=True).indices[:, :4])


def test_warp_keeps_ties_at_boundary_and_fills_rest():
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    lp = warped_log_softmax(x, 2)  # top-2 threshold is 2.0, both 2.0s are kept
    kept = lp > -1000
    assert kept.tolist() == [[True, False, True, True, False]]
    assert torch.allclose(lp[kept].exp().sum(), torch.tensor(1.0), atol=1e-6)


def test_half_and_bfloat16_logits_accepted():
    logits = torch.randn(1, 3, 50)
    for dt in (torch.float16, torch.bfloat16):
        got = beam_search_step(logits.to(dt), torch.zeros(1, 3), 10)
        want = beam_search_step_naive(logits.to(dt), torch.zeros(1, 3), 10)
        assert all(torch.equal(a, c) for a, c in zip(got, want))
