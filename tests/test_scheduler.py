"""In-flight batching: requests join at any step, leave at once, and give their solo outputs."""

from __future__ import annotations

import pytest

from conftest import tiny_generator
from redrafter_trt import contract as C
from redrafter_trt.runtime.scheduler import QueueFull, SamplingParams, Scheduler, SchedulerClosed
from test_slot_state import full_form, keep_trees

PROMPTS = [[5, 9, 13], [7, 3], [22, 40, 41, 8, 9], [60, 2, 2, 2], [11], [90, 91, 92, 93, 94, 95]]
SETTINGS = [
    SamplingParams(max_new_tokens=14),
    SamplingParams(max_new_tokens=9, temperature=0.9, top_k=20, seed=123),
    SamplingParams(max_new_tokens=17, temperature=1.2, top_p=0.8, seed=7),
    SamplingParams(max_new_tokens=5),
]


def recording(be):
    """Wrap ``be.step`` to record each call's request types and draft steps."""
    calls = []
    real = be.step

    def step(inputs):
        calls.append((inputs[C.REQUEST_TYPES].tolist(), int(inputs[C.NUM_DRAFT_STEPS])))
        return real(inputs)

    be.step = step
    return calls


def solo(gen, prompt, params, tokens_per_slot=64):
    """``prompt`` served alone, prefilled whole."""
    s = Scheduler(gen.backend, max_slots=1, tokens_per_slot=tokens_per_slot)
    r = s.submit(prompt, params)
    while not r.finished:
        s.step()
    return r.tokens


@pytest.fixture(scope="module")
def gen(tiny_dirs):
    return tiny_generator(tiny_dirs["llama"], 3, 3, max_batch_size=4)


@pytest.mark.parametrize("mixed", [True, pytest.param(False, marks=pytest.mark.full)])
def test_staggered_requests_equal_their_solo_runs(gen, mixed):
    want = [solo(gen, p, SETTINGS[i % 4]) for i, p in enumerate(PROMPTS)]
    be = gen.backend
    be.mixed_request_types = mixed  # False: separate context calls, as the TensorRT-LLM backend
    try:
        calls = recording(be)
        s = Scheduler(be, max_slots=3, tokens_per_slot=64)
        reqs = []
        for i, p in enumerate(PROMPTS):  # one new request every other iteration
            reqs.append(s.submit(p, SETTINGS[i % 4]))
            s.step()
            s.step()
        for _ in range(200):
            if all(r.finished for r in reqs):
                break
            s.step()
    finally:
        del be.step
        del be.mixed_request_types
    assert [r.tokens for r in reqs] == want
    assert all(sum(r.accepted) == len(r.tokens) for r in reqs)
    shared = [types for types, _ in calls if C.CONTEXT in types and C.GENERATION in types]
    if mixed:
        assert shared, "a joining prompt should share a call with running rows"
    else:
        assert not shared
    assert max(len(types) for types, _ in calls) <= 3  # never more rows than slots
    assert s.live_rows == 0 and sorted(s._free) == [0, 1, 2]


def test_cancel_frees_the_slot_before_the_next_call(gen):
    be = gen.backend
    calls = recording(be)
    try:
        s = Scheduler(be, max_slots=1, tokens_per_slot=64)
        a = s.submit(PROMPTS[0], SamplingParams(max_new_tokens=40, ignore_eos=True))
        b = s.submit(PROMPTS[1], SamplingParams(max_new_tokens=4))
        s.step()
        s.step()
        assert not a.finished and b.slot is None  # b waits: one slot only
        s.cancel(a)
        events = s.step()
    finally:
        del be.step
    assert a.finish_reason == "cancelled" and any(e.request is a and e.finished for e in events)
    assert b.slot == 0 and calls[-1][0] == [C.CONTEXT]  # b's prompt runs in the very next call
    while not b.finished:
        s.step()
    assert b.tokens == solo(gen, PROMPTS[1], SamplingParams(max_new_tokens=4))


def test_bounded_queue_and_shutdown(gen):
    s = Scheduler(gen.backend, max_queue=2, max_slots=1, tokens_per_slot=64)
    for p in PROMPTS[:3]:  # one for the free slot, two queued
        s.submit(p, SamplingParams(max_new_tokens=3))
    with pytest.raises(QueueFull, match="2 requests waiting"):
        s.submit(PROMPTS[3])
    s.start()
    s.shutdown(timeout=60)
    assert s.idle() and s.counters.finished == 3
    with pytest.raises(SchedulerClosed):
        s.submit(PROMPTS[3])


def test_draft_policy_sees_the_live_batch(gen):
    seen = []

    def policy(rows, shape):
        seen.append(len(rows))
        return 0 if len(rows) > 1 else shape.draft_len  # plain once the batch is busy

    be = gen.backend
    calls = recording(be)
    try:
        s = Scheduler(be, max_slots=4, tokens_per_slot=64, draft_policy=policy)
        reqs = [
            s.submit(p, SamplingParams(max_new_tokens=12 + 3 * i))
            for i, p in enumerate(PROMPTS[:3])
        ]
        for _ in range(100):
            if all(r.finished for r in reqs):
                break
            s.step()
    finally:
        del be.step
    assert {d for _, d in calls} == {0, 3} and 1 in seen and 3 in seen
    assert [r.tokens for r in reqs] == [
        solo(gen, p, SamplingParams(max_new_tokens=12 + 3 * i)) for i, p in enumerate(PROMPTS[:3])
    ]


def test_bad_requests_are_refused(gen):
    s = Scheduler(gen.backend, max_slots=1, tokens_per_slot=32)
    for prompt, params, msg in [
        ([], SamplingParams(), "empty prompt"),
        ([1] * 40, SamplingParams(), "room under"),
        ([1, 500], SamplingParams(), "outside"),
        ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
    ]:
        with pytest.raises(Exception, match=msg):
            s.submit(prompt, params)
    assert s.idle()


# --------------------------------------------------------------------------- chunked prefill
LONG = [
    [(7 * i + 3) % 97 for i in range(60)],
    [(5 * i + 1) % 97 for i in range(37)],
    [(11 * i + 2) % 97 for i in range(23)],
    [4, 8, 15],
]


def recording_rows(be):
    """Wrap ``be.step`` to record, per call, every row's (type, cache_lengths, input_lengths)."""
    calls = []
    real = be.step

    def step(inputs):
        calls.append(
            list(
                zip(
                    inputs[C.REQUEST_TYPES].tolist(),
                    inputs[C.CACHE_LENGTHS].tolist(),
                    inputs[C.INPUT_LENGTHS].tolist(),
                )
            )
        )
        return real(inputs)

    be.step = step
    return calls


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_prefill_gives_the_unchunked_outputs(gen, chunk):
    """Greedy and seeded sampling: the same tokens with prompts prefilled in chunks, arriving
    while others run, as each request served alone with its prompt prefilled whole."""
    settings = [
        SamplingParams(max_new_tokens=12, ignore_eos=True),
        SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_new_tokens=11, temperature=1.1, top_p=0.8, seed=9, ignore_eos=True),
        SamplingParams(max_new_tokens=8),
    ]
    want = [solo(gen, p, settings[i], 96) for i, p in enumerate(LONG)]
    be = gen.backend
    calls = recording_rows(be)
    try:
        s = Scheduler(be, max_slots=3, tokens_per_slot=96, prefill_chunk=chunk)
        reqs = []
        for i in [3, 0, 1, 2]:  # a short prompt first, the long ones join while it runs
            reqs.append(s.submit(LONG[i], settings[i]))
            s.step()
        for _ in range(300):
            if all(r.finished for r in reqs):
                break
            s.step()
    finally:
        del be.step
    assert [r.tokens for r in reqs] == [want[i] for i in [3, 0, 1, 2]]
    ctx = [(cl, n) for call in calls for kind, cl, n in call if kind == C.CONTEXT]
    assert max(n for _, n in ctx) <= chunk  # no call prefilled more than a chunk of a prompt
    assert any(cl > 0 for cl, _ in ctx)  # continuing chunks
    assert sum(1 for cl, _ in ctx if cl == 0) == len(LONG)  # each prompt starts once
    assert sum(n for _, n in ctx) == sum(len(p) for p in LONG)
    assert s.live_rows == 0 and sorted(s._free) == [0, 1, 2]


def test_running_row_keeps_decoding_while_a_long_prompt_is_prefilled(gen):
    be = gen.backend
    calls = recording_rows(be)
    chunk = 8
    try:
        s = Scheduler(be, max_slots=2, tokens_per_slot=128, prefill_chunk=chunk)
        a = s.submit([5, 9, 13], SamplingParams(max_new_tokens=60, ignore_eos=True))
        s.step()
        s.step()
        b = s.submit(LONG[0], SamplingParams(max_new_tokens=4, ignore_eos=True))
        per_step = []  # (a's new tokens, b's new tokens) per iteration until b's first token
        while not b.tokens:
            n0 = len(calls)
            evs = s.step()
            per_step.append(
                (
                    sum(len(e.token_ids) for e in evs if e.request is a),
                    sum(len(e.token_ids) for e in evs if e.request is b),
                    calls[n0:],
                )
            )
    finally:
        del be.step
    steps = -(-len(LONG[0]) // chunk)  # ceil: b's prompt takes this many iterations
    assert len(per_step) == steps
    assert all(na >= 1 for na, _, _ in per_step)  # a produced tokens in every one of them
    assert [nb for _, nb, _ in per_step] == [0] * (steps - 1) + [
        1
    ]  # b's first token after its last chunk
    for k, (_, _, cs) in enumerate(per_step):
        # one call per iteration, b's chunk beside a's generation row, continuing b's cache
        assert len(cs) == 1 and sorted(kind for kind, _, _ in cs[0]) == [C.CONTEXT, C.GENERATION]
        ((cl, n),) = [(cl, n) for kind, cl, n in cs[0] if kind == C.CONTEXT]
        assert cl == k * chunk and n == min(chunk, len(LONG[0]) - cl)
    while not (a.finished and b.finished):
        s.step()
    assert b.tokens == solo(gen, LONG[0], SamplingParams(max_new_tokens=4, ignore_eos=True), 128)
    assert a.tokens == solo(
        gen, [5, 9, 13], SamplingParams(max_new_tokens=60, ignore_eos=True), 128
    )


def test_cancel_during_a_chunked_prefill_frees_the_slot(gen):
    s = Scheduler(gen.backend, max_slots=1, tokens_per_slot=96, prefill_chunk=10)
    a = s.submit(LONG[0], SamplingParams(max_new_tokens=5))
    s.step()
    assert a.prefilling and a.prefilled == 10 and not a.tokens
    s.cancel(a)
    events = s.step()
    assert a.finish_reason == "cancelled" and [e.finished for e in events if e.request is a] == [
        True
    ]
    assert s.live_rows == 0 and s._free == [0]


def test_prefill_chunk_needs_a_backend_that_continues_a_cache(gen):
    be = gen.backend
    with pytest.raises(Exception, match="prefill_chunk must be an integer >= 1, got 0"):
        Scheduler(be, prefill_chunk=0)
    be.chunked_context = False  # e.g. a TensorRT-LLM engine built without paged context FMHA
    try:
        with pytest.raises(Exception, match="no chunked_context"):
            Scheduler(be, prefill_chunk=64)
    finally:
        del be.chunked_context


class TrtllmFeed:
    """The torch backend behind the TensorRT-LLM backend's input preparation: every call the
    scheduler makes must pass :func:`redrafter_trt.trtllm.runtime.prepare_step` (one request type
    per call, a draft length of 0 or D) before the torch backend computes it. Request-type mixing
    is the TensorRT-LLM backend's own setting; chunked context is on, as for an engine built with
    paged context FMHA. Like the TensorRT-LLM backend it keeps the trees in a slot state; each
    generation call's feed must equal the feed of the same call with every input given, built
    from host copies of the trees (what the runtime passed before backends kept them)."""

    def __init__(self, be):
        from redrafter_trt.trtllm.runtime import TrtllmBackend

        self.be = be
        self.name = TrtllmBackend.name
        self.mixed_request_types = TrtllmBackend.mixed_request_types
        self.chunked_context = True
        self.shape, self.vocab_size = be.shape, be.vocab_size
        self.max_batch_size, self.max_input_len, self.max_seq_len = (
            be.max_batch_size,
            be.max_input_len,
            be.max_seq_len,
        )
        self.prepared = []

    def reserve(self, slots, tokens):
        import torch

        from redrafter_trt.backends.slot_state import SlotState

        self.be.reserve(slots, tokens)
        self.state = SlotState(slots, self.shape, torch.device("cpu"))
        self.trees = {}  # slot -> host copies of its last call's carried outputs

    def step(self, inputs):
        import torch

        from redrafter_trt.backends.slot_state import explicit_rows
        from redrafter_trt.trtllm.runtime import prepare_step

        d = int(inputs[C.NUM_DRAFT_STEPS])
        assert d in (0, self.shape.draft_len)  # what TrtllmBackend.step accepts
        kw = dict(device=torch.device("cpu"), max_blocks=8, layers=2, kv_len=128, pool_ptr=0x1000)
        from_slots = C.from_slots(inputs)
        rows = self.state.gather(inputs) if from_slots else explicit_rows(inputs, kw["device"])
        p = prepare_step(inputs, self.shape, rows=rows, **kw)
        if from_slots and not p.is_ctx:
            given = prepare_step(full_form(inputs, self.trees, self.shape), self.shape, **kw)
            assert (p.is_ctx, p.batch, p.tokens) == (given.is_ctx, given.batch, given.tokens)
            for part in ("x", "plumbing"):
                a, b = getattr(p, part), getattr(given, part)
                assert a.keys() == b.keys()
                assert all(torch.equal(a[k], b[k]) for k in a), part
        self.prepared.append((inputs[C.CACHE_LENGTHS].clone(), p))
        out = self.be.step(inputs)
        self.state.store(rows, out)
        keep_trees(self.trees, inputs, out)
        return out


def test_the_trtllm_backend_feed_takes_every_call_of_a_chunked_in_flight_batch(gen):
    """In-flight batching with chunked prefill through the TensorRT-LLM backend's feed: separate
    context and generation calls, prompt chunks continuing their slots' caches (sequence_length
    = cached tokens + T), and every request's tokens equal to its solo run."""
    be = TrtllmFeed(gen.backend)
    settings = [
        SamplingParams(max_new_tokens=9, ignore_eos=True),
        SamplingParams(max_new_tokens=7, temperature=0.8, seed=3, ignore_eos=True),
    ]
    s = Scheduler(be, max_slots=3, tokens_per_slot=96, prefill_chunk=16)
    reqs = []
    for i, p in enumerate(LONG):
        reqs.append(s.submit(p, settings[i % 2]))
        s.step()
    for _ in range(300):
        if all(r.finished for r in reqs):
            break
        s.step()
    assert [r.finish_reason for r in reqs] == ["length"] * len(LONG)  # no call was refused
    assert [r.tokens for r in reqs] == [
        solo(gen, p, settings[i % 2], 96) for i, p in enumerate(LONG)
    ]
    ctx = [(cl, p) for cl, p in be.prepared if p.is_ctx]
    assert ctx and any(p.batch > 0 and int(cl.max()) > 0 for cl, p in ctx)  # continuing chunks ran
    for cl, p in ctx:
        assert p.tokens <= 16
        assert p.plumbing["sequence_length"].tolist() == (cl + p.tokens).tolist()
        assert p.plumbing["host_request_types"].tolist() == [C.CONTEXT] * p.batch
    assert any(not p.is_ctx for _, p in be.prepared)


def test_running_and_free_slots_follow_the_loop_and_the_requests(gen):
    """The public state the server and the serving benchmark read: the loop's, and the slots."""
    s = Scheduler(gen.backend, max_slots=2, tokens_per_slot=64)
    assert not s.running and s.free_slots == 2
    r = s.submit(PROMPTS[0], SamplingParams(max_new_tokens=4))
    s.step()  # admitted: it holds a slot until it finishes
    assert s.free_slots == 1 and not r.finished
    s.start()
    assert s.running
    s.shutdown(timeout=60)
    assert not s.running and r.finished and s.free_slots == 2
