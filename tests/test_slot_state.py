"""Carried tree state stays in the backend (contract ``FROM_SLOTS``): a call that passes slot ids
computes what the same call with every input given computes, bit for bit; the scheduler reads no
tree back; a slot's tree is the last call's and ``reserve`` drops them all; the phase timer."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import tiny_generator
from redrafter_trt import contract as C
from redrafter_trt.backends.slot_state import explicit_rows
from redrafter_trt.backends.timing import PhaseTimer
from redrafter_trt.backends.torch_backend import TorchBackend
from redrafter_trt.errors import RedrafterError
from redrafter_trt.runtime.scheduler import SamplingParams, Scheduler

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [
    [(7 * i + 3) % 97 for i in range(21)],
    [5, 9, 13],
    [(5 * i + 1) % 97 for i in range(13)],
    [60, 2, 2, 2],
    [11, 12],
]
SETTINGS = [
    SamplingParams(max_new_tokens=11, ignore_eos=True),
    SamplingParams(max_new_tokens=9, temperature=0.9, top_k=20, seed=5, ignore_eos=True),
    SamplingParams(max_new_tokens=12, temperature=1.1, top_p=0.8, seed=9, ignore_eos=True),
]


def keep_trees(trees: dict, inputs: dict, out: dict) -> None:
    """Host copies of each row's carried outputs, by slot (what the runtime kept before)."""
    for j, slot in enumerate(inputs[C.SLOT_IDS].tolist()):
        trees[slot] = {dst: out[src][j].cpu().clone() for src, dst in C.CARRIED.items()}


def full_form(inputs: dict, trees: dict, shape: C.StepShape) -> dict:
    """The same call with every input given, generation rows' carried inputs from ``trees``, laid
    out row by row as the scheduler laid them out (width: the longest context chunk, at least N
    with generation rows; elsewhere each tensor's pad)."""
    is_gen = [t == C.GENERATION for t in inputs[C.REQUEST_TYPES].tolist()]
    slots = inputs[C.SLOT_IDS].tolist()
    width = max([inputs[C.INPUT_IDS].shape[1]] + [shape.tree_size] * any(is_gen))
    sizes = C.dim_sizes(len(slots), width, shape)
    full = {k: v for k, v in inputs.items() if k != C.FROM_SLOTS}
    for name in C.CARRIED.values():
        x = C.SPECS[name].new(sizes)
        if name in inputs:
            given = inputs[name]
            x[tuple(slice(0, k) for k in given.shape)] = given
        for j, g in enumerate(is_gen):
            if g:
                tree = trees[slots[j]][name]
                x[j][tuple(slice(0, k) for k in tree.shape)] = tree
        full[name] = x
    return full


class Cycling:
    """Draft shapes (beams, depth) in turn, one per call (the adaptive policy's interface)."""

    def __init__(self, shapes):
        self.shapes, self.i = shapes, 0

    def choose(self, batch_size):
        self.i += 1
        return self.shapes[self.i % len(self.shapes)]

    def observe(self, beams, depth, accepted):
        pass


def backend_on(tiny_dirs, device: str) -> TorchBackend:
    be = tiny_generator(tiny_dirs["llama"], 3, 3, max_batch_size=4).backend
    if device == "cpu":
        return be
    return TorchBackend(
        be.base.to(device), be.drafter.to(device), 3, 3, warp_k=be.warp_k, max_batch_size=4
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_a_call_from_slots_computes_what_the_call_with_every_input_computes(tiny_dirs, device):
    """Two backends over the same weights, each with its own cache: one gets the scheduler's
    calls (slot ids, no trees), the other the same calls with every input given, built from host
    copies of the trees. Every call gives both the same rows (device tensors and host facts) and
    the same outputs, bit for bit: mixed calls, prompt chunks, freed slots taken by new requests
    and a draft shape changing every call included. The scheduler's cache length of each running
    request is the backend's."""
    slots_be = backend_on(tiny_dirs, device)
    given_be = slots_be.reshaped(3, 3)  # the same modules, its own cache
    given_be.reserve(3, 96)
    shape, trees, new_len, kinds = slots_be.shape, {}, {}, set()
    real = slots_be.step

    def step(inputs):
        assert C.from_slots(inputs) and not set(C.GENERATION_ONLY) & set(inputs)
        full = full_form(inputs, trees, shape)
        got, want = slots_be.slot_state.gather(inputs), explicit_rows(full, slots_be.device)
        assert got.x.keys() == want.x.keys()
        assert all(torch.equal(got.x[k], want.x[k]) for k in got.x)
        assert torch.equal(got.index, want.index)
        for fact in ("is_ctx", "slots", "lengths", "cache_lengths", "depths"):
            assert getattr(got, fact) == getattr(want, fact), fact
        out = real(inputs)
        ref = given_be.step(full)
        assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in out)
        keep_trees(trees, inputs, out)
        types = set(inputs[C.REQUEST_TYPES].tolist())
        kinds.add("mixed" if len(types) == 2 else "context" if C.CONTEXT in types else "gen")
        kinds.add(("depth", got.depth))
        new_len.update(zip(inputs[C.SLOT_IDS].tolist(), out[C.NEW_CACHE_LENGTHS].tolist()))
        return out

    slots_be.step = step
    s = Scheduler(slots_be, max_slots=3, tokens_per_slot=96, prefill_chunk=8)
    s.policy = Cycling([(3, 3), (2, 2), (1, 0), (3, 1), (1, 3)])
    reqs = []
    for i, p in enumerate(PROMPTS):
        reqs.append(s.submit(p, SETTINGS[i % 3]))
        s.step()
    for _ in range(200):
        if all(r.finished for r in reqs):
            break
        s.step()
        for r in reqs:
            if r.generating:
                assert r.cache_length == new_len[r.slot]
    assert [r.finish_reason for r in reqs] == ["length"] * len(PROMPTS)
    assert {"mixed", "gen", "context"} <= kinds  # every kind of call ran
    assert {("depth", k) for k in (1, 2, 3, 4)} <= kinds  # trees of every depth were verified


def test_the_scheduler_reads_no_tree_back(tiny_dirs):
    """With every carried output withheld from it, the scheduler gives the same tokens: it reads
    only what the rows emit. A call of generation rows only passes no token of a tree."""
    be = tiny_generator(tiny_dirs["llama"], 3, 3, max_batch_size=4).backend

    def run(withhold: bool) -> list[list[int]]:
        widths = []
        real = be.step

        def step(inputs):
            if C.CONTEXT not in inputs[C.REQUEST_TYPES].tolist():
                widths.append(inputs[C.INPUT_IDS].shape[1])
            out = real(inputs)
            return {k: v for k, v in out.items() if k not in C.CARRIED} if withhold else out

        be.step = step
        try:
            s = Scheduler(be, max_slots=2, tokens_per_slot=64)
            reqs = [s.submit(p, SETTINGS[i % 3]) for i, p in enumerate(PROMPTS)]
            while not all(r.finished for r in reqs):
                s.step()
        finally:
            del be.step
        assert widths and set(widths) == {0}
        return [r.tokens for r in reqs]

    assert run(withhold=True) == run(withhold=False)


def one_call(slots, kind, shape, from_slots=False):
    """Inputs of a greedy call over ``slots`` (context: the prompt [5, 6, 7] in each)."""
    ctx = kind == C.CONTEXT
    sizes = C.dim_sizes(len(slots), 3 if ctx else 0, shape)
    x = {
        s.name: s.new(sizes)
        for s in C.INPUT_SPECS
        if s.required and not (from_slots and s.generation_only)
    }
    x[C.REQUEST_TYPES][:] = kind
    x[C.SLOT_IDS] = C.input_tensor(C.SLOT_IDS, slots)
    x[C.TOP_P][:] = 1
    x[C.NUM_DRAFT_STEPS] = C.input_tensor(C.NUM_DRAFT_STEPS, shape.draft_len)
    if ctx:
        x[C.INPUT_IDS][:] = C.input_tensor(C.INPUT_IDS, [5, 6, 7])
        x[C.INPUT_LENGTHS][:] = 3
    if from_slots:
        x[C.FROM_SLOTS] = C.input_tensor(C.FROM_SLOTS, 1)
    return x


def test_a_slot_holds_the_last_calls_tree_until_reserve_drops_it(tiny_dirs):
    be = tiny_generator(tiny_dirs["llama"], 2, 2).backend
    shape = be.shape
    be.reserve(2, 32)
    gen = lambda slots: one_call(slots, C.GENERATION, shape, from_slots=True)  # noqa: E731
    with pytest.raises(RedrafterError, match=r"slots \[1\]: no call has left a tree"):
        be.step(gen([1]))
    first = be.step(one_call([0], C.CONTEXT, shape))  # a call with every input leaves one too
    second = be.step(gen([0]))
    assert int(second[C.NEW_CACHE_LENGTHS][0]) == int(first[C.NEW_CACHE_LENGTHS][0]) + int(
        second[C.NUM_OUTPUT_TOKENS][0]
    )
    with pytest.raises(RedrafterError, match=r"slots \[1\]"):
        be.step(gen([0, 1]))
    with pytest.raises(RedrafterError, match=r"slot ids \[5\] outside the 2 slots"):
        be.step(gen([5]))
    with pytest.raises(RedrafterError, match="a slot holds one row"):
        be.step(gen([0, 0]))
    be.reserve(2, 32)  # a new cache: no slot holds a tree
    with pytest.raises(RedrafterError, match=r"slots \[0\]"):
        be.step(gen([0]))


def test_phase_timer_adds_up_phases_and_the_backend_reports_them(tiny_dirs):
    timer = PhaseTimer(torch.device("cpu"))
    mark = timer.start()
    time.sleep(0.002)
    mark = timer.tick("a", mark)
    mark = timer.tick("b", mark)
    time.sleep(0.002)
    timer.tick("a", mark)
    assert set(timer.totals) == {"a", "b"} and timer.totals["a"] >= 0.004 > timer.totals["b"]
    gen = tiny_generator(tiny_dirs["llama"], 2, 2)
    gen.generate([[5, 6, 7]], max_new_tokens=4)
    assert {"verify", "accept", "draft", "pack"} <= set(gen.backend.timings)
    assert set(gen.last_stats.step_timings) == set(gen.backend.timings)


@needs_cuda
def test_cuda_phase_timer_reads_its_events_when_read():
    timer = PhaseTimer(torch.device("cuda"))
    a = torch.randn(512, 512, device="cuda")
    mark = timer.start()
    for _ in range(20):
        a = a @ a.T / 512
    timer.tick("matmul", mark)
    assert timer._pending  # nothing was read yet
    assert timer.totals["matmul"] > 0 and not timer._pending
