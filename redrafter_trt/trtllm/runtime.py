"""The TensorRT-LLM backend of the runtime: the step contract over one engine.

:class:`TrtllmBackend` implements :class:`redrafter_trt.contract.Backend` (what the runtime and
the benchmark need), so ``redrafter-run`` and ``redrafter-bench`` drive it unchanged.

Per call: the contract's tensors are bound by name (:mod:`redrafter_trt.contract`), the attention
plumbing is derived from them (paged KV pool, each slot owning ``max_blocks`` contiguous blocks,
one pool ``[num_blocks, layers, 2, kv_heads * tokens_per_block * head_dim]``), the engine runs
through ``tensorrt_llm.runtime.Session``, then the accepted KV entries are relocated (docs/design.md
section 7) from the engine's ``accepted_packed_indices`` output, in place in the pool: by the
cpp/ kernel ``invokeKvRelocate`` with the paged pool's strided layout
(:func:`redrafter_trt.native.relocate_paged_native`, ``libredrafter_cuda.so``) when that library
is built, else by :func:`~redrafter_trt.ops.kv_cache.relocate_paged` (torch indexed copies
vectorised over rows and layers, no loop over rows). ``TrtllmBackend.relocate_impl`` says which
one ran ("kernel" or "torch"); ``$REDRAFTER_KV_RELOCATE`` = ``kernel`` / ``torch`` forces one
(default ``auto``).

Generation calls run as CUDA graphs (:mod:`.cuda_graph`: static buffers per (rows, tokens per
row) key, re-captured and updated with ``cudaGraphExecUpdate`` when a host input the plugins read
at enqueue changes, as TensorRT-LLM 1.2 does); context calls, and every call once a capture
failed, go through ``Session.run``. ``cuda_graph=False`` or ``$REDRAFTER_CUDA_GRAPH=0`` turns
graphs off. ``TrtllmBackend.uses_cuda_graphs``, ``cuda_graph_reason`` and ``graph_calls`` say
what ran; ``timings`` has ``engine`` (Session.run), ``graph_capture`` (capture calls: an eager run
plus the capture) and ``engine_graph`` (replays, input copies included).

Not run on hardware yet (see :mod:`redrafter_trt.trtllm`). Tensor parallelism: one backend per
MPI rank, each over its ``rank{i}.engine`` on its own GPU, the engine's NCCL plugin doing the
collectives; :mod:`redrafter_trt.trtllm.mpi` makes rank 0 drive the others.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import contract as C
from .. import native
from ..backends.slot_state import SlotState, StepRows, explicit_rows
from ..backends.timing import PhaseTimer
from ..errors import RedrafterError, require
from ..formats.checkpoint import RedrafterCheckpointConfig
from ..ops.kv_cache import paged_block_offsets, paged_pool_shape, relocate_paged
from ..ops.tree import bool_to_packed_mask, mask_words, root_only_tree
from . import ACCEPTED_INDICES, require_trtllm
from . import Plumbing as P
from .builder import DEFAULT_TOKENS_PER_BLOCK, engine_file, kv_block_dims
from .cuda_graph import (
    DEFAULT_GRAPH_CACHE_SIZE,
    CudaGraphRunner,
    GraphUnavailable,
    ShapeKey,
    bucket_tokens,
    cuda_graph_setting,
    host_input_names,
)
from .plugins import load_plugin_library

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


#: ``host_runtime_perf_knobs``: 16 int64, -1 = the plugin's default. Knob 0 is multi-block mode,
#: which the attention op turns on only when it reads 1 (``mMultiBlockMode = knobs[0] == 1``,
#: cpp/tensorrt_llm/common/attentionOp.cpp:1027-1028, :2285-2286); TensorRT-LLM's runtimes set it
#: to 1 on context and generation calls (runtime/generation.py:2932-2936, :3016-3021).
PERF_KNOBS = 16
PERF_KNOB_MULTI_BLOCK = 0


def runtime_perf_knobs() -> list[int]:
    """The ``host_runtime_perf_knobs`` values of every call: multi-block mode on, the rest default."""
    knobs = [-1] * PERF_KNOBS
    knobs[PERF_KNOB_MULTI_BLOCK] = 1
    return knobs


def spec_decoding_use(is_ctx: bool, tokens: int) -> int:
    """``spec_decoding_use`` of a call: 1 for generation calls of T >= 2 tokens per row, else 0.

    The GPT attention plugin reads it at enqueue. With it on and T == 1 the spec-decoding inputs
    are one node wide, so the plugin leaves the packed-mask pointer null
    (gptAttentionPlugin.cpp:937-942, ``num_decoding_draft_tokens`` = 0) and the attention op throws
    "Speculative decoding mode needs a valid packed_mask input tensor" (attentionOp.cpp:273-275)
    inside the noexcept enqueue: std::terminate. With it off and T >= 2 a generation call fails
    "Only speculative decoding mode supports input length > 1" (gptAttentionPlugin.cpp:1093).
    Context calls ignore the spec inputs (attentionOp.cpp:1697) and get 0, so the plugin, which
    starts non-speculative, flips on at the first generation call of T >= 2, where it prepares
    the speculative XQA kernels (gptAttentionPlugin.cpp:702-709, :1123-1127); a flip during a
    context call would leave them unprepared when the first generation call has the context
    call's shapes."""
    return int(not is_ctx and tokens >= 2)


KV_RELOCATE_ENV = "REDRAFTER_KV_RELOCATE"
RELOCATE_KERNEL, RELOCATE_TORCH = "kernel", "torch"


def choose_relocation(device: torch.device) -> tuple[str, str]:
    """Which relocation the pool on ``device`` gets, and why: the cpp/ kernel when the CUDA
    library loads (``$REDRAFTER_KV_RELOCATE`` = auto, the default), else :func:`relocate_paged`."""
    mode = os.environ.get(KV_RELOCATE_ENV, "auto").strip().lower() or "auto"
    require(
        mode in ("auto", RELOCATE_KERNEL, RELOCATE_TORCH),
        f"${KV_RELOCATE_ENV} must be auto, kernel or torch, got {mode!r}",
    )
    if mode == RELOCATE_TORCH:
        return RELOCATE_TORCH, f"${KV_RELOCATE_ENV}=torch"
    if device.type != "cuda":
        why = f"the pool is on {device}, the kernel needs a CUDA device"
    else:
        try:
            native.load_cuda_library()
            return RELOCATE_KERNEL, f"cpp/ kernel from {native.cuda_library_path()}"
        except RedrafterError as e:
            why = str(e)
    require(mode != RELOCATE_KERNEL, f"${KV_RELOCATE_ENV}=kernel but the kernel cannot run: {why}")
    return RELOCATE_TORCH, f"torch fallback: {why}"


def relocate_pool(
    pool: torch.Tensor,
    slots: torch.Tensor,
    cache_lengths: torch.Tensor,
    accepted_indices: torch.Tensor,
    num_accepted: torch.Tensor,
    *,
    max_blocks: int,
    kv_heads: int,
    tokens_per_block: int,
    head_dim: int,
    impl: str,
) -> None:
    """docs/design.md section 7 on the paged pool with ``impl``: RELOCATE_KERNEL runs the cpp/ operator in
    the strided paged layout (the CUDA kernel on a CUDA pool, its CPU reference on a CPU pool) and
    checks its new lengths; RELOCATE_TORCH runs :func:`relocate_paged`."""
    kw = dict(
        max_blocks=max_blocks,
        kv_heads=kv_heads,
        tokens_per_block=tokens_per_block,
        head_dim=head_dim,
    )
    if impl == RELOCATE_TORCH:
        relocate_paged(pool, slots, cache_lengths, accepted_indices, num_accepted, **kw)
        return
    require(impl == RELOCATE_KERNEL, f"unknown relocation {impl!r}")
    new_len = native.relocate_paged_native(
        pool, slots, cache_lengths, accepted_indices, num_accepted, **kw
    )
    # The kernel skips rows with invalid data and reports them as -1 (one sync; the step syncs anyway).
    want = (
        cache_lengths.to(new_len.device, torch.int32)
        + num_accepted.to(new_len.device, torch.int32)
        + 1
    )
    bad = (new_len != want).nonzero().flatten().tolist()
    if bad:
        raise RedrafterError(
            f"KV relocation kernel rejected rows {bad} (slot, cache length or accepted path out of "
            f"range for {max_blocks * tokens_per_block} positions per slot); their cache is unchanged"
        )


# --------------------------------------------------------------------------- one call's feed
@dataclass
class PreparedStep:
    """One call's engine inputs, built by :func:`prepare_step` (pure torch, runs on the CPU)."""

    is_ctx: bool
    batch: int
    tokens: int  # T of this call (tokens per row the engine sees)
    x: dict[str, torch.Tensor]  # the contract's inputs, trimmed to ``tokens``, on ``device``
    plumbing: dict[str, torch.Tensor]  # TensorRT-LLM's attention inputs (``host_*`` on the CPU)
    out_shapes: dict[str, tuple[int, ...]]

    @property
    def cache_lengths(self) -> torch.Tensor:
        return self.x[C.CACHE_LENGTHS]

    def feed(self, engine_inputs: set[str] | frozenset[str]) -> dict[str, torch.Tensor]:
        """The inputs the engine binds (TensorRT drops inputs no layer reads, e.g. slot_ids:
        the block offsets carry the slots)."""
        return {k: v for k, v in {**self.x, **self.plumbing}.items() if k in engine_inputs}


def output_shapes(batch: int, shape: C.StepShape) -> dict[str, tuple[int, ...]]:
    """The engine's outputs for ``batch`` rows (all int32; no dimension depends on T): the
    contract's (its table) and :data:`~redrafter_trt.trtllm.ACCEPTED_INDICES` [B, L]."""
    sizes = C.dim_sizes(batch, 0, shape)
    out = {n: C.SPECS[n].shape(sizes) for n in C.OUTPUTS}
    out[ACCEPTED_INDICES] = (batch, shape.beam_len)
    return out


def prepare_step(
    inputs: dict[str, torch.Tensor],
    shape: C.StepShape,
    *,
    device: torch.device,
    max_blocks: int,
    layers: int,
    kv_len: int,
    pool_ptr: int,
    bucket: bool = False,
    rows: StepRows | None = None,
) -> PreparedStep:
    """The engine inputs of one call: the contract's tensors trimmed to the call's T, the tree
    mask with padding nodes seeing themselves, and TensorRT-LLM's attention plumbing.

    ``rows``: the call's inputs on ``device`` with their host facts (a ``FROM_SLOTS`` call's,
    from the slot state); None = built from ``inputs``, which then holds every input. The host
    plumbing comes from the host facts, so nothing is read back from the device.

    T is the longest row; with ``bucket`` (CUDA-graph mode) a generation call's T is rounded up
    to a bucket of :func:`~.cuda_graph.bucket_tokens` so that calls share shape keys."""
    if rows is None:
        rows = explicit_rows(inputs, device)
    is_ctx = rows.all_context
    require(
        is_ctx or not any(rows.is_ctx),
        "the trtllm backend runs context rows and generation rows in separate calls",
    )
    dev = device
    x = dict(rows.x)
    b = rows.batch
    t = rows.tokens
    if bucket and not is_ctx:
        t = bucket_tokens(t, shape.tree_size, x[C.INPUT_IDS].shape[1])
    x[C.INPUT_IDS] = x[C.INPUT_IDS][:, :t].contiguous()
    x[C.POSITION_OFFSETS] = x[C.POSITION_OFFSETS][:, :t].contiguous()
    # mask words: the tree's ceil(N/32) for generation calls (the plugin's packed-mask stride)
    words = min(x[C.PACKED_MASK].shape[2], max(mask_words(t), mask_words(shape.tree_size)))
    mask = x[C.PACKED_MASK][:, :t, :words].clone()
    # padding nodes see themselves (never read; keeps attention rows non-empty)
    i = torch.arange(t, device=dev)
    pad = i[None, :] >= x[C.INPUT_LENGTHS][:, None]
    # [t, mask_words(max(t, N))] >= words columns: bit i of row i
    diag = bool_to_packed_mask(torch.eye(t, max(t, shape.tree_size), dtype=torch.bool, device=dev))
    x[C.PACKED_MASK] = torch.where(pad[:, :, None], mask | diag[None, :, :words], mask).contiguous()
    # context rows: the prompt tokens the slot holds already (chunked prefill, 0 for a first chunk);
    # the attention plugin's paged context FMHA attends to those past_kv = sequence_length -
    # context_lengths cached tokens and ropes the chunk from that position on
    cache_len = x[C.CACHE_LENGTHS].to(torch.int32)
    x[C.CACHE_LENGTHS] = cache_len

    seq = (cache_len + t).to(torch.int32)
    host = lambda v, dt=torch.int32: torch.as_tensor(v, dtype=dt).cpu()  # noqa: E731
    host_offsets = paged_block_offsets(torch.tensor(rows.slots), max_blocks, layers)
    offsets = host_offsets.to(dev, non_blocking=True)
    plumbing = {
        P.SEQUENCE_LENGTH: seq,
        P.HOST_PAST_KEY_VALUE_LENGTHS: host([c + t for c in rows.cache_lengths]),
        P.HOST_MAX_ATTENTION_WINDOW_SIZES: host([kv_len] * layers),
        P.HOST_SINK_TOKEN_LENGTH: host([0]),
        P.CONTEXT_LENGTHS: torch.full((b,), t, dtype=torch.int32, device=dev),
        P.HOST_CONTEXT_LENGTHS: host([t] * b),
        P.HOST_REQUEST_TYPES: host([C.CONTEXT if is_ctx else C.GENERATION] * b),
        P.KV_CACHE_BLOCK_OFFSETS: offsets,
        P.HOST_KV_CACHE_BLOCK_OFFSETS: host_offsets,
        P.HOST_KV_CACHE_POOL_POINTERS: host([[pool_ptr, 0]], torch.int64),
        P.HOST_KV_CACHE_POOL_MAPPING: host([[0, layer] for layer in range(layers)]),
        P.CACHE_INDIRECTION: torch.zeros((b, 1, kv_len), dtype=torch.int32, device=dev),
        P.HOST_RUNTIME_PERF_KNOBS: host(runtime_perf_knobs(), torch.int64),
        P.HOST_CONTEXT_PROGRESS: host([0], torch.int64),
        P.SPEC_DECODING_GENERATION_LENGTHS: torch.full((b,), t, dtype=torch.int32, device=dev),
        # 1 only for generation calls of T >= 2 (see spec_decoding_use). The plugin reads it at
        # enqueue; a CUDA graph's shape key fixes T, so each graph keeps one value.
        P.SPEC_DECODING_USE: host([spec_decoding_use(is_ctx, t)]),
    }
    return PreparedStep(is_ctx, b, t, x, plumbing, output_shapes(b, shape))


def bind_shapes(context: Any, feed: dict[str, torch.Tensor]) -> None:
    """Set every input's shape on the execution context (``Session.run`` binds addresses only)."""
    for name, v in feed.items():
        if not context.set_input_shape(name, tuple(v.shape)):
            raise RedrafterError(
                f"the engine refused input {name} with shape {tuple(v.shape)} "
                "(outside its optimization profile)"
            )


class TrtllmBackend:
    """Runs ReDrafter steps with a TensorRT-LLM engine directory built by ``redrafter-build``
    (implements :class:`~redrafter_trt.contract.Backend`)."""

    name = "trtllm"
    #: context rows and generation rows run in separate calls (see :func:`prepare_step`)
    mixed_request_types = False
    #: context rows may continue a slot's cache (chunked prefill): set per engine in __init__
    chunked_context = False

    def __init__(
        self,
        engine_dir: str | Path,
        ckpt_cfg: RedrafterCheckpointConfig,
        build_config: dict[str, Any],
        *,
        cuda_graph: bool | None = None,
        graph_cache_size: int = DEFAULT_GRAPH_CACHE_SIZE,
        rank: int = 0,
    ):
        # rank: this process's tensor-parallel rank (an MPI rank, redrafter_trt.trtllm.mpi); it
        # loads rank{rank}.engine on GPU rank % device_count, as TensorRT-LLM's ModelRunner does
        # (runtime/model_runner.py: torch.cuda.set_device(rank % gpus_per_node))
        tp = ckpt_cfg.tp_size
        require(0 <= rank < tp, f"{engine_dir}: rank {rank} outside the engine's tp_size {tp}")
        trt, _ = require_trtllm("loading a trtllm engine")
        from tensorrt_llm.runtime import Session

        require(torch.cuda.is_available(), "the trtllm backend needs a CUDA GPU; none is visible")
        load_plugin_library()
        self.rank = rank
        self.device = (
            torch.device("cuda", rank % torch.cuda.device_count())
            if tp > 1
            else (torch.device("cuda"))
        )
        if tp > 1:
            torch.cuda.set_device(self.device)
        self.cfg = ckpt_cfg
        self.shape = C.StepShape(ckpt_cfg.num_beams, ckpt_cfg.draft_len)
        bc = build_config
        self.max_batch_size = int(bc["max_batch_size"])
        self.max_input_len = int(bc["max_input_len"])
        self.max_seq_len = int(bc["max_seq_len"])
        self.warp_k: int | None = None if bc.get("warp_k") is None else int(bc["warp_k"])
        self.tokens_per_block = int(bc.get("tokens_per_block", DEFAULT_TOKENS_PER_BLOCK))
        # a context row may continue its slot's cache (chunked prefill) where the engine's attention
        # plugin has paged context FMHA (recorded by redrafter-build; older records: off)
        self.chunked_context = bool(bc.get("use_paged_context_fmha", False))
        # KV positions per slot and the engine's fixed block dimension: read from the build record
        # (the max_seq_len the engine's prepare_inputs saw), checked against the engine below
        self.kv_len, self.engine_max_blocks = kv_block_dims(bc)
        self.dtype = TORCH_DTYPES[ckpt_cfg.dtype]
        path = Path(engine_dir) / engine_file(rank)
        require(path.is_file(), f"{engine_dir}: missing {engine_file(rank)}")
        self.session = Session.from_serialized_engine(path.read_bytes())
        engine = self.session.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.engine_inputs = {
            n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        }
        # By name: TensorRT reports these inputs as DEVICE-located (TensorRT-LLM declares them as plain
        # network inputs and binds CPU pointers to them), so get_tensor_location cannot find them.
        self.engine_host_inputs = host_input_names(self.engine_inputs)
        if P.KV_CACHE_BLOCK_OFFSETS in self.engine_inputs:
            profile_max = tuple(engine.get_tensor_profile_shape(P.KV_CACHE_BLOCK_OFFSETS, 0)[2])
            require(
                profile_max[-1] == self.engine_max_blocks,
                f"{engine_dir}: the engine's kv_cache_block_offsets has {profile_max[-1]} blocks per row, its "
                f"config.json says {self.engine_max_blocks}; rebuild the engine",
            )
        self.stream = torch.cuda.Stream(self.device)
        b = ckpt_cfg.base
        # a rank's pool holds its KV heads: ceil(kv_heads / tp_size), as model_runner.py's
        # num_kv_heads (heads shared by several ranks when tp_size exceeds them)
        self.layers, self.kv_heads, self.head_dim = (
            b.num_hidden_layers,
            -(-b.num_key_value_heads // tp),
            b.head_size,
        )
        self.pool: torch.Tensor | None = None
        self.slots = 0
        self.max_blocks = 0
        self.timer = PhaseTimer(self.device)
        #: each slot's carried tree, on the GPU (made by :meth:`reserve`)
        self.slot_state: SlotState | None = None
        # KV relocation: chosen on the first generation call (the CUDA library loads lazily)
        self.relocate_impl: str | None = None  # RELOCATE_KERNEL or RELOCATE_TORCH
        self.relocate_reason = ""
        self.relocate_calls: dict[str, int] = defaultdict(int)
        # CUDA graphs for generation calls (see .cuda_graph): on by default, $REDRAFTER_CUDA_GRAPH=0 or
        # cuda_graph=False turns them off; any failure turns them off with a one-time warning.
        self.cuda_graph, self.cuda_graph_reason = cuda_graph_setting(cuda_graph)
        self.graph_runner: CudaGraphRunner | None = None
        # generation calls by path: "replay", "capture", "update", "reinstantiate" (graphs) or "eager"
        self.graph_calls: dict[str, int] = defaultdict(int)
        if self.cuda_graph:
            if not self.engine_host_inputs:
                self._disable_graphs("the engine has none of the expected host inputs")
            else:
                try:
                    self.graph_runner = CudaGraphRunner(
                        self.session.context,
                        self.stream,
                        self.device,
                        self.engine_host_inputs,
                        self.kv_len,
                        capacity=graph_cache_size,
                    )
                except Exception as e:  # noqa: BLE001 - e.g. cuda-python missing: run without graphs
                    self._disable_graphs(f"cannot set up CUDA graphs: {e}")

    @property
    def vocab_size(self) -> int:
        return self.cfg.base.vocab_size

    @property
    def base(self) -> None:
        """The engine holds the base's weights; there are no torch modules of it."""
        return None

    @property
    def timings(self) -> dict[str, float]:
        """Cumulative seconds per phase (engine or engine_graph / graph_capture, relocate, pack),
        CUDA-event intervals read when this is read (:class:`~..backends.timing.PhaseTimer`)."""
        return self.timer.totals

    @property
    def kv_cache_bytes(self) -> int | None:
        """Bytes of the paged pool (None before :meth:`reserve`)."""
        p = self.pool
        return None if p is None else int(p.numel() * p.element_size())

    def reshaped(self, num_beams: int, draft_len: int) -> TrtllmBackend | None:
        """An engine's beam shape is fixed: itself for its own shape, else None."""
        return (
            self if (num_beams, draft_len) == (self.shape.num_beams, self.shape.draft_len) else None
        )

    # ------------------------------------------------------------------ KV cache
    def reserve(self, slots: int, tokens_per_slot: int) -> None:
        """Allocate the paged pool: ``slots`` slots of ``tokens_per_slot`` tokens plus one tree;
        every slot's carried tree is dropped."""
        require(
            tokens_per_slot <= self.max_seq_len,
            f"{tokens_per_slot} tokens per slot exceed the engine's max_seq_len {self.max_seq_len}",
        )
        require(slots >= 1, f"slots must be >= 1, got {slots}")
        if self.pool is not None and self.slots >= slots:
            self.slot_state = SlotState(self.slots, self.shape, self.device)
            return
        if self.graph_runner is not None:
            self.graph_runner.clear()  # the pool pointer is a captured host value
        self.pool = None
        torch.cuda.empty_cache()
        self.max_blocks = self.engine_max_blocks  # the engine's fixed dim
        self.slots = slots
        shape = paged_pool_shape(
            slots, self.max_blocks, self.layers, self.kv_heads, self.tokens_per_block, self.head_dim
        )
        self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.slot_state = SlotState(slots, self.shape, self.device)

    # ------------------------------------------------------------------ step
    @property
    def uses_cuda_graphs(self) -> bool:
        """True while generation calls go through CUDA graphs."""
        return self.graph_runner is not None

    def _disable_graphs(self, reason: str) -> None:
        if self.graph_runner is not None:
            try:
                self.graph_runner.clear()
            except Exception:  # noqa: BLE001 - already failing; the reason below is the one to report
                pass
        self.graph_runner = None
        if self.cuda_graph:
            log.warning(
                "CUDA graphs disabled for the trtllm backend, generation calls use Session.run: %s",
                reason,
            )
        self.cuda_graph = False
        self.cuda_graph_reason = reason

    def _run_eager(self, feed: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        bind_shapes(self.session.context, feed)
        if not self.session.run(feed, outputs, self.stream.cuda_stream):
            raise RedrafterError("TensorRT-LLM engine execution failed (see the TensorRT log)")

    @torch.inference_mode()
    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        C.check_inputs(inputs, self.shape)
        require(self.pool is not None, "reserve() the KV cache before step()")
        dev = self.device
        t0 = self.timer.start()
        rows = (
            self.slot_state.gather(inputs) if C.from_slots(inputs) else explicit_rows(inputs, dev)
        )
        is_gen = not any(rows.is_ctx)
        use_graph = is_gen and self.graph_runner is not None
        p = prepare_step(
            inputs,
            self.shape,
            device=dev,
            max_blocks=self.max_blocks,
            layers=self.layers,
            kv_len=self.kv_len,
            pool_ptr=self.pool.data_ptr(),
            bucket=use_graph,
            rows=rows,
        )
        is_ctx, cache_len = p.is_ctx, p.cache_lengths
        feed = p.feed(self.engine_inputs)
        # the engine's stream starts after the inputs made on the current stream, and the current
        # stream goes on after the engine: stream order, no host synchronisation
        current = torch.cuda.current_stream(dev)
        self.stream.wait_stream(current)
        outputs: dict[str, torch.Tensor] | None = None
        phase = "engine"
        if use_graph:
            try:
                static = self.graph_runner.run(ShapeKey(p.batch, p.tokens), feed, p.out_shapes)
                current.wait_stream(self.stream)
                outputs = {k: v.clone() for k, v in static.items()}  # the static buffers are reused
                phase = (
                    "engine_graph" if self.graph_runner.last_action == "replay" else "graph_capture"
                )
                self.graph_calls[self.graph_runner.last_action] += 1
            except (
                GraphUnavailable
            ) as e:  # off for good; this call's eager run may have produced the outputs
                self._disable_graphs(str(e))
                outputs = e.outputs
                if outputs is not None:
                    self.graph_calls["eager"] += 1
        if outputs is None:
            outputs = {
                k: torch.empty(s, dtype=torch.int32, device=dev) for k, s in p.out_shapes.items()
            }
            self._run_eager(feed, outputs)
            current.wait_stream(self.stream)
            if is_gen:
                self.graph_calls["eager"] += 1
        t0 = self.timer.tick(phase, t0)

        n_acc = outputs[C.NUM_ACCEPTED_TOKENS]
        if not is_ctx:
            if self.relocate_impl is None:
                self.relocate_impl, self.relocate_reason = choose_relocation(self.pool.device)
            relocate_pool(
                self.pool,
                p.x[C.SLOT_IDS],
                cache_len,
                outputs[ACCEPTED_INDICES],
                n_acc,
                max_blocks=self.max_blocks,
                kv_heads=self.kv_heads,
                tokens_per_block=self.tokens_per_block,
                head_dim=self.head_dim,
                impl=self.relocate_impl,
            )
            self.relocate_calls[self.relocate_impl] += 1
        t0 = self.timer.tick("relocate", t0)
        if int(inputs[C.NUM_DRAFT_STEPS]) == 0:  # plain decoding: the next tree is the root alone
            bonus = outputs[C.OUTPUT_TOKENS].gather(1, n_acc[:, None].to(torch.int64))[:, 0]
            tree, beams = root_only_tree(bonus, self.shape)
            outputs.update(
                {
                    C.NEXT_DRAFT_TOKENS: beams,
                    C.NEXT_DRAFT_INDICES: tree.unpacker,
                    C.NEXT_FLAT_TOKENS: tree.tokens,
                    C.NEXT_PACKED_LENGTHS: tree.lengths,
                    C.NEXT_POSITION_OFFSETS: tree.offsets,
                    C.NEXT_PACKED_MASK: tree.packed_mask,
                }
            )
        else:
            require(
                int(inputs[C.NUM_DRAFT_STEPS]) == self.shape.draft_len,
                f"{C.NUM_DRAFT_STEPS} must be 0 or {self.shape.draft_len}",
            )
        out = {k: outputs[k] for k in C.OUTPUTS}
        self.slot_state.store(rows, out)  # the next call's generation rows read it
        self.timer.tick("pack", t0)
        return out


if TYPE_CHECKING:  # the type checker holds this backend to the contract's protocol

    def _implements_the_protocol(backend: TrtllmBackend) -> C.Backend:
        return backend
