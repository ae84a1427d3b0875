"""The step contract (docs/design.md section 8): one call = one speculative step, over named tensors.

Every backend implements ``step(inputs: dict[str, Tensor]) -> dict[str, Tensor]`` with exactly
these names, shapes and dtypes; the runtime is written only against them. The TensorRT-LLM engine
binds the same names as its I/O tensors. There is no draft-probability tensor: exact sampling
needs only the base model's logits.

Shapes: ``B`` rows in the call, ``T`` input tokens per row (padded), ``W`` beams, ``L = D + 1``
beam length, ``N = W * L`` packed tree size, ``M = ceil(N / 32)`` mask words.

A row is either a *context* row (its prompt, or the next chunk of it, is prefilled: ``T`` >= the
chunk's length; ``CACHE_LENGTHS`` = the prompt tokens its slot holds already, 0 for a whole prompt
or a first chunk, more where the backend has ``chunked_context``; it emits the token after the
chunk, the request's first only after the prompt's last chunk) or a *generation* row (it
verifies the packed tree the previous call drafted for it: its inputs are
that call's ``next_*`` outputs). Plain decoding is a generation call whose trees are only their
root (``NUM_DRAFT_STEPS = 0``): the same forward, acceptance and cache path with nothing drafted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .errors import require
from .ops.tree import mask_words

if TYPE_CHECKING:  # annotations only: the contract imports nothing above it
    from .models.base import BaseModel

# ---- request kinds
CONTEXT = 0
GENERATION = 1

# ---- inputs
REQUEST_TYPES = "request_types"  # [B] int32: CONTEXT or GENERATION
SLOT_IDS = "slot_ids"  # [B] int32: KV-cache slot of each row
CACHE_LENGTHS = "cache_lengths"  # [B] int32: tokens in the slot before this call (context: prompt
#                                          tokens prefilled already, 0 without chunked prefill)
INPUT_IDS = "input_ids"  # [B, T] int32: prompt, or the previous next_flat_tokens
INPUT_LENGTHS = (
    "input_lengths"  # [B] int32: prompt (chunk) length, or the previous next_packed_lengths
)
POSITION_OFFSETS = "position_offsets"  # [B, T] int32: depth of each packed node (generation rows)
PACKED_MASK = "packed_mask"  # [B, T, ceil(T/32)] int32: tree mask (generation rows)
DRAFT_TOKENS = "draft_tokens"  # [B, W, L] int32: the previous next_draft_tokens
DRAFT_INDICES = "draft_indices"  # [B, W, L] int32: the previous next_draft_indices
TEMPERATURE = "temperature"  # [B] float32: <= 0 = greedy
TOP_K = "top_k"  # [B] int32: 0 = off
TOP_P = "top_p"  # [B] float32: 1 = off
UNIFORMS = "uniforms"  # [B, L] float32: uniform of the k-th token this call emits
NUM_DRAFT_STEPS = "num_draft_steps"  # [] int32 host scalar: D to draft the next tree, 0 = plain

#: Optional input next to ``NUM_DRAFT_STEPS``: beams to draft this step (1..W; default W); [] int32
#: host scalar. The torch backend pads the tree to the engine's W x L shape, so carried tensors
#: keep theirs (the adaptive policy, :mod:`redrafter_trt.runtime.adaptive`, sets it).
NUM_DRAFT_BEAMS = "num_draft_beams"

#: Optional input: ask a backend whose ``logprobs`` attribute is True for the log-probabilities of
#: the tokens it emits, with the K >= 0 most likely tokens at each (K = this value); [] int32
#: host scalar. It then adds the three outputs below: the base model's own log-softmax (no
#: temperature, top-k or top-p) over the float32 logits each output token was accepted or
#: sampled from, so they do not depend on speculation.
NUM_TOP_LOGPROBS = "num_top_logprobs"
OUTPUT_LOGPROBS = "output_logprobs"  # [B, L] float32: of output_tokens (0 after the last)
TOP_LOGPROB_TOKENS = "top_logprob_tokens"  # [B, L, K] int32: most likely first
TOP_LOGPROBS = "top_logprobs"  # [B, L, K] float32: their log-probabilities

INPUTS = (
    REQUEST_TYPES,
    SLOT_IDS,
    CACHE_LENGTHS,
    INPUT_IDS,
    INPUT_LENGTHS,
    POSITION_OFFSETS,
    PACKED_MASK,
    DRAFT_TOKENS,
    DRAFT_INDICES,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    UNIFORMS,
    NUM_DRAFT_STEPS,
)

# ---- outputs
NUM_ACCEPTED_TOKENS = "num_accepted_tokens"  # [B] int32: draft tokens accepted (0..D)
ACCEPTED_BEAM_INDEX = "accepted_beam_index"  # [B] int32
OUTPUT_TOKENS = "output_tokens"  # [B, L] int32: emitted tokens, -1 after the last
NUM_OUTPUT_TOKENS = "num_output_tokens"  # [B] int32: num_accepted + 1
NEW_CACHE_LENGTHS = "new_cache_lengths"  # [B] int32: tokens in the slot after the call
NEXT_DRAFT_TOKENS = "next_draft_tokens"  # [B, W, L] int32: beams, [:, :, 0] = last emitted token
NEXT_DRAFT_INDICES = "next_draft_indices"  # [B, W, L] int32: packed index of each beam node
NEXT_FLAT_TOKENS = "next_flat_tokens"  # [B, N] int32: packed tree tokens
NEXT_PACKED_LENGTHS = "next_packed_lengths"  # [B] int32 (spec_decoding_generation_lengths)
NEXT_POSITION_OFFSETS = "next_position_offsets"  # [B, N] int32 (spec_decoding_position_offsets)
NEXT_PACKED_MASK = "next_packed_mask"  # [B, N, M] int32 (spec_decoding_packed_mask)

OUTPUTS = (
    NUM_ACCEPTED_TOKENS,
    ACCEPTED_BEAM_INDEX,
    OUTPUT_TOKENS,
    NUM_OUTPUT_TOKENS,
    NEW_CACHE_LENGTHS,
    NEXT_DRAFT_TOKENS,
    NEXT_DRAFT_INDICES,
    NEXT_FLAT_TOKENS,
    NEXT_PACKED_LENGTHS,
    NEXT_POSITION_OFFSETS,
    NEXT_PACKED_MASK,
)

#: The outputs of one call that become the next call's inputs for the same row.
CARRIED = {
    NEXT_FLAT_TOKENS: INPUT_IDS,
    NEXT_PACKED_LENGTHS: INPUT_LENGTHS,
    NEXT_POSITION_OFFSETS: POSITION_OFFSETS,
    NEXT_PACKED_MASK: PACKED_MASK,
    NEXT_DRAFT_TOKENS: DRAFT_TOKENS,
    NEXT_DRAFT_INDICES: DRAFT_INDICES,
    NEW_CACHE_LENGTHS: CACHE_LENGTHS,
}

INT_TENSORS = {
    REQUEST_TYPES,
    SLOT_IDS,
    CACHE_LENGTHS,
    INPUT_IDS,
    INPUT_LENGTHS,
    POSITION_OFFSETS,
    PACKED_MASK,
    DRAFT_TOKENS,
    DRAFT_INDICES,
    TOP_K,
    NUM_DRAFT_STEPS,
    *[o for o in OUTPUTS],
}


@dataclass(frozen=True)
class StepShape:
    """Static sizes of an engine's step."""

    num_beams: int  # W
    draft_len: int  # D

    @property
    def beam_len(self) -> int:  # L
        return self.draft_len + 1

    @property
    def tree_size(self) -> int:  # N
        return self.num_beams * self.beam_len


def check_inputs(inputs: dict[str, torch.Tensor], shape: StepShape) -> None:
    """Validate names, dtypes and shapes of a step's inputs (raises ValueError)."""
    missing = [n for n in INPUTS if n not in inputs]
    if missing:
        raise ValueError(f"step inputs missing {missing}")
    b = inputs[REQUEST_TYPES].shape[0]
    w, l = shape.num_beams, shape.beam_len
    t = inputs[INPUT_IDS].shape[1]
    expected = {
        REQUEST_TYPES: (b,),
        SLOT_IDS: (b,),
        CACHE_LENGTHS: (b,),
        INPUT_IDS: (b, t),
        INPUT_LENGTHS: (b,),
        POSITION_OFFSETS: (b, t),
        PACKED_MASK: (b, t, mask_words(t)),
        DRAFT_TOKENS: (b, w, l),
        DRAFT_INDICES: (b, w, l),
        TEMPERATURE: (b,),
        TOP_K: (b,),
        TOP_P: (b,),
        UNIFORMS: (b, l),
        NUM_DRAFT_STEPS: (),
    }
    for name, shp in expected.items():
        got = tuple(inputs[name].shape)
        if got != shp:
            raise ValueError(f"step input {name} has shape {got}, expected {shp}")
        is_int = not inputs[name].is_floating_point()
        if is_int != (name in INT_TENSORS):
            raise ValueError(f"step input {name} has dtype {inputs[name].dtype}")


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
        """Cumulative seconds per phase of :meth:`step` (e.g. verify / accept / draft / pack)."""
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
    def base(self) -> BaseModel | None:
        """The base model's torch weights (None where the backend has none, e.g. an engine)."""
        ...

    @property
    def kv_cache_bytes(self) -> int | None:
        """Bytes of the KV cache now reserved (None before :meth:`reserve`)."""
        ...

    def reserve(self, slots: int, tokens_per_slot: int) -> None:
        """Make the KV cache hold ``slots`` rows of ``tokens_per_slot`` tokens (plus one tree)."""
        ...

    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One call of the step contract: :data:`INPUTS` -> :data:`OUTPUTS` (module docstring)."""
        ...

    def reshaped(self, num_beams: int, draft_len: int) -> Backend | None:
        """A backend with beam shape W x D sharing this one's weights, or None when the shape is
        fixed (an engine serves only its own shape: it returns itself for that one)."""
        ...
