"""Acceptance (docs/design.md section 6) against a per-beam greedy oracle, and KV relocation (section 7)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_trt.ops import accept, pack_tree, relocate_kv


def greedy_oracle(logits, beams, unpacker):
    b, w, l = beams.shape
    out = []
    for r in range(b):
        best_n, best_w = -1, 0
        for wi in range(w):
            n = 0
            while n < l - 1 and int(beams[r, wi, n + 1]) == int(
                logits[r, unpacker[r, wi, n]].argmax()
            ):
                n += 1
            if n > best_n:
                best_n, best_w = n, wi
        bonus = int(logits[r, unpacker[r, best_w, best_n]].argmax())
        out.append((best_n, best_w, bonus))
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(2, 6),
    st.integers(0, 10**6),
)
def test_greedy_accept_equals_oracle(b, w, l, v, seed):
    g = torch.Generator().manual_seed(seed)
    beams = torch.randint(0, v, (b, w, l), generator=g)
    beams[:, :, 0] = beams[:, :1, 0]
    tree = pack_tree(beams)
    logits = torch.randn((b, w * l, v), generator=g).round()  # ties: lowest id wins
    z = torch.zeros(b)
    acc = accept(
        logits,
        beams,
        tree.unpacker,
        z,
        torch.zeros(b, dtype=torch.int32),
        torch.ones(b),
        torch.rand((b, l), generator=g),
    )
    for r, (n, best, bonus) in enumerate(greedy_oracle(logits, beams, tree.unpacker)):
        assert (int(acc.num_accepted[r]), int(acc.best_beam[r]), int(acc.bonus[r])) == (
            n,
            best,
            bonus,
        )
        path = [int(tree.unpacker[r, best, d]) for d in range(n + 1)]
        assert acc.accepted_indices[r, : n + 1].tolist() == path
        assert acc.emitted[r, : n + 1].tolist() == beams[r, best, 1 : n + 1].tolist() + [bonus]
        assert (acc.emitted[r, n + 1 :] == -1).all()


def test_sampling_walk_follows_drawn_tokens():
    # Vocab 3, logits make token 2 certain at the root and token 0 certain below it.
    beams = torch.tensor([[[1, 0, 1], [1, 2, 0], [1, 2, 1]]])
    tree = pack_tree(beams)
    logits = torch.full((1, 9, 3), -1e9)
    logits[0, :, 0] = 0.0
    logits[0, 0] = torch.tensor([-1e9, -1e9, 0.0])
    acc = accept(
        logits,
        beams,
        tree.unpacker,
        torch.ones(1),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1),
        torch.full((1, 3), 0.5),
    )
    # Root draws 2 -> beam 1 (lowest beam with 2), then draws 0 -> beam 1 again, leaf: bonus 0.
    assert (int(acc.num_accepted), int(acc.best_beam), int(acc.bonus)) == (2, 1, 0)
    assert acc.emitted[0].tolist() == [2, 0, 0]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 10**6))
def test_relocate_moves_exactly_the_accepted_path(b, l, seed):
    g = torch.Generator().manual_seed(seed)
    slots_total, cap = b + 2, 40
    cache = torch.randn((2, 2, slots_total, 2, cap, 3), generator=g)
    before = cache.clone()
    slots = torch.randperm(slots_total, generator=g)[:b]
    lens = torch.randint(1, 10, (b,), generator=g)
    n = torch.randint(0, l, (b,), generator=g)
    path = torch.zeros((b, l), dtype=torch.long)
    for r in range(b):
        steps = torch.randint(1, 3, (l,), generator=g).cumsum(0)
        path[r, 1:] = steps[: l - 1]
    new = relocate_kv(cache, slots, lens, path, n)
    assert new.tolist() == (lens + n + 1).tolist()
    want = before.clone()
    for r in range(b):
        s, c = int(slots[r]), int(lens[r])
        for k in range(1, int(n[r]) + 1):  # sequential in-place semantics, ascending k
            want[:, :, s, :, c + k] = want[:, :, s, :, c + int(path[r, k])]
    assert torch.equal(cache, want)
