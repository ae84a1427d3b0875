"""CUDA-graph capture of the engine's generation calls (:class:`~.runtime.TrtllmBackend`).

What TensorRT-LLM 1.2 does, and what this module follows:

- Its in-flight-batching runtime (``cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp``,
  ``prepareGraph``; ``RuntimeBuffers::prepareBuffersForCudaGraph``; ``CudaGraphExecutor`` in
  ``utils/inflightBatchingUtils.cpp``) captures generation-only steps, keeps an LRU cache of graph
  executors keyed by the batch state (context requests, generation requests, tokens, and the
  batch's maximum KV length rounded up to 256), and captures with every row's host
  ``past_key_value_lengths`` set to that rounded length: the attention kernels are then launched
  with a grid large enough for any length up to it, and blocks past a row's real length (which
  the kernels read from the device ``sequence_length``) exit early. One graph therefore serves
  every step until the rounded length or the batch changes.
- Its Python ``GenerationSession`` (``tensorrt_llm/runtime/generation.py``, ``cuda_graph_mode``,
  ``_capture_cuda_graph_and_instantiate``, ``_update_cuda_graph_instance``) re-captures every
  step (its exact ``host_past_key_value_lengths`` change every step) with
  ``cudaStreamBeginCapture`` / ``IExecutionContext.execute_async_v3`` / ``cudaStreamEndCapture``
  and refreshes the existing executable with ``cudaGraphExecUpdate``, destroying and
  re-instantiating it when the update is refused. The context (prefill) step runs eagerly and
  drops the graphs. Here a re-capture happens only when a host input's capture value changes.

Why this is valid. ``execute_async_v3`` does all host-side work at enqueue time: TensorRT passes
the *values* of host-located inputs (``host_*``, ``spec_decoding_use``) to the plugins, and the
GPT attention plugin turns them into kernel parameters and launch grids. A captured graph
therefore replays with the host values it was captured with and with the device *addresses* bound
at capture; the device *contents* are read at replay. So, per shape key:

1. every engine input and output gets a static buffer, bound once on the execution context; a
   step copies its inputs into them and replays (device values are free to change);
2. the graph is valid while every host input equals its value at capture. This module computes
   those values (:func:`capture_host_values`: ``host_past_key_value_lengths`` normalised to the
   rounded maximum, as TensorRT-LLM does; the others are per call constants and the pool
   pointer), and a change of any of them (:func:`host_signature`) re-captures and updates the
   executable in place. ``host_kv_cache_block_offsets`` is bound but read by no plugin (the
   device block offsets are), so it is left out of the signature (:data:`UNREAD_HOST_INPUTS`);
3. the static host buffers keep the capture's values for as long as the graph lives, in case a
   plugin enqueued a copy from them.

A capture first runs the engine eagerly with the static bindings (TensorRT needs one enqueue after
a shape change before it can be captured; that run is the call's result), then records the same
enqueue. One execution context serves every key: a replay depends only on what was recorded, not
on the bindings set later for other keys (TensorRT-LLM's C++ runtime likewise caches graphs of
several batch states per context), and calls are serialised on one stream, each synchronised
before the next, so the keys can share the context's scratch memory. Context (prefill) calls are
never captured (prompt lengths vary; TensorRT-LLM captures generation-only batches too).

Everything here except :class:`CudaGraphRunner` is plain torch and tested on the CPU
(tests/test_trtllm.py). :class:`CudaGraphRunner` needs a GPU, TensorRT and cuda-python and has not
run on hardware yet.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..errors import require
from . import ATTENTION_INPUTS
from . import Plumbing as P

CUDA_GRAPH_ENV = "REDRAFTER_CUDA_GRAPH"
#: TensorRT-LLM's ``kKV_CACHE_LEN_CUDA_GRAPH_ROUND_SIZE``: re-capture when the batch's maximum KV
#: length crosses a multiple of this.
KV_LEN_ROUND = 256
#: Shape keys whose buffers and executable are kept (least recently used ones are dropped).
DEFAULT_GRAPH_CACHE_SIZE = 8

PAST_KV_LENGTHS = P.HOST_PAST_KEY_VALUE_LENGTHS
#: Engine inputs that live in host memory; the plugins read their values when the engine is enqueued.
#: Known by name: TensorRT 10 reports them as DEVICE-located (TensorRT-LLM declares every network
#: input alike and binds CPU pointers to these, e.g. runtime/generation.py, runtime/redrafter_utils.py
#: ``spec_decoding_use`` on "cpu"), so ``ICudaEngine.get_tensor_location`` cannot tell them apart.
HOST_INPUTS = frozenset(n for n in ATTENTION_INPUTS if n.startswith("host_")) | {
    P.SPEC_DECODING_USE
}


def host_input_names(engine_inputs: Iterable[str]) -> frozenset[str]:
    """The engine inputs bound to host memory: :data:`HOST_INPUTS` that the engine kept."""
    return HOST_INPUTS & frozenset(engine_inputs)


#: Host inputs the graph does not need exactly: captured with an upper bound (rounded), so they do
#: not force a re-capture on every step.
BOUNDED_HOST_INPUTS = frozenset({PAST_KV_LENGTHS})

#: Host inputs bound to the engine that no plugin reads at enqueue, so they are no part of a graph's
#: signature: the GPT attention plugin takes the block offsets from the device
#: ``kv_cache_block_offsets`` (gptAttentionPlugin.cpp:862-897; ``HOST_KV_CACHE_BLOCK_OFFSETS`` is
#: only declared, :111, :167, :398), which a replay reads from its static buffer. In the signature
#: they would re-capture the graph whenever the rows' slots change.
UNREAD_HOST_INPUTS = frozenset({P.HOST_KV_CACHE_BLOCK_OFFSETS})


def cuda_graph_setting(requested: bool | None = None) -> tuple[bool, str]:
    """Whether generation calls use CUDA graphs, and why: ``requested`` (the constructor's
    argument) wins, else ``$REDRAFTER_CUDA_GRAPH`` (1/0, on/off, true/false), else on."""
    if requested is not None:
        return bool(requested), f"cuda_graph={bool(requested)}"
    raw = os.environ.get(CUDA_GRAPH_ENV, "").strip().lower()
    if not raw:
        return True, "default"
    on, off = {"1", "on", "true", "yes"}, {"0", "off", "false", "no"}
    require(raw in on | off, f"${CUDA_GRAPH_ENV} must be 1 or 0 (on/off, true/false), got {raw!r}")
    return raw in on, f"${CUDA_GRAPH_ENV}={raw}"


# --------------------------------------------------------------------------- shape keys
class ShapeKey(NamedTuple):
    """The static shapes of a generation call: rows, and tokens per row (after bucketing)."""

    batch: int
    tokens: int


def token_buckets(tree_size: int) -> tuple[int, ...]:
    """Tokens-per-row sizes generation calls are padded to: powers of two below the tree size N,
    and N (a plain-decoding call carries 1 token per row, a drafted tree at most N)."""
    require(tree_size >= 1, f"tree size must be >= 1, got {tree_size}")
    out, p = [], 1
    while p < tree_size:
        out.append(p)
        p *= 2
    return tuple(out) + (tree_size,)


def bucket_tokens(tokens: int, tree_size: int, limit: int) -> int:
    """The smallest bucket >= ``tokens`` that fits the call's padded input width ``limit``.

    Padding a generation row further is what rows shorter than the call's longest row already
    get: extra nodes see only themselves, their KV lands past the row's length and is overwritten
    later, and acceptance reads the first ``input_lengths`` nodes only."""
    require(1 <= tokens <= limit, f"tokens per row {tokens} outside 1..{limit}")
    for b in token_buckets(tree_size):
        if b >= tokens:
            return min(b, limit)
    return tokens  # longer than a tree (not a generation call of this engine): unbucketed


def round_kv_length(max_len: int, kv_len: int, round_size: int = KV_LEN_ROUND) -> int:
    """TensorRT-LLM's capture value of the past KV length: the batch maximum rounded up to
    ``round_size``, capped at the slot's KV positions ``kv_len`` (never below the maximum)."""
    require(round_size >= 1, f"round size must be >= 1, got {round_size}")
    require(0 <= max_len <= kv_len, f"KV length {max_len} outside 0..{kv_len}")
    return min(kv_len, -(-max(max_len, 1) // round_size) * round_size)


def capture_host_values(
    feed: dict[str, torch.Tensor],
    host_names: Iterable[str],
    kv_len: int,
    round_size: int = KV_LEN_ROUND,
) -> dict[str, torch.Tensor]:
    """The host inputs a graph is captured with: the feed's own values, except the past KV
    lengths, which every row gets as the rounded batch maximum (:func:`round_kv_length`)."""
    out = {}
    for name in sorted(set(host_names) & feed.keys()):
        v = feed[name].detach().cpu().contiguous()
        if name == PAST_KV_LENGTHS:
            v = torch.full_like(
                v, round_kv_length(int(v.max()) if v.numel() else 0, kv_len, round_size)
            )
        out[name] = v
    return out


def host_signature(host_values: dict[str, torch.Tensor]) -> tuple:
    """Hashable identity of the host values the plugins read (all but :data:`UNREAD_HOST_INPUTS`):
    a graph replays only under the signature it was captured with."""
    return tuple(
        (n, tuple(v.shape), str(v.dtype), v.numpy().tobytes())
        for n, v in sorted(host_values.items())
        if n not in UNREAD_HOST_INPUTS
    )


# --------------------------------------------------------------------------- static buffers
@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    host: bool  # in host memory (a host-located engine input)
    output: bool


def buffer_plan(
    feed: dict[str, torch.Tensor],
    out_shapes: dict[str, tuple[int, ...]],
    host_names: Iterable[str],
    out_dtype: torch.dtype = torch.int32,
) -> list[BufferSpec]:
    """One static buffer per engine input (the filtered feed) and output, shapes and dtypes from
    this call; inputs in ``host_names`` are host buffers, everything else device memory."""
    host = set(host_names)
    plan = [
        BufferSpec(n, tuple(v.shape), v.dtype, n in host, False) for n, v in sorted(feed.items())
    ]
    plan += [BufferSpec(n, tuple(s), out_dtype, False, True) for n, s in sorted(out_shapes.items())]
    return plan


class StaticBuffers:
    """The buffers of one shape key. Their addresses never change, so they are bound once."""

    def __init__(self, plan: list[BufferSpec], device: torch.device):
        self.plan = {s.name: s for s in plan}
        pin = device.type == "cuda"
        self.tensors: dict[str, torch.Tensor] = {}
        for s in plan:
            if s.host:
                self.tensors[s.name] = torch.zeros(s.shape, dtype=s.dtype, pin_memory=pin)
            else:
                self.tensors[s.name] = torch.zeros(s.shape, dtype=s.dtype, device=device)

    def matches(
        self, feed: dict[str, torch.Tensor], out_shapes: dict[str, tuple[int, ...]]
    ) -> bool:
        names = {n for n, s in self.plan.items() if not s.output}
        if names != set(feed) or {n for n, s in self.plan.items() if s.output} != set(out_shapes):
            return False
        return all(
            tuple(feed[n].shape) == self.plan[n].shape and feed[n].dtype == self.plan[n].dtype
            for n in names
        ) and all(tuple(out_shapes[n]) == self.plan[n].shape for n in out_shapes)

    def load_device(self, feed: dict[str, torch.Tensor]) -> None:
        """Copy the call's device inputs into the static device buffers (stream-ordered)."""
        for n, s in self.plan.items():
            if not s.output and not s.host:
                self.tensors[n].copy_(feed[n], non_blocking=True)

    def load_host(self, host_values: dict[str, torch.Tensor]) -> None:
        """Write the capture's host values (only ever before a capture)."""
        for n, v in host_values.items():
            require(self.plan[n].host, f"{n} is not a host buffer")
            self.tensors[n].copy_(v)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {n: self.tensors[n] for n, s in self.plan.items() if not s.output}

    def outputs(self) -> dict[str, torch.Tensor]:
        return {n: self.tensors[n] for n, s in self.plan.items() if s.output}


class LruCache:
    """Least-recently-used map with a capacity; ``on_evict(value)`` runs for each dropped value."""

    def __init__(self, capacity: int, on_evict: Callable[[Any], None] | None = None):
        require(capacity >= 1, f"graph cache size must be >= 1, got {capacity}")
        self.capacity = capacity
        self.on_evict = on_evict
        self._d: OrderedDict = OrderedDict()

    def get(self, key):
        if key not in self._d:
            return None
        self._d.move_to_end(key)
        return self._d[key]

    def put(self, key, value) -> None:
        if key in self._d:
            old = self._d.pop(key)
            if old is not value and self.on_evict:
                self.on_evict(old)
        self._d[key] = value
        while len(self._d) > self.capacity:
            _, dropped = self._d.popitem(last=False)
            if self.on_evict:
                self.on_evict(dropped)

    def clear(self) -> None:
        while self._d:
            _, v = self._d.popitem(last=False)
            if self.on_evict:
                self.on_evict(v)

    def __len__(self) -> int:
        return len(self._d)

    def keys(self) -> list:
        return list(self._d)


@dataclass
class GraphEntry:
    buffers: StaticBuffers
    exec_: Any = None  # cudaGraphExec_t
    signature: tuple | None = None


def graph_action(entry: GraphEntry | None, signature: tuple) -> str:
    """What a generation call does: ``capture`` (no executable for the shape key yet),
    ``update`` (host inputs changed since the capture: re-capture, cudaGraphExecUpdate), or
    ``replay`` (copy the inputs in and launch)."""
    if entry is None or entry.exec_ is None:
        return "capture"
    return "replay" if entry.signature == signature else "update"


# --------------------------------------------------------------------------- GPU part
def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


class GraphUnavailable(RuntimeError):
    """Capture or replay failed; the backend disables graphs and falls back to Session.run.
    ``outputs`` holds the call's results when the eager run before a failed capture produced them."""

    def __init__(self, reason: str, outputs: dict[str, torch.Tensor] | None = None):
        super().__init__(reason)
        self.outputs = outputs


class CudaGraphRunner:
    """Captures and replays generation calls on one execution context and stream.

    Not run on hardware yet. ``run`` returns the call's outputs (the static output buffers; copy
    them before the next call). On a capture or update it first runs the engine eagerly with the
    capture's bindings (TensorRT wants one enqueue after a shape change before a capture, and that
    run is this call's result), then records the same enqueue into a graph.
    """

    def __init__(
        self,
        context: Any,
        stream: torch.cuda.Stream,
        device: torch.device,
        host_names: Iterable[str],
        kv_len: int,
        *,
        round_size: int = KV_LEN_ROUND,
        capacity: int = DEFAULT_GRAPH_CACHE_SIZE,
    ):
        self.cudart = import_cudart()
        self.context = context
        self.stream = stream
        self.device = device
        self.host_names = frozenset(host_names)
        self.kv_len = kv_len
        self.round_size = round_size
        self.cache = LruCache(capacity, self._destroy)
        self.counts = {"capture": 0, "update": 0, "reinstantiate": 0, "replay": 0}
        self.last_action = ""

    # -- cuda-python calls return (err, *values)
    def _check(self, ret, what: str):
        err = ret[0] if isinstance(ret, tuple) else ret
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise GraphUnavailable(f"{what} failed: {err}")
        return ret[1:] if isinstance(ret, tuple) and len(ret) > 1 else None

    def _destroy(self, entry: GraphEntry) -> None:
        if entry.exec_ is not None:
            self.cudart.cudaGraphExecDestroy(entry.exec_)
            entry.exec_ = None

    def clear(self) -> None:
        """Drop every graph and buffer (the KV pool moved: its pointer is a captured host value)."""
        torch.cuda.synchronize(self.device)
        self.cache.clear()

    def _bind(self, buffers: StaticBuffers) -> None:
        ctx = self.context
        for name, t in buffers.inputs().items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise GraphUnavailable(f"set_input_shape({name}, {tuple(t.shape)}) was refused")
        for name, t in {**buffers.inputs(), **buffers.outputs()}.items():
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise GraphUnavailable(f"set_tensor_address({name}) was refused")

    def _capture(self, entry: GraphEntry) -> str:
        """Record one enqueue into a graph; refresh ``entry``'s executable with it (cudaGraphExecUpdate,
        or a new instantiation when the update is refused, as TensorRT-LLM does)."""
        cudart, s = self.cudart, self.stream.cuda_stream
        success = cudart.cudaError_t.cudaSuccess
        self._check(
            cudart.cudaStreamBeginCapture(
                s, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            ),
            "cudaStreamBeginCapture",
        )
        graph, ok = None, False
        try:
            ok = self.context.execute_async_v3(s)
        finally:  # always leave capture mode, whatever the enqueue did
            ret = cudart.cudaStreamEndCapture(s)
            if ret[0] == success:
                graph = ret[1]
        try:
            if graph is None:
                raise GraphUnavailable(f"cudaStreamEndCapture failed: {ret[0]}")
            if not ok:
                raise GraphUnavailable("execute_async_v3 failed under stream capture")
            action = "capture"
            if entry.exec_ is not None:
                upd = cudart.cudaGraphExecUpdate(entry.exec_, graph)
                action = "update"
                if (upd[0] if isinstance(upd, tuple) else upd) != success:  # topology changed
                    self._destroy(entry)
                    action = "reinstantiate"
            if entry.exec_ is None:
                entry.exec_ = self._check(
                    cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"
                )[0]
            self._check(cudart.cudaGraphUpload(entry.exec_, s), "cudaGraphUpload")
            return action
        finally:
            if graph is not None:
                cudart.cudaGraphDestroy(graph)

    def run(
        self, key: ShapeKey, feed: dict[str, torch.Tensor], out_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, torch.Tensor]:
        host = capture_host_values(feed, self.host_names, self.kv_len, self.round_size)
        sig = host_signature(host)
        entry = self.cache.get(key)
        if entry is not None and not entry.buffers.matches(feed, out_shapes):
            entry = None
        if entry is None:
            entry = GraphEntry(
                StaticBuffers(buffer_plan(feed, out_shapes, self.host_names), self.device)
            )
            self.cache.put(key, entry)
        action = graph_action(entry, sig)
        with torch.cuda.stream(self.stream):
            entry.buffers.load_device(feed)
        if action == "replay":
            self._check(
                self.cudart.cudaGraphLaunch(entry.exec_, self.stream.cuda_stream), "cudaGraphLaunch"
            )
        else:
            entry.buffers.load_host(host)
            entry.signature = None
            self._bind(entry.buffers)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise GraphUnavailable("execute_async_v3 failed with the static buffers")
            try:
                action = self._capture(entry)
            except Exception as e:
                self.stream.synchronize()
                outputs = {k: v.clone() for k, v in entry.buffers.outputs().items()}
                raise GraphUnavailable(f"CUDA-graph capture failed: {e}", outputs) from e
            entry.signature = sig
        self.counts[action] += 1
        self.last_action = action
        return entry.buffers.outputs()
