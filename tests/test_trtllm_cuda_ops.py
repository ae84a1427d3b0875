"""The torch backend's operator dispatch (redrafter_trt.backends.cuda_ops).

On the CPU: which operator set is chosen and why, and that the kernel path's beam-search loop is
Drafter.beam_search with a different step (same beams with the reference step). On a CUDA GPU
with cpp/build/libredrafter_cuda.so (build_scripts/gpu_check.sh runs this file there): the
kernels against the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from redrafter_trt.backends import cuda_ops
from redrafter_trt.errors import RedrafterError
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.ops.beam_search import beam_search_step

gpu_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_ops.native.cuda_available()),
    reason="needs a CUDA GPU and cpp/build/libredrafter_cuda.so (gpu_check.sh)",
)


def test_cpu_model_gets_the_torch_operators(monkeypatch):
    monkeypatch.delenv(cuda_ops.CUDA_OPS_ENV, raising=False)
    ops = cuda_ops.select_ops(torch.device("cpu"))
    assert ops.name == cuda_ops.TORCH and "cpu" in ops.reason
    assert ops.accept is cuda_ops.TORCH_OPS[0] and ops.relocate_kv is cuda_ops.TORCH_OPS[1]
    monkeypatch.setenv(cuda_ops.CUDA_OPS_ENV, "torch")
    assert cuda_ops.select_ops(torch.device("cuda")).reason == f"${cuda_ops.CUDA_OPS_ENV}=torch"


def test_forcing_kernels_without_them_is_an_error(monkeypatch):
    monkeypatch.setenv(cuda_ops.CUDA_OPS_ENV, "kernel")
    with pytest.raises(RedrafterError, match="kernel but the kernels cannot run"):
        cuda_ops.select_ops(torch.device("cpu"))
    monkeypatch.setenv(cuda_ops.CUDA_OPS_ENV, "fast")
    with pytest.raises(RedrafterError, match="auto, kernel or torch"):
        cuda_ops.select_ops(torch.device("cpu"))


def drafter_and_inputs(device="cpu", dtype=torch.float32, b=3, h=32, v=97):
    d = init_drafter(DrafterConfig(v, h, 2 * h, 1, True), seed=2).to(device, dtype)
    emb = torch.nn.Embedding(v, h).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(b, h, generator=g).to(device, dtype)
    root = torch.randint(0, v, (b,), generator=g).to(device)
    return d, emb, context, root


@torch.inference_mode()
def test_drafter_beam_search_hands_the_step_its_vocab_map(tmp_path):
    """The CUDA path swaps only the per-depth step; the step gets the head's draft-vocabulary map
    (a kernel called without it would return column indices instead of token ids)."""
    from redrafter_trt.models.drafter import DrafterConfig, init_drafter

    vocab = torch.tensor([7, 3, 11, 0, 29, 5], dtype=torch.int32)
    d = init_drafter(
        DrafterConfig(31, 8, 16, 1, True, draft_vocab_size=6), seed=1, std=0.5, draft_vocab=vocab
    )
    emb = torch.nn.Embedding(31, 8)
    context, root = torch.randn(2, 8), torch.tensor([1, 2])
    seen = []

    def step(logits, scores, warp_k, vocab_map):
        seen.append(vocab_map)
        return beam_search_step(logits, scores, warp_k, vocab_map)

    got = d.beam_search(emb, context, root, 3, 2, 8, step=step)
    assert torch.equal(got, d.beam_search(emb, context, root, 3, 2, 8))
    assert len(seen) == 2 and all(torch.equal(m, vocab) for m in seen)
    assert set(got[:, :, 1:].flatten().tolist()) <= set(vocab.tolist())


@gpu_kernels
@torch.inference_mode()
def test_kernels_match_the_references_on_the_gpu():
    from redrafter_trt.ops import accept, pack_tree, relocate_kv

    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    b, w, v = 4, 4, 1000
    logits = torch.randn(b, w, v, generator=g).to(dev)
    scores = torch.randn(b, w, generator=g).sort(dim=1, descending=True).values.to(dev)
    ref = beam_search_step(logits, scores, 8)
    got = cuda_ops.beam_search_step_kernel(logits, scores, 8)
    assert torch.equal(got[1], ref[1].long()) and torch.equal(got[2], ref[2].long())
    torch.testing.assert_close(got[0], ref[0])
    d, emb, context, root = drafter_and_inputs(dev)
    beams = d.beam_search(emb, context, root, w, 3, 8)
    tree = pack_tree(beams)
    n = tree.tokens.shape[1]
    node_logits = torch.randn(3, n, 97, generator=g).to(dev)
    z = torch.zeros(3, device=dev)
    args = (
        node_logits,
        beams,
        tree.unpacker,
        z,
        z.int(),
        torch.ones(3, device=dev),
        torch.rand(3, 4, device=dev),
    )
    for r, k in zip(accept(*args), cuda_ops.accept_kernel(*args)):
        assert torch.equal(r.int(), k)
    cache = torch.randn(2, 2, 3, 2, 32, 8, device=dev)
    c2 = cache.clone()
    slots, lens = torch.tensor([2, 0, 1], device=dev), torch.tensor([5, 9, 0], device=dev)
    path, na = (
        torch.tensor([[0, 2, 3, 3], [0, 1, 1, 1], [0, 3, 5, 7]], device=dev),
        torch.tensor([2, 0, 3], device=dev),
    )
    relocate_kv(cache, slots, lens, path, na)
    assert torch.equal(cuda_ops.relocate_kv_kernel(c2, slots, lens, path, na).long(), lens + na + 1)
    assert torch.equal(cache, c2)
