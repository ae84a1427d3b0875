"""The step contract's table: it names every tensor of the step once, the name tuples and the input
check are derived from it, and the check rejects a wrong name, shape or dtype naming the tensor."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_generator
from redrafter_trt import contract as C

SHAPE = C.StepShape(num_beams=3, draft_len=2)  # L = 3, N = 9


def valid_inputs(b: int = 2, t: int = 9, from_slots: bool = False) -> dict[str, torch.Tensor]:
    """Inputs of every required name (none of the generation-only ones with ``from_slots``)."""
    sizes = C.dim_sizes(b, t, SHAPE)
    x = {
        s.name: s.new(sizes)
        for s in C.INPUT_SPECS
        if s.required and not (from_slots and s.generation_only)
    }
    if from_slots:
        x[C.FROM_SLOTS] = C.input_tensor(C.FROM_SLOTS, 1)
    return x


def test_the_table_holds_every_tensor_name_of_the_module_once():
    names = {
        v
        for k, v in vars(C).items()
        if k.isupper() and isinstance(v, str) and v.islower() and k not in ("I32", "F32")
    }
    assert names == set(C.SPECS)
    assert len(C.INPUT_SPECS) + len(C.OUTPUT_SPECS) == len(C.SPECS)  # no name twice
    symbols = set(C.dim_sizes(1, 1, SHAPE))
    assert all(set(s.dims) <= symbols for s in C.SPECS.values())
    # the derived tuples
    assert C.INPUTS == tuple(s.name for s in C.INPUT_SPECS if s.required)
    assert C.NUM_DRAFT_STEPS in C.INPUTS and C.FROM_SLOTS not in C.INPUTS
    assert set(C.ENGINE_INPUTS) == set(C.INPUTS) - {C.NUM_DRAFT_STEPS}
    assert set(C.OUTPUTS) == {s.name for s in C.OUTPUT_SPECS} - {
        C.OUTPUT_LOGPROBS,
        C.TOP_LOGPROB_TOKENS,
        C.TOP_LOGPROBS,
    }
    assert C.INT_TENSORS == {n for n, s in C.SPECS.items() if s.dtype == torch.int32}
    assert C.TEMPERATURE not in C.INT_TENSORS and C.OUTPUT_LOGPROBS not in C.INT_TENSORS


def test_every_carried_output_has_its_inputs_shape_with_the_tree_for_t():
    """What a call emits as ``next_*`` is what the next call reads: same dtype, T -> N."""
    assert set(C.CARRIED.values()) == set(C.GENERATION_ONLY) | {
        C.INPUT_IDS,
        C.INPUT_LENGTHS,
        C.CACHE_LENGTHS,
    }
    to_tree = {"T": "N", "ceil(T/32)": "ceil(N/32)"}
    for src, dst in C.CARRIED.items():
        out, inp = C.SPECS[src], C.SPECS[dst]
        assert out in C.OUTPUT_SPECS and inp in C.INPUT_SPECS
        assert out.dtype == inp.dtype and out.dims == tuple(to_tree.get(d, d) for d in inp.dims)


def test_valid_inputs_pass_in_both_forms():
    C.check_inputs(valid_inputs(), SHAPE)
    C.check_inputs(valid_inputs(t=40), SHAPE)  # a prompt chunk wider than the tree: 2 mask words
    C.check_inputs(valid_inputs(t=0, from_slots=True), SHAPE)  # generation rows only
    C.check_inputs(valid_inputs(t=5, from_slots=True), SHAPE)
    x = valid_inputs()
    x[C.NUM_DRAFT_BEAMS] = C.input_tensor(C.NUM_DRAFT_BEAMS, 2)
    x[C.NUM_TOP_LOGPROBS] = C.input_tensor(C.NUM_TOP_LOGPROBS, 3)
    C.check_inputs(x, SHAPE)


@pytest.mark.parametrize("name", [s.name for s in C.INPUT_SPECS])
def test_a_wrong_shape_or_dtype_is_refused_naming_the_tensor(name):
    x = valid_inputs()
    x.setdefault(name, C.SPECS[name].new(C.dim_sizes(2, 9, SHAPE)))
    C.check_inputs(x, SHAPE)
    good = x[name]
    wider = torch.zeros((*good.shape, 1), dtype=good.dtype)  # one dim too many
    x[name] = wider
    with pytest.raises(ValueError, match=f"step input {name} has shape"):
        C.check_inputs(x, SHAPE)
    if good.dim():
        x[name] = torch.zeros((good.shape[0] + 1, *good.shape[1:]), dtype=good.dtype)
        if name != C.REQUEST_TYPES:  # it sets B: every other tensor would differ
            with pytest.raises(ValueError, match=rf"step input {name} has shape .*expected \[B"):
                C.check_inputs(x, SHAPE)
    for dtype in (torch.int64, torch.float32 if good.dtype == torch.int32 else torch.int32):
        x[name] = good.to(dtype)
        with pytest.raises(ValueError, match=f"step input {name} has dtype {dtype}, expected"):
            C.check_inputs(x, SHAPE)


def test_missing_unknown_and_misplaced_names_are_refused():
    x = valid_inputs()
    del x[C.UNIFORMS]
    with pytest.raises(ValueError, match="missing .*uniforms"):
        C.check_inputs(x, SHAPE)
    x = valid_inputs()
    x["num_draft_step"] = x[C.NUM_DRAFT_STEPS]  # a typo of an optional input is no silent no-op
    with pytest.raises(ValueError, match="num_draft_step.* not inputs of the step contract"):
        C.check_inputs(x, SHAPE)
    x = valid_inputs()
    x[C.NEXT_FLAT_TOKENS] = x[C.INPUT_IDS]  # an output is no input
    with pytest.raises(ValueError, match="next_flat_tokens"):
        C.check_inputs(x, SHAPE)
    x = valid_inputs(from_slots=True)
    x[C.DRAFT_TOKENS] = C.SPECS[C.DRAFT_TOKENS].new(C.dim_sizes(2, 9, SHAPE))
    with pytest.raises(ValueError, match="draft_tokens.* where generation rows read them"):
        C.check_inputs(x, SHAPE)
    x = valid_inputs()
    x[C.FROM_SLOTS] = C.input_tensor(C.FROM_SLOTS, 0)  # 0: every input given, as without it
    C.check_inputs(x, SHAPE)


def test_the_torch_backend_returns_the_tables_outputs(tiny_dirs):
    be = tiny_generator(tiny_dirs["llama"], SHAPE.num_beams, SHAPE.draft_len).backend
    be.reserve(2, 32)
    x = valid_inputs(t=4)
    x[C.SLOT_IDS] = C.input_tensor(C.SLOT_IDS, [0, 1])
    x[C.INPUT_IDS] = C.input_tensor(C.INPUT_IDS, [[5, 6, 7, 8], [9, 10, 0, 0]])
    x[C.INPUT_LENGTHS] = C.input_tensor(C.INPUT_LENGTHS, [4, 2])
    x[C.TOP_P][:] = 1
    x[C.NUM_DRAFT_STEPS] = C.input_tensor(C.NUM_DRAFT_STEPS, SHAPE.draft_len)
    x[C.NUM_TOP_LOGPROBS] = C.input_tensor(C.NUM_TOP_LOGPROBS, 2)
    out = be.step(x)
    assert set(out) == {s.name for s in C.OUTPUT_SPECS}
    sizes = C.dim_sizes(2, 4, SHAPE, top=2)
    for name, v in out.items():
        assert (tuple(v.shape), v.dtype) == (C.SPECS[name].shape(sizes), C.SPECS[name].dtype), name
