"""In-flight batching: requests join at any step, leave at once, and give their solo outputs."""

from __future__ import annotations

import pytest

from conftest import tiny_generator
from redrafter_trt import contract as C
from redrafter_trt.runtime.scheduler import QueueFull, SamplingParams, Scheduler, SchedulerClosed

PROMPTS = [[5, 9, 13], [7, 3], [22, 40, 41, 8, 9], [60, 2, 2, 2], [11], [90, 91, 92, 93, 94, 95]]
SETTINGS = [SamplingParams(max_new_tokens=14),
            SamplingParams(max_new_tokens=9, temperature=0.9, top_k=20, seed=123),
            SamplingParams(max_new_tokens=17, temperature=1.2, top_p=0.8, seed=7),
            SamplingParams(max_new_tokens=5)]


def recording(be):
    """Wrap ``be.step`` to record each call's request types and draft steps."""
    calls = []
    real = be.step

    def step(inputs):
        calls.append((inputs[C.REQUEST_TYPES].tolist(), int(inputs[C.NUM_DRAFT_STEPS])))
        return real(inputs)

    be.step = step
    return calls


def solo(gen, prompt, params):
    s = Scheduler(gen.backend, max_slots=1, tokens_per_slot=64)
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
        reqs = [s.submit(p, SamplingParams(max_new_tokens=12 + 3 * i)) for i, p in enumerate(PROMPTS[:3])]
        for _ in range(100):
            if all(r.finished for r in reqs):
                break
            s.step()
    finally:
        del be.step
    assert {d for _, d in calls} == {0, 3} and 1 in seen and 3 in seen
    assert [r.tokens for r in reqs] == [solo(gen, p, SamplingParams(max_new_tokens=12 + 3 * i))
                                        for i, p in enumerate(PROMPTS[:3])]


def test_bad_requests_are_refused(gen):
    s = Scheduler(gen.backend, max_slots=1, tokens_per_slot=32)
    for prompt, params, msg in [([], SamplingParams(), "empty prompt"),
                                ([1] * 40, SamplingParams(), "room under"),
                                ([1, 500], SamplingParams(), "outside"),
                                ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
                                ([1], SamplingParams(top_p=0.0), "top_p")]:
        with pytest.raises(Exception, match=msg):
            s.submit(prompt, params)
    assert s.idle()
