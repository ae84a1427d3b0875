"""The step contract (docs/design.md section 8): one call = one speculative step, over named tensors.

Every backend implements ``step(inputs: dict[str, Tensor]) -> dict[str, Tensor]`` with exactly
these names, shapes and dtypes; the runtime is written only against them. The TensorRT-LLM engine
binds the same names as its I/O tensors. There is no draft-probability tensor: exact sampling
needs only the base model's logits.

One table (:data:`INPUT_SPECS`, :data:`OUTPUT_SPECS`) gives every tensor's name, dims, dtype and
the input a carried output becomes; the name tuples, :func:`check_inputs`, the runtime's
allocations and the engine's I/O declarations are derived from it. Dims: ``B`` rows in the call,
``T`` input tokens per row (padded), ``W`` beams, ``L = D + 1`` beam length, ``N = W * L`` packed
tree size, ``ceil(N/32)`` mask words.

A row is either a *context* row (its prompt, or the next chunk of it, is prefilled: ``T`` >= the
chunk's length; ``CACHE_LENGTHS`` = the prompt tokens its slot holds already, 0 for a whole prompt
or a first chunk, more where the backend has ``chunked_context``; it emits the token after the
chunk, the request's first only after the prompt's last chunk) or a *generation* row (it
verifies the packed tree the previous call drafted for it: its inputs are
that call's ``next_*`` outputs, :data:`CARRIED`). Plain decoding is a generation call whose trees
are only their root (``NUM_DRAFT_STEPS = 0``): the same forward, acceptance and cache path with
nothing drafted.

Slot state: every backend keeps, per KV slot, the carried outputs of the last call that had a row
in that slot, on its own device. A call with ``FROM_SLOTS`` = 1 passes no tree: each generation
row's carried inputs are its slot's state, the :data:`GENERATION_ONLY` inputs are left out, and
``INPUT_IDS`` [B, T] (T = the longest context chunk, 0 without context rows), ``INPUT_LENGTHS``
and ``CACHE_LENGTHS`` hold the context rows' values (generation rows' entries are ignored). A
slot's state is replaced by every call with a row in it (a request that reuses a freed slot starts
with a context row) and dropped by ``reserve``. Without ``FROM_SLOTS`` every input is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .errors import require
from .ops.tree import StepShape, mask_words

# ---- request kinds
CONTEXT = 0
GENERATION = 1

# ---- tensor names (the engine's I/O names); shapes, dtypes and meaning in the table below
REQUEST_TYPES = "request_types"
SLOT_IDS = "slot_ids"
CACHE_LENGTHS = "cache_lengths"
INPUT_IDS = "input_ids"
INPUT_LENGTHS = "input_lengths"
POSITION_OFFSETS = "position_offsets"
PACKED_MASK = "packed_mask"
DRAFT_TOKENS = "draft_tokens"
DRAFT_INDICES = "draft_indices"
TEMPERATURE = "temperature"
TOP_K = "top_k"
TOP_P = "top_p"
UNIFORMS = "uniforms"
NUM_DRAFT_STEPS = "num_draft_steps"
NUM_DRAFT_BEAMS = "num_draft_beams"
NUM_TOP_LOGPROBS = "num_top_logprobs"
FROM_SLOTS = "from_slots"

NUM_ACCEPTED_TOKENS = "num_accepted_tokens"
ACCEPTED_BEAM_INDEX = "accepted_beam_index"
OUTPUT_TOKENS = "output_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"
NEW_CACHE_LENGTHS = "new_cache_lengths"
NEXT_DRAFT_TOKENS = "next_draft_tokens"
NEXT_DRAFT_INDICES = "next_draft_indices"
NEXT_FLAT_TOKENS = "next_flat_tokens"
NEXT_PACKED_LENGTHS = "next_packed_lengths"
NEXT_POSITION_OFFSETS = "next_position_offsets"
NEXT_PACKED_MASK = "next_packed_mask"
OUTPUT_LOGPROBS = "output_logprobs"
TOP_LOGPROB_TOKENS = "top_logprob_tokens"
TOP_LOGPROBS = "top_logprobs"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the step: its name, its dims in the symbols of :func:`dim_sizes`, its dtype.

    Outputs name the input they become in the same row's next call (``carried_to``). Inputs say
    whether only generation rows read them (``generation_only``: the tree the previous call
    drafted, which a backend's slot state supplies under :data:`FROM_SLOTS`), whether they are host
    scalars the backend reads on the host (``host``: never an engine input), and the value of
    entries that carry nothing (``pad``: context rows' beams are -1)."""

    name: str
    dims: tuple[str, ...]
    dtype: torch.dtype
    doc: str
    carried_to: str | None = None
    required: bool = True
    host: bool = False
    generation_only: bool = False
    pad: int = 0

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for ``sizes`` (from :func:`dim_sizes`)."""
        return tuple(sizes[d] for d in self.dims)

    def new(self, sizes: dict[str, int], device: torch.device | str = "cpu") -> torch.Tensor:
        """A tensor of this spec's shape and dtype filled with ``pad``."""
        return torch.full(self.shape(sizes), self.pad, dtype=self.dtype, device=device)


I32, F32 = torch.int32, torch.float32

#: The step's inputs, in the engine's binding order; the last four are host scalars, the last
#: three optional.
INPUT_SPECS: tuple[TensorSpec, ...] = (
    TensorSpec(REQUEST_TYPES, ("B",), I32, "CONTEXT or GENERATION"),
    TensorSpec(SLOT_IDS, ("B",), I32, "KV-cache slot of each row"),
    TensorSpec(
        CACHE_LENGTHS,
        ("B",),
        I32,
        "tokens in the slot before this call (context: prompt tokens prefilled already, 0 "
        "without chunked prefill)",
    ),
    TensorSpec(INPUT_IDS, ("B", "T"), I32, "prompt (chunk), or the previous next_flat_tokens"),
    TensorSpec(
        INPUT_LENGTHS, ("B",), I32, "prompt (chunk) length, or the previous next_packed_lengths"
    ),
    TensorSpec(
        POSITION_OFFSETS, ("B", "T"), I32, "depth of each packed node", generation_only=True
    ),
    TensorSpec(
        PACKED_MASK,
        ("B", "T", "ceil(T/32)"),
        I32,
        "tree mask, 32 columns per int32 word (ops/tree.py)",
        generation_only=True,
    ),
    TensorSpec(
        DRAFT_TOKENS,
        ("B", "W", "L"),
        I32,
        "the previous next_draft_tokens",
        generation_only=True,
        pad=-1,
    ),
    TensorSpec(
        DRAFT_INDICES,
        ("B", "W", "L"),
        I32,
        "the previous next_draft_indices",
        generation_only=True,
    ),
    TensorSpec(TEMPERATURE, ("B",), F32, "<= 0 = greedy"),
    TensorSpec(TOP_K, ("B",), I32, "0 = off"),
    TensorSpec(TOP_P, ("B",), F32, "1 = off"),
    TensorSpec(UNIFORMS, ("B", "L"), F32, "uniform of the k-th token this call emits"),
    TensorSpec(NUM_DRAFT_STEPS, (), I32, "D to draft the next tree, 0 = plain", host=True),
    TensorSpec(
        NUM_DRAFT_BEAMS,
        (),
        I32,
        "beams to draft this step (1..W; default W); the torch backend pads the tree to the "
        "engine's W x L shape, so carried tensors keep theirs (set by the adaptive policy, "
        ":mod:`redrafter_trt.runtime.adaptive`)",
        required=False,
        host=True,
    ),
    TensorSpec(
        NUM_TOP_LOGPROBS,
        (),
        I32,
        "K >= 0: ask a backend whose ``logprobs`` attribute is True for the log-probabilities "
        "of the tokens it emits and the K most likely at each (the three optional outputs)",
        required=False,
        host=True,
    ),
    TensorSpec(
        FROM_SLOTS,
        (),
        I32,
        "1: every generation row's carried inputs are what its slot's last call left in the "
        "backend (slot state); the generation-only inputs are then left out and generation rows' "
        "entries of the other carried inputs are ignored (see the module docstring)",
        required=False,
        host=True,
    ),
)

#: The step's outputs; the last three only when ``NUM_TOP_LOGPROBS`` asks for them. The base
#: model's own log-softmax (no temperature, top-k or top-p) over the float32 logits each output
#: token was accepted or sampled from, so they do not depend on speculation.
OUTPUT_SPECS: tuple[TensorSpec, ...] = (
    TensorSpec(NUM_ACCEPTED_TOKENS, ("B",), I32, "draft tokens accepted (0..D)"),
    TensorSpec(ACCEPTED_BEAM_INDEX, ("B",), I32, "the beam they lie on"),
    TensorSpec(OUTPUT_TOKENS, ("B", "L"), I32, "emitted tokens, -1 after the last"),
    TensorSpec(NUM_OUTPUT_TOKENS, ("B",), I32, "num_accepted + 1"),
    TensorSpec(
        NEW_CACHE_LENGTHS,
        ("B",),
        I32,
        "tokens in the slot after the call",
        carried_to=CACHE_LENGTHS,
    ),
    TensorSpec(
        NEXT_DRAFT_TOKENS,
        ("B", "W", "L"),
        I32,
        "beams, [:, :, 0] = last emitted token",
        carried_to=DRAFT_TOKENS,
    ),
    TensorSpec(
        NEXT_DRAFT_INDICES,
        ("B", "W", "L"),
        I32,
        "packed index of each beam node",
        carried_to=DRAFT_INDICES,
    ),
    TensorSpec(NEXT_FLAT_TOKENS, ("B", "N"), I32, "packed tree tokens", carried_to=INPUT_IDS),
    TensorSpec(
        NEXT_PACKED_LENGTHS,
        ("B",),
        I32,
        "nodes of the packed tree (spec_decoding_generation_lengths)",
        carried_to=INPUT_LENGTHS,
    ),
    TensorSpec(
        NEXT_POSITION_OFFSETS,
        ("B", "N"),
        I32,
        "(spec_decoding_position_offsets)",
        carried_to=POSITION_OFFSETS,
    ),
    TensorSpec(
        NEXT_PACKED_MASK,
        ("B", "N", "ceil(N/32)"),
        I32,
        "(spec_decoding_packed_mask)",
        carried_to=PACKED_MASK,
    ),
    TensorSpec(
        OUTPUT_LOGPROBS, ("B", "L"), F32, "of output_tokens (0 after the last)", required=False
    ),
    TensorSpec(TOP_LOGPROB_TOKENS, ("B", "L", "K"), I32, "most likely first", required=False),
    TensorSpec(TOP_LOGPROBS, ("B", "L", "K"), F32, "their log-probabilities", required=False),
)

#: Every tensor of the step by name.
SPECS: dict[str, TensorSpec] = {s.name: s for s in (*INPUT_SPECS, *OUTPUT_SPECS)}

#: The inputs of every call, in order.
INPUTS = tuple(s.name for s in INPUT_SPECS if s.required)
#: Every input a call may have (the optional ones too).
ALL_INPUTS = tuple(s.name for s in INPUT_SPECS)
#: The inputs an engine binds: every input but the host scalars.
ENGINE_INPUTS = tuple(s.name for s in INPUT_SPECS if s.required and not s.host)
#: The outputs of every call, in order.
OUTPUTS = tuple(s.name for s in OUTPUT_SPECS if s.required)
#: The outputs of one call that become the next call's inputs for the same row.
CARRIED = {s.name: s.carried_to for s in OUTPUT_SPECS if s.carried_to is not None}
#: Inputs only generation rows read: with ``FROM_SLOTS`` the backend's slot state supplies them.
GENERATION_ONLY = tuple(s.name for s in INPUT_SPECS if s.generation_only)
#: The integer tensors (the rest are float32).
INT_TENSORS = frozenset(n for n, s in SPECS.items() if not s.dtype.is_floating_point)


def dim_sizes(batch: int, tokens: int, shape: StepShape, top: int = 0) -> dict[str, int]:
    """The sizes of the dim symbols: ``B`` rows, ``T`` tokens per row, ``W`` beams, ``L = D + 1``,
    ``N = W * L``, ``ceil(T/32)`` / ``ceil(N/32)`` mask words, ``K`` top log-probabilities."""
    n = shape.tree_size
    return {
        "B": batch,
        "T": tokens,
        "ceil(T/32)": mask_words(tokens),
        "W": shape.num_beams,
        "L": shape.beam_len,
        "N": n,
        "ceil(N/32)": mask_words(n),
        "K": top,
    }


def input_tensor(name: str, values: Any) -> torch.Tensor:
    """A host tensor of ``values`` in the dtype the table gives input ``name``."""
    return torch.tensor(values, dtype=SPECS[name].dtype)


def from_slots(inputs: dict[str, torch.Tensor]) -> bool:
    """Whether a call's generation rows read their carried inputs from the backend's slot state."""
    return FROM_SLOTS in inputs and int(inputs[FROM_SLOTS]) != 0


def check_inputs(inputs: dict[str, torch.Tensor], shape: StepShape) -> None:
    """Validate the names, shapes and dtypes of a step's inputs against :data:`INPUT_SPECS`
    (raises ValueError naming the tensor, what it is and what was expected).

    ``B`` is read from ``REQUEST_TYPES`` and ``T`` from ``INPUT_IDS``; every other dim follows
    from them and ``shape``."""
    unknown = sorted(n for n in inputs if n not in ALL_INPUTS)
    if unknown:
        raise ValueError(f"step inputs {unknown} are not inputs of the step contract")
    skip = GENERATION_ONLY if from_slots(inputs) else ()
    missing = [n for n in INPUTS if n not in inputs and n not in skip]
    if missing:
        raise ValueError(f"step inputs missing {missing}")
    extra = [n for n in skip if n in inputs]
    if extra:
        raise ValueError(
            f"step inputs {extra} given with {FROM_SLOTS}=1, where generation rows read them from "
            "their slots"
        )
    for name in (REQUEST_TYPES, INPUT_IDS):
        dims = SPECS[name].dims
        if inputs[name].dim() != len(dims):
            raise ValueError(
                f"step input {name} has shape {tuple(inputs[name].shape)}, expected "
                f"[{', '.join(dims)}]"
            )
    sizes = dim_sizes(inputs[REQUEST_TYPES].shape[0], inputs[INPUT_IDS].shape[1], shape)
    for name, v in inputs.items():
        spec = SPECS[name]
        want = spec.shape(sizes)
        if tuple(v.shape) != want:
            raise ValueError(
                f"step input {name} has shape {tuple(v.shape)}, expected [{', '.join(spec.dims)}]"
                f" = {want}"
            )
        if v.dtype != spec.dtype:
            raise ValueError(f"step input {name} has dtype {v.dtype}, expected {spec.dtype}")


def check_num_beams(num_beams: int, vocab_size: int, what: str) -> None:
    """W <= V: a beam search over V tokens keeps at most V distinct beams. ``what`` names the
    flag or field (raises :class:`~redrafter_trt.errors.RedrafterError` naming it)."""
    require(num_beams <= vocab_size, f"{what} {num_beams} exceeds the vocabulary size {vocab_size}")


class Backend(Protocol):
    """What the runtime (:class:`~redrafter_trt.runtime.scheduler.Scheduler`,
    :class:`~redrafter_trt.runtime.generator.Generator`) and the benchmark need of a backend.

    Implemented by :class:`~redrafter_trt.backends.torch_backend.TorchBackend` and
    :class:`~redrafter_trt.trtllm.runtime.TrtllmBackend`; ``tests/test_backend_protocol.py``
    checks both structurally.
    """

    #: "torch" or "trtllm" (reports name it)
    name: str
    #: True when context rows and generation rows may share one :meth:`step` call
    mixed_request_types: bool
    #: True when a context row may continue its slot's cache (``cache_lengths`` > 0: chunked prefill)
    chunked_context: bool
    #: the static W x D of :meth:`step`'s tensors
    shape: StepShape
    device: torch.device
    #: dtype of the weights and the KV cache
    dtype: torch.dtype
    #: engine limits the runtime enforces: rows per call, prompt tokens, prompt + output tokens
    max_batch_size: int
    max_input_len: int
    max_seq_len: int

    @property
    def timings(self) -> dict[str, float]:
        """Cumulative seconds per phase of :meth:`step` (e.g. verify / accept / draft / pack); on
        a GPU read from events when read, so reading it waits for the device."""
        ...

    @property
    def warp_k(self) -> int | None:
        """Top-k warp of the draft logits (0 = off; None = not recorded by the engine)."""
        ...

    @property
    def vocab_size(self) -> int:
        """V: token ids of prompts and outputs lie in [0, V)."""
        ...

    @property
    def base(self) -> torch.nn.Module | None:
        """The base model's torch weights, a :class:`~redrafter_trt.models.base.BaseModel` (None
        where the backend has none, e.g. an engine); typed as a module here, as the contract imports
        nothing above it."""
        ...

    @property
    def kv_cache_bytes(self) -> int | None:
        """Bytes of the KV cache now reserved (None before :meth:`reserve`)."""
        ...

    def reserve(self, slots: int, tokens_per_slot: int) -> None:
        """Make the KV cache hold ``slots`` rows of ``tokens_per_slot`` tokens (plus one tree)."""
        ...

    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One call of the step contract: :data:`INPUTS` -> :data:`OUTPUTS` (module docstring);
        with ``FROM_SLOTS`` the generation rows' trees come from the backend's slot state."""
        ...

    def reshaped(self, num_beams: int, draft_len: int) -> Backend | None:
        """A backend with beam shape W x D sharing this one's weights, or None when the shape is
        fixed (an engine serves only its own shape: it returns itself for that one)."""
        ...


class Measurable(Protocol):
    """A backend whose step costs can be timed (:class:`~redrafter_trt.backends.torch_backend.TorchBackend`):
    what the adaptive policy's cost model (:mod:`redrafter_trt.runtime.adaptive`) reads of it."""

    shape: StepShape

    def engine_signature(self) -> dict[str, Any]:
        """The engine facts (shape, dtype, sizes, kernels) a cost model is measured for; a stored
        model whose facts differ is not used."""
        ...

    def measure_step_costs(
        self,
        token_points: Sequence[int],
        draft_rows: Sequence[int],
        cached_tokens: int,
        repeats: int,
        log: Callable[[str], None] | None = None,
    ) -> tuple[dict[int, float], dict[int, float]]:
        """({tokens in one base call: seconds}, {beam rows: seconds per draft step})."""
        ...
