"""Target distributions, inverse CDF and counter-based uniforms (docs/design.md section 6)."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt.ops import draw_tokens, inverse_cdf, position_uniforms, target_probs


def test_uniforms_are_counter_based_and_in_range():
    pos = np.arange(1000)
    u = position_uniforms(7, 3, pos)
    assert u.dtype == np.float32 and (u >= 0).all() and (u < 1).all()
    # Same (seed, request, position) -> same value, however it is asked for.
    assert np.array_equal(position_uniforms(7, 3, pos[500:510]), u[500:510])
    assert np.array_equal(position_uniforms(7, np.array([3, 3]), np.array([5, 9])), u[[5, 9]])
    # Different requests / seeds give different streams; roughly uniform.
    assert not np.array_equal(position_uniforms(7, 4, pos), u)
    assert not np.array_equal(position_uniforms(8, 3, pos), u)
    assert abs(u.mean() - 0.5) < 0.05 and abs(np.histogram(u, 10)[0] - 100).max() < 45


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 30),
    st.integers(0, 35),
    st.floats(0.05, 1.0),
    st.floats(0.1, 3.0),
    st.integers(0, 10**6),
)
def test_target_probs_rules(v, k, p, temp, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, v, generator=g) * 3).round()  # ties on purpose
    probs = target_probs(logits, torch.tensor([temp]), torch.tensor([k]), torch.tensor([p]))[0]
    assert probs.dtype == torch.float64 and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-9)
    z = logits[0].double() / temp
    keep = torch.ones(v, dtype=torch.bool)
    if 0 < k < v:
        keep = z >= z.sort(descending=True).values[k - 1]
    full = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
    if p < 1:
        order = sorted(range(v), key=lambda i: (-float(full[i]), i))
        run, kept = 0.0, set()
        for i in order:
            if run < p or not kept:
                kept.add(i)
            run += float(full[i])
        keep = torch.tensor([i in kept for i in range(v)])
    want = full * keep
    want = want / want.sum()
    assert torch.allclose(probs, want, atol=1e-12)


def test_inverse_cdf_picks_by_token_id_order():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25]], dtype=torch.float64)
    got = [
        int(inverse_cdf(probs, torch.tensor([u]))[0])
        for u in (0.0, 0.2499, 0.25, 0.74, 0.75, 0.999999)
    ]
    assert got == [1, 1, 3, 3, 4, 4]


def test_greedy_rows_take_lowest_id_argmax():
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [2.0, 0.0, 2.0, 2.0]])
    toks = draw_tokens(
        logits,
        torch.zeros(2),
        torch.zeros(2, dtype=torch.int32),
        torch.ones(2),
        torch.tensor([0.9, 0.9]),
    )
    assert toks.tolist() == [1, 0]


def test_sampling_matches_distribution_chi_square():
    v, n = 8, 20000
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0, 1.5, -2.0, 0.3]]).expand(n, v)
    u = torch.from_numpy(position_uniforms(123, np.arange(n), np.zeros(n, dtype=np.int64)))
    ones = torch.ones(n)
    toks = draw_tokens(logits, ones * 0.8, torch.zeros(n, dtype=torch.int32), ones, u)
    counts = torch.bincount(toks, minlength=v).double()
    expected = torch.softmax(logits[0].double() / 0.8, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # 7 dof: p ~ 1e-4
