"""The torch backend's operators on CUDA: the cpp/ kernels when ``libredrafter_cuda.so`` is built.

:func:`select_ops` returns the operator set a :class:`~redrafter_trt.backends.torch_backend.TorchBackend`
on ``device`` runs its step with:

- ``"kernel"`` (a CUDA device and the library loads): beam search (``invokeBeamSearchStep``),
  acceptance (``invokeAccept``) and KV relocation (``invokeKvRelocate``) through the C ABI of
  ``cpp/src/c_api_cuda.cpp`` on the current stream;
- ``"torch"`` otherwise: the PyTorch references of :mod:`redrafter_trt.ops`.

``$REDRAFTER_CUDA_OPS`` = ``auto`` (default) / ``kernel`` / ``torch`` chooses; ``kernel`` without
a GPU or the library is an error. :attr:`Ops.name` and :attr:`Ops.reason` say which ran and why.

The kernels have run on the CPU emulator and against the CPU references only; on a GPU
``build_scripts/gpu_check.sh`` compares this operator set with the torch one (greedy parity).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import native
from ..errors import RedrafterError, require
from ..ops import accept as torch_accept
from ..ops import relocate_kv as torch_relocate_kv
from ..ops.accept import Acceptance
from ..ops.beam_search import beam_search_step as torch_beam_search_step

CUDA_OPS_ENV = "REDRAFTER_CUDA_OPS"
KERNEL, TORCH = "kernel", "torch"


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _dev(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype or t.dtype).contiguous()


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def beam_search_step_kernel(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    warp_k: int,
    vocab_map: torch.Tensor | None = None,
):
    """cpp/ ``invokeBeamSearchStep``. logits: [B, W, K] fp32/fp16/bf16 CUDA; beam_scores: [B, W]
    float32; vocab_map: None or [K] int32 full id of each column (a draft vocabulary). Returns
    new_scores [B, W] float32, parent [B, W] int64, token [B, W] int64 (full ids)."""
    lib, dev = native.load_cuda_library(), logits.device
    x = native.as_logits(logits)
    b, w, _ = x.shape
    s = _dev(beam_scores, torch.float32, dev)
    scores = torch.empty((b, w), dtype=torch.float32, device=dev)
    parent = torch.empty((b, w), dtype=torch.int32, device=dev)
    token = torch.empty((b, w), dtype=torch.int32, device=dev)
    m = None if vocab_map is None else _dev(vocab_map, torch.int32, dev)
    p = native.beam_search_params(x, s, warp_k, m, scores, parent, token)
    p.workspace_bytes = lib.redrafter_beam_search_workspace_bytes(p)
    ws = _workspace(p.workspace_bytes, dev)
    p.workspace, p.stream = ws.data_ptr(), _stream()
    native.call("redrafter_beam_search_step_cuda", p, lib=lib)
    return scores, parent.long(), token.long()


def accept_kernel(logits, beams, unpacker, temperature, top_k, top_p, uniforms) -> Acceptance:
    """cpp/ ``invokeAccept``; arguments and result as :func:`redrafter_trt.ops.accept.accept`
    (logits [B, N, V]; beams, unpacker [B, W, L]; temperature/top_k/top_p [B]; uniforms [B, L])."""
    lib, dev = native.load_cuda_library(), logits.device
    x = native.as_logits(logits)
    b = x.shape[0]
    bm, up = _dev(beams, torch.int32, dev), _dev(unpacker, torch.int32, dev)
    l = bm.shape[2]
    temp, tp = (
        _dev(temperature, torch.float32, dev).reshape(-1),
        _dev(top_p, torch.float32, dev).reshape(-1),
    )
    tk, u = _dev(top_k, torch.int32, dev).reshape(-1), _dev(uniforms, torch.float32, dev)
    out = Acceptance(
        *(torch.empty(s, dtype=torch.int32, device=dev) for s in ((b,), (b,), (b,), (b, l), (b, l)))
    )
    p = native.accept_params(x, bm, up, temp, tk, tp, u, out)
    p.workspace_bytes = lib.redrafter_accept_workspace_bytes(p)
    ws = _workspace(p.workspace_bytes, dev)
    p.workspace, p.stream = ws.data_ptr(), _stream()
    native.call("redrafter_accept_cuda", p, lib=lib)
    return out


def relocate_kv_kernel(
    cache: torch.Tensor, slots, cache_lengths, accepted_indices, num_accepted
) -> torch.Tensor:
    """cpp/ ``invokeKvRelocate`` in place on the torch backend's cache
    ``[layers, 2, slots, kv_heads, max_seq, head_dim]`` (contiguous CUDA). Returns new lengths [B] int32."""
    lib, dev = native.load_cuda_library(), cache.device
    require(cache.is_contiguous(), "relocate_kv_kernel: the cache must be contiguous")
    layers, _, n_slots, heads, max_seq, head_dim = cache.shape
    s, c = _dev(slots, torch.int32, dev), _dev(cache_lengths, torch.int32, dev)
    a, n = _dev(accepted_indices, torch.int32, dev), _dev(num_accepted, torch.int32, dev)
    new_len = torch.empty((a.shape[0],), dtype=torch.int32, device=dev)
    p = native.kv_relocate_params(
        cache,
        s,
        c,
        a,
        n,
        new_len,
        num_layers=layers,
        num_slots=n_slots,
        kv_heads=heads,
        max_seq=max_seq,
        head_dim=head_dim,
    )
    p.stream = _stream()
    native.call("redrafter_kv_relocate_cuda", p, lib=lib)
    return new_len


@dataclass(frozen=True)
class Ops:
    """The operator set of one backend: ``name`` (``kernel`` / ``torch``) and why it was chosen."""

    name: str
    reason: str
    accept: Callable
    relocate_kv: Callable
    beam_search_step: Callable


TORCH_OPS = (torch_accept, torch_relocate_kv, torch_beam_search_step)
KERNEL_OPS = (accept_kernel, relocate_kv_kernel, beam_search_step_kernel)


def select_ops(device: torch.device) -> Ops:
    """The operators for a backend on ``device`` (see the module docstring)."""
    mode = os.environ.get(CUDA_OPS_ENV, "auto").strip().lower() or "auto"
    require(
        mode in ("auto", KERNEL, TORCH),
        f"${CUDA_OPS_ENV} must be auto, kernel or torch, got {mode!r}",
    )
    if mode == TORCH:
        return Ops(TORCH, f"${CUDA_OPS_ENV}=torch", *TORCH_OPS)
    if torch.device(device).type != "cuda":
        why = f"the model is on {device}; the cpp/ kernels need a CUDA device"
    else:
        try:
            native.load_cuda_library()
            return Ops(KERNEL, f"cpp/ kernels from {native.cuda_library_path()}", *KERNEL_OPS)
        except RedrafterError as e:
            why = str(e)
    require(mode != KERNEL, f"${CUDA_OPS_ENV}=kernel but the kernels cannot run: {why}")
    return Ops(TORCH, f"PyTorch operators: {why}", *TORCH_OPS)
