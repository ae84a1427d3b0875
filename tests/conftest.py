"""Shared fixtures: tiny random Llama / Qwen2 models written as real Hugging Face directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from redrafter_trt.backends.torch_backend import TorchBackend
from redrafter_trt.hf import load_hf_base
from redrafter_trt.models.base import BaseModel
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.runtime import Generator

ARCHS = ("llama", "qwen2")
VOCAB = 97


def tiny_hf_config(arch: str, vocab: int = VOCAB, tie: bool = False, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=tie, initializer_range=0.2, eos_token_id=None, bos_token_id=None)
    kw.update(overrides)
    return cls(**kw)


def write_tiny_hf(path: Path, arch: str, seed: int = 0, **cfg_overrides) -> Path:
    """Save a tiny random transformers model (the reference implementation) to ``path``."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(tiny_hf_config(arch, **cfg_overrides)).eval()
    if arch == "qwen2":  # transformers inits biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: write_tiny_hf(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


def tiny_generator(model_dir: Path, num_beams: int, draft_len: int, dtype=torch.float64,
                   proposer=None, max_batch_size: int = 16, drafter_seed: int = 0,
                   warp_k: int = 50) -> Generator:
    cfg, sd = load_hf_base(model_dir)
    base = BaseModel(cfg)
    base.load_state_dict(sd)
    drafter = init_drafter(DrafterConfig(cfg.vocab_size, cfg.hidden_size, 2 * cfg.hidden_size, 1, True),
                           seed=drafter_seed, std=0.5)
    backend = TorchBackend(base.to(dtype), drafter.to(dtype), num_beams, draft_len, warp_k=warp_k,
                           max_batch_size=max_batch_size, max_input_len=256, max_seq_len=512,
                           proposer=proposer)
    return Generator(backend)


@pytest.fixture(scope="session")
def native_library():
    """The C++ CPU references' library: built on demand locally, required in CI."""
    import subprocess

    from redrafter_trt import native

    if not native.available():
        if os.environ.get("CI"):
            pytest.fail(f"native library missing: {native.library_path()} "
                        "(build_scripts/build_cpp.sh builds it)")
        subprocess.run(["bash", str(native.REPO_ROOT / "build_scripts" / "build_cpp.sh"), "--cpu-only"],
                       check=True)
    native.load_library()


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
