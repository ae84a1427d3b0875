"""The frozen base model the draft head is distilled from."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from ..formats.hf import load_hf_base
from ..models.base import BaseModel
from ..models.drafter import load_checked


def load_frozen_base(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BaseModel:
    """Load a Hugging Face base directory as a :class:`BaseModel` in eval mode, no gradients,
    on the CPU kernels where the torch backend would use them (feature extraction then runs on
    them; gen-data and gen-prompts run through the backend)."""
    from ..backends.torch_backend import default_native_linear

    cfg, sd = load_hf_base(Path(model_dir))
    base = BaseModel(cfg)
    load_checked(base, sd, str(model_dir))
    base = base.to(device=device, dtype=dtype).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    if default_native_linear(torch.device(device), dtype):
        base.use_native_linear(True)
    return base


def feature_base(base: BaseModel, dtype: torch.dtype) -> BaseModel:
    """A copy of the frozen base in ``dtype`` for computing training features. On the CPU it
    runs on torch's kernels: feature extraction is large-batch prefill, where torch's bfloat16
    matrix products use a CPU's bf16 units and the toolkit's kernels (made for decoding's small
    batches) do not."""
    out = copy.deepcopy(base)
    if out.native_linear:
        out.use_native_linear(False)
    return out.to(dtype=dtype)


def eos_ids(base: BaseModel, tokenizer=None) -> list[int]:
    eos = list(base.config.eos_token_id)
    if (
        tokenizer is not None
        and tokenizer.eos_token_id is not None
        and tokenizer.eos_token_id not in eos
    ):
        eos.append(int(tokenizer.eos_token_id))
    return eos
