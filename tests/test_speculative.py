"""The whole method end to end on tiny random Llama / Qwen2 bases (float64).

Properties: greedy speculative output == plain greedy output, token for token; sampling with the
same seed gives the same tokens with and without speculation; the sampled distribution is the
target's; the KV cache after every step equals the cache plain decoding builds; acceptance lengths
0..D all occur (driven by a proposer that knows the true continuation).
"""

import numpy as np
import pytest
import torch

from conftest import ARCHS, tiered, tiny_generator
from redrafter_trt import contract as C

PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


# (d, w, arch): three corners in the fast tier, all 18 with --full
@pytest.mark.parametrize(
    "d,w,arch",
    tiered({(3, 3, "llama"), (5, 8, "qwen2"), (1, 1, "qwen2")}, [1, 3, 5], [1, 3, 8], ARCHS),
)
def test_greedy_speculative_equals_plain(tiny_dirs, arch, w, d):
    for seed in (0, 1):
        gen = tiny_generator(tiny_dirs[arch], w, d, drafter_seed=seed)
        plain = gen.generate(PROMPTS, max_new_tokens=17, speculative=False)
        spec = gen.generate(PROMPTS, max_new_tokens=17, speculative=True)
        for p, s in zip(plain, spec):
            assert s.token_ids == p.token_ids
            assert len(s.token_ids) == 17 and sum(s.accepted_per_step) == 17
            assert all(1 <= a <= d + 1 for a in s.accepted_per_step)


class OracleProposer:
    """Drafts from the known true continuation, with a planned number of correct tokens.

    For each call it picks, per row, how many draft tokens should be accepted (k in 0..D) and
    builds beams whose best beam is correct for exactly k tokens; other beams are correct for
    fewer. The test then checks that the step accepted exactly k, for every k.
    """

    def __init__(self, truth: dict[int, list[int]], w: int, d: int, vocab: int, seed: int):
        self.truth, self.w, self.d, self.vocab = truth, w, d, vocab
        self.rng = np.random.default_rng(seed)
        self.planned: dict[int, int] = {}

    def __call__(self, context, root, slots, root_positions):
        b = root.shape[0]
        beams = torch.empty((b, self.w, self.d + 1), dtype=torch.int32)
        for r in range(b):
            seq = self.truth[int(slots[r])]
            pos = int(root_positions[r])
            if pos >= len(seq):  # past the known truth (the row is about to stop): no plan
                beams[r] = int(root[r])
                self.planned[int(slots[r])] = None
                continue
            assert int(root[r]) == seq[pos], "the bonus token must be the true next token"
            avail = len(seq) - 1 - pos
            k = int(self.rng.integers(0, min(self.d, avail) + 1)) if avail > 0 else 0
            self.planned[int(slots[r])] = k
            best = int(self.rng.integers(0, self.w))
            for wi in range(self.w):
                kw = k if wi == best else int(self.rng.integers(0, k + 1))
                beam = [seq[pos]]
                for j in range(1, self.d + 1):
                    true_tok = seq[pos + j] if pos + j < len(seq) else 0
                    beam.append(
                        true_tok
                        if j <= kw
                        else (true_tok + 1 + int(self.rng.integers(0, self.vocab - 1))) % self.vocab
                    )
                beams[r, wi] = torch.tensor(beam)
        return beams


@pytest.mark.parametrize("w,d,arch", tiered({(3, 5, "llama")}, [(1, 3), (3, 5), (8, 1)], ARCHS))
def test_oracle_drives_every_acceptance_length(tiny_dirs, arch, w, d):
    prompts = PROMPTS[:3]
    # The truth runs D+ tokens past what the speculative run generates, so every planned
    # mismatch is a known wrong token.
    plain = tiny_generator(tiny_dirs[arch], w, d).generate(
        prompts, max_new_tokens=48, speculative=False
    )
    truth = {i: prompts[i] + plain[i].token_ids for i in range(len(prompts))}
    oracle = OracleProposer(truth, w, d, 97, seed=w * 10 + d)
    gen = tiny_generator(tiny_dirs[arch], w, d, proposer=oracle)
    seen = set()
    real_step = gen.backend.step

    def checked_step(inputs):
        out = real_step(inputs)
        if int(inputs[C.REQUEST_TYPES][0]) == C.GENERATION:
            for r, slot in enumerate(inputs[C.SLOT_IDS].tolist()):
                n = int(out[C.NUM_ACCEPTED_TOKENS][r])
                assert n == planned_before[slot]
                seen.add(n)
        planned_before.clear()
        planned_before.update(oracle.planned)
        return out

    planned_before: dict[int, int] = {}
    gen.backend.step = checked_step
    spec = gen.generate(prompts, max_new_tokens=40, speculative=True)
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids[:40]
    assert seen == set(range(d + 1)), f"acceptance lengths seen {sorted(seen)}, want 0..{d}"


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_after_each_step_equals_plain_cache(tiny_dirs, arch):
    w, d = 3, 3
    prompts = PROMPTS[:3]
    plain = tiny_generator(tiny_dirs[arch], w, d).generate(
        prompts, max_new_tokens=24, speculative=False
    )
    truth = {i: prompts[i] + plain[i].token_ids for i in range(3)}
    gen = tiny_generator(tiny_dirs[arch], w, d, proposer=OracleProposer(truth, w, d, 97, seed=5))
    be = gen.backend
    # Reference cache: one prefill of each full true sequence.
    model = be.base
    ref = model.new_cache(3, 64)
    with torch.no_grad():
        for i, seq in truth.items():
            t = len(seq)
            model(
                torch.tensor([seq]),
                torch.arange(t)[None],
                ref,
                torch.tensor([i]),
                torch.zeros(1, dtype=torch.long),
                torch.tril(torch.ones(t, t, dtype=torch.bool))[None],
            )
    real_step = be.step
    checks = []

    def checked_step(inputs):
        out = real_step(inputs)
        for r, slot in enumerate(inputs[C.SLOT_IDS].tolist()):
            n = int(out[C.NEW_CACHE_LENGTHS][r])
            got = be.cache[:, :, slot, :, :n]
            assert torch.allclose(got, ref[:, :, slot, :, :n], atol=1e-10), f"slot {slot} upto {n}"
            checks.append(n)
        return out

    be.step = checked_step
    spec = gen.generate(prompts, max_new_tokens=24, speculative=True)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert len(checks) > 10


@pytest.mark.parametrize("w,d,arch", tiered({(3, 3, "llama")}, [(1, 1), (3, 3), (8, 5)], ARCHS))
def test_sampling_same_seed_same_tokens(tiny_dirs, arch, w, d):
    for seed, (temp, k, p) in enumerate(
        [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.9)]
    ):
        gen = tiny_generator(tiny_dirs[arch], w, d, drafter_seed=seed)
        kw = dict(max_new_tokens=15, temperature=temp, top_k=k, top_p=p, seed=seed)
        plain = gen.generate(PROMPTS, speculative=False, **kw)
        spec = gen.generate(PROMPTS, speculative=True, **kw)
        assert [s.token_ids for s in spec] == [x.token_ids for x in plain]
        other = gen.generate(PROMPTS, speculative=False, **{**kw, "seed": seed + 100})
        assert [s.token_ids for s in other] != [x.token_ids for x in plain]


def test_sampling_with_oracle_accepts_and_stays_exact(tiny_dirs):
    """A proposer that knows the sampled continuation gets its tokens accepted under sampling."""
    w, d = 2, 4
    kw = dict(max_new_tokens=30, temperature=1.0, seed=9)
    plain = tiny_generator(tiny_dirs["llama"], w, d).generate(PROMPTS[:2], speculative=False, **kw)
    truth = {i: PROMPTS[i] + plain[i].token_ids for i in range(2)}
    gen = tiny_generator(tiny_dirs["llama"], w, d, proposer=OracleProposer(truth, w, d, 97, seed=1))
    spec = gen.generate(PROMPTS[:2], speculative=True, **kw)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert max(max(s.accepted_per_step) for s in spec) == d + 1


def chi2_threshold(dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at p = 1e-4."""
    z = 3.719
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.mark.full
def test_first_sampled_tokens_follow_target_distribution(tmp_path):
    """Over many requests, the first two tokens (the second from the tree walk) follow the
    base model's own distribution, with a small vocabulary so drafts are often accepted."""
    from conftest import write_tiny_hf
    from redrafter_trt.models.base import BaseModel  # noqa: F401

    v = 12
    path = write_tiny_hf(tmp_path / "small", "llama", seed=4, vocab=v, initializer_range=0.05)
    n = 3000
    gen = tiny_generator(path, 4, 2, max_batch_size=n, drafter_seed=2, warp_k=0)
    prompt = [3, 1, 4]
    out = gen.generate([prompt] * n, max_new_tokens=3, temperature=1.0, seed=11, ignore_eos=True)
    first = torch.tensor([o.token_ids[0] for o in out])
    second = torch.tensor([o.token_ids[1] for o in out])
    # Step 1 adds 2 tokens (of the 3 allowed) when the walk accepted the drafted second token.
    accepted_any = sum(o.accepted_per_step[1] > 1 for o in out)
    assert accepted_any > n // 10, "drafts should often be accepted with a 12-token vocabulary"
    base = gen.backend.base
    with torch.no_grad():
        seqs = torch.tensor([prompt + [t] for t in range(v)])
        cache = base.new_cache(v, 8)
        h = base(
            seqs,
            torch.arange(4).expand(v, 4),
            cache,
            torch.arange(v),
            torch.zeros(v, dtype=torch.long),
            torch.tril(torch.ones(4, 4, dtype=torch.bool)).expand(v, 4, 4),
        )
        logits = base.logits(h).double()
    p1 = torch.softmax(logits[0, 2], -1)
    p2 = torch.softmax(logits[:, 3], -1)  # [first token, second token]
    joint = p1[:, None] * p2
    counts = torch.zeros(v, v, dtype=torch.float64)
    for a, b in zip(first.tolist(), second.tolist()):
        counts[a, b] += 1
    expected = joint * n
    cells = expected > 5
    chi2 = float((((counts - expected) ** 2) / expected)[cells].sum())
    assert counts[~cells].sum() <= expected[~cells].sum() * 3 + 10
    assert chi2 < chi2_threshold(int(cells.sum()) - 1)


@pytest.mark.parametrize("w,d", [(2, 3), pytest.param(4, 5, marks=pytest.mark.full)])
def test_eos_stops_each_row_like_plain(tiny_dirs, w, d):
    """Per-row stopping at EOS: the row ends at the first EOS, inside a step or not."""
    truth = tiny_generator(tiny_dirs["llama"], w, d).generate(
        PROMPTS, max_new_tokens=30, speculative=False
    )
    eos = truth[0].token_ids[6]  # a token the first row emits at position 6
    plain_gen = tiny_generator(tiny_dirs["llama"], w, d)
    plain = plain_gen.generate(PROMPTS, max_new_tokens=30, speculative=False, eos_token_ids=[eos])
    oracle_truth = {i: PROMPTS[i] + truth[i].token_ids for i in range(len(PROMPTS))}
    spec_gen = tiny_generator(
        tiny_dirs["llama"], w, d, proposer=OracleProposer(oracle_truth, w, d, 97, seed=3)
    )
    spec = spec_gen.generate(PROMPTS, max_new_tokens=30, speculative=True, eos_token_ids=[eos])
    for t, p, s in zip(truth, plain, spec):
        assert s.token_ids == p.token_ids
        if eos in t.token_ids:
            cut = t.token_ids.index(eos) + 1
            assert p.token_ids == t.token_ids[:cut] and p.finish_reason == "eos"
        else:
            assert p.token_ids == t.token_ids and p.finish_reason == "length"
        assert sum(s.accepted_per_step) == len(s.token_ids)
    assert spec[0].finish_reason == "eos" and len(spec[0].token_ids) == 7


@pytest.mark.full
def test_batches_larger_than_max_batch_size_are_chunked(tiny_dirs):
    gen = tiny_generator(tiny_dirs["qwen2"], 2, 2, max_batch_size=3)
    prompts = [[i + 1, i + 2] for i in range(7)]
    spec = gen.generate(prompts, max_new_tokens=6)
    single = [gen.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert [s.token_ids for s in spec] == [x.token_ids for x in single]


def test_stream_events_and_results_equal_generate(tiny_dirs):
    gen = tiny_generator(tiny_dirs["llama"], 3, 3)
    want = gen.generate(PROMPTS, max_new_tokens=11)
    streamed: dict[int, list[int]] = {}
    for ev in gen.generate_stream(PROMPTS, max_new_tokens=11):
        streamed.setdefault(ev.index, []).extend(ev.token_ids)
    assert [streamed[i] for i in range(len(PROMPTS))] == [r.token_ids for r in want]
    assert [(r.token_ids, r.accepted_per_step, r.finish_reason) for r in gen.last_results] == [
        (r.token_ids, r.accepted_per_step, r.finish_reason) for r in want
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_decoding_needs_no_draft_head(tiny_dirs, arch):
    """A backend without a draft head decodes plainly (greedy and sampled) exactly as one with a
    head does, and refuses a speculative step with an error saying it has no draft head."""
    from redrafter_trt.backends.torch_backend import TorchBackend
    from redrafter_trt.errors import RedrafterError
    from redrafter_trt.runtime import Generator

    with_head = tiny_generator(tiny_dirs[arch], 1, 1)
    be = with_head.backend
    headless = Generator(
        TorchBackend(
            be.base,
            None,
            1,
            1,
            max_batch_size=be.max_batch_size,
            max_input_len=be.max_input_len,
            max_seq_len=be.max_seq_len,
        )
    )
    for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
        want = with_head.generate(PROMPTS, max_new_tokens=9, speculative=False, **kw)
        got = headless.generate(PROMPTS, max_new_tokens=9, speculative=False, **kw)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    with pytest.raises(RedrafterError, match="no draft head"):
        headless.generate(PROMPTS[:1], max_new_tokens=3, speculative=True)


# --------------------------------------------------------------------------- log-probabilities
def _serve(gen, prompts, params, speculative):
    """Every prompt through the in-flight scheduler at once; the finished requests."""
    from dataclasses import replace

    from redrafter_trt.runtime.scheduler import Scheduler

    s = Scheduler(gen.backend, max_slots=3, tokens_per_slot=64)
    reqs = [
        s.submit(p, replace(params, speculative=speculative, stream=i))
        for i, p in enumerate(prompts)
    ]
    while not all(r.finished for r in reqs):
        s.step()
    return reqs


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.9, 11)])
def test_logprobs_are_the_base_models_own_with_and_without_speculation(
    tiny_dirs, temperature, seed
):
    """``SamplingParams(logprobs=K)``: each generated token's log-probability and the K most likely
    tokens equal a single forward over prompt + output (the oracle), and are the same with and
    without speculation, greedy and seeded, while drafts of every length are accepted."""

    from redrafter_trt.runtime.scheduler import SamplingParams

    w, d, k = 3, 3, 4
    prompts = PROMPTS[:3]
    params = SamplingParams(
        max_new_tokens=20, temperature=temperature, seed=seed, ignore_eos=True, logprobs=k
    )

    def serve(gen, speculative):
        return _serve(gen, prompts, params, speculative)

    plain = serve(tiny_generator(tiny_dirs["llama"], w, d), False)
    truth = {i: prompts[i] + r.tokens for i, r in enumerate(plain)}
    gen = tiny_generator(tiny_dirs["llama"], w, d, proposer=OracleProposer(truth, w, d, 97, seed=2))
    spec = serve(gen, True)
    assert max(a for r in spec for a in r.accepted[1:]) > 1  # drafts were accepted
    model = gen.backend.base
    for prompt, p, s in zip(prompts, plain, spec):
        assert s.tokens == p.tokens and len(p.logprobs) == len(p.tokens) == 20
        assert [[t for t, _ in top] for top in s.top_logprobs] == [
            [t for t, _ in top] for top in p.top_logprobs
        ]
        np.testing.assert_allclose(s.logprobs, p.logprobs, rtol=0, atol=1e-5)
        seq = prompt + p.tokens
        t = len(seq)
        with torch.no_grad():
            cache = model.new_cache(1, 64)
            hidden = model(
                torch.tensor([seq]),
                torch.arange(t)[None],
                cache,
                torch.tensor([0]),
                torch.zeros(1, dtype=torch.long),
                torch.tril(torch.ones(t, t, dtype=torch.bool))[None],
            )
            ref = torch.log_softmax(model.logits(hidden[0], float32=False).double(), -1)
        ref = ref[len(prompt) - 1 : t - 1]
        want = ref[torch.arange(20), torch.tensor(p.tokens)].tolist()
        np.testing.assert_allclose(p.logprobs, want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(s.logprobs, want, rtol=0, atol=1e-5)
        top_lp, top_ids = ref.topk(k, -1)
        assert [[a for a, _ in top] for top in p.top_logprobs] == top_ids.tolist()
        np.testing.assert_allclose(
            [[v for _, v in top] for top in s.top_logprobs], top_lp.tolist(), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.8, 11)])
def test_logprobs_on_the_cpu_kernels_are_bit_identical_with_and_without_speculation(
    tiny_dirs, temperature, seed
):
    """On the CPU kernels (float32, batch-invariant) a verified token's logits have the bits of
    its plain-decoding logits, so its log-probabilities are exactly equal, not only close."""

    from redrafter_trt.runtime.scheduler import SamplingParams

    w, d = 3, 3
    prompts = PROMPTS[:3]
    params = SamplingParams(
        max_new_tokens=16, temperature=temperature, seed=seed, ignore_eos=True, logprobs=3
    )

    def serve(gen, speculative):
        return _serve(gen, prompts, params, speculative)

    plain_gen = tiny_generator(tiny_dirs["llama"], w, d, dtype=torch.float32)
    assert plain_gen.backend.native_linear
    plain = serve(plain_gen, False)
    truth = {i: prompts[i] + r.tokens for i, r in enumerate(plain)}
    gen = tiny_generator(
        tiny_dirs["llama"],
        w,
        d,
        dtype=torch.float32,
        proposer=OracleProposer(truth, w, d, 97, seed=2),
    )
    spec = serve(gen, True)
    assert max(a for r in spec for a in r.accepted[1:]) > 1  # drafts were accepted
    for p, s in zip(plain, spec):
        assert s.tokens == p.tokens
        assert s.logprobs == p.logprobs and s.top_logprobs == p.top_logprobs
