"""The TensorRT-LLM backend: one engine that runs a whole ReDrafter step per call.

Stages (one module each):

- :mod:`.plugins`  — the plugin library (``libredrafter_trt_plugins.so``) and the CUDA operator
  library (``libredrafter_cuda.so``, KV relocation): finding, loading, creating plugin layers.
- :mod:`.network`  — the TensorRT-LLM model: Llama/Qwen2 base (TensorRT-LLM's own layers, GPT
  attention plugin with the spec-decoding packed mask and position offsets), acceptance, D
  unrolled draft steps, tree packing; engine I/O named by :mod:`redrafter_trt.contract`.
- :mod:`.builder`  — checkpoint directory -> engine directory (``redrafter-build --backend trtllm``).
- :mod:`.runtime`  — :class:`~.runtime.TrtllmBackend`, the step contract over the engine.

Everything that imports ``tensorrt`` or ``tensorrt_llm`` does so inside functions, through
:func:`require_trtllm`, so this package imports anywhere; using it without TensorRT-LLM raises a
:class:`~redrafter_trt.errors.RedrafterError` naming the container to run in.

Status: written against TensorRT-LLM 1.2 / TensorRT 10.14 APIs and never run here (no GPU, no
TensorRT on the development machines). ``build_scripts/gpu_selftest.sh`` is the check to run
inside the container; docs/gpu.md lists what was and was not verified on hardware.
"""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import RedrafterError

#: The container this backend targets (the TensorRT-LLM 1.2.x line, the last with the engine flow).
TRTLLM_CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"
TRTLLM_VERSION_PREFIX = "1.2"

#: Engine tensors beyond the step contract: the attention plumbing TensorRT-LLM's GPT attention
#: plugin reads (:class:`Plumbing`) and the accepted path the runtime relocates KV with.
ACCEPTED_INDICES = "accepted_packed_indices"  # [B, L] int32, packed index of each accepted node


class Plumbing:
    """TensorRT-LLM's names of the attention inputs the engine binds besides the contract:
    :mod:`.network` declares them, :mod:`.runtime` feeds them, :mod:`.cuda_graph` keeps the
    host ones (``host_*`` and ``spec_decoding_use``) in host buffers."""

    SEQUENCE_LENGTH = "sequence_length"
    HOST_PAST_KEY_VALUE_LENGTHS = "host_past_key_value_lengths"
    HOST_MAX_ATTENTION_WINDOW_SIZES = "host_max_attention_window_sizes"
    HOST_SINK_TOKEN_LENGTH = "host_sink_token_length"
    CONTEXT_LENGTHS = "context_lengths"
    HOST_CONTEXT_LENGTHS = "host_context_lengths"
    HOST_REQUEST_TYPES = "host_request_types"
    KV_CACHE_BLOCK_OFFSETS = "kv_cache_block_offsets"
    HOST_KV_CACHE_BLOCK_OFFSETS = "host_kv_cache_block_offsets"
    HOST_KV_CACHE_POOL_POINTERS = "host_kv_cache_pool_pointers"
    HOST_KV_CACHE_POOL_MAPPING = "host_kv_cache_pool_mapping"
    CACHE_INDIRECTION = "cache_indirection"
    HOST_RUNTIME_PERF_KNOBS = "host_runtime_perf_knobs"
    HOST_CONTEXT_PROGRESS = "host_context_progress"
    SPEC_DECODING_GENERATION_LENGTHS = "spec_decoding_generation_lengths"
    SPEC_DECODING_USE = "spec_decoding_use"


#: Every :class:`Plumbing` name, in declaration order.
ATTENTION_INPUTS = tuple(v for k, v in vars(Plumbing).items() if k.isupper())


def missing_message(what: str) -> str:
    return (
        f"{what} needs TensorRT-LLM {TRTLLM_VERSION_PREFIX}.x (TensorRT 10.14, CUDA 13) and an "
        f"NVIDIA GPU, which this environment does not have; run it inside the "
        f"{TRTLLM_CONTAINER} container (see docs/gpu.md and the Dockerfile), or use --backend torch"
    )


def trtllm_importable() -> bool:
    """True when ``tensorrt_llm`` and ``tensorrt`` can be found (nothing is imported)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_llm"))
    except (ImportError, ValueError):
        return False


def require_trtllm(what: str = "the TensorRT-LLM backend"):
    """Import and return ``(tensorrt, tensorrt_llm)``, or raise :class:`RedrafterError` naming the
    container. The version is checked: the engine flow exists up to the 1.2 line only."""
    if not trtllm_importable():
        raise RedrafterError(missing_message(what))
    try:
        trt = importlib.import_module("tensorrt")
        trtllm = importlib.import_module("tensorrt_llm")
    except Exception as e:
        raise RedrafterError(f"{missing_message(what)} (importing it failed: {e})") from e
    version = str(getattr(trtllm, "__version__", "?"))
    if not version.startswith(TRTLLM_VERSION_PREFIX):
        raise RedrafterError(
            f"{what}: found TensorRT-LLM {version}, expected {TRTLLM_VERSION_PREFIX}.x "
            f"(the engine flow was removed after it); use the {TRTLLM_CONTAINER} container"
        )
    return trt, trtllm


__all__ = [
    "TRTLLM_CONTAINER",
    "ACCEPTED_INDICES",
    "ATTENTION_INPUTS",
    "Plumbing",
    "require_trtllm",
    "trtllm_importable",
    "missing_message",
]
