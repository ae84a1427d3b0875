"""Building engine directories (``redrafter-build``) for either backend; :mod:`.loader` opens
them (:func:`redrafter_trt.runtime.loader.load`, public as :func:`redrafter_trt.load`).

An engine directory mirrors TensorRT-LLM's: ``config.json`` with ``version``, ``backend``,
``pretrained_config`` (the checkpoint's config) and ``build_config``, plus the backend's files:
``rank{i}.safetensors`` for the torch backend (one per tensor-parallel rank), ``rank{i}.engine``
for the TensorRT-LLM backend, and the tokenizer files when the checkpoint has them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import RedrafterError, require
from ..formats.checkpoint import (
    CHECKPOINT_CONFIG,
    ENGINE_CONFIG,
    check_blocks_match,
    copy_tokenizer_files,
    load_checkpoint_models,
    rank_file,
    read_checkpoint_config,
    require_model_dir,
)
from ..models.blocks import BLOCKS_FILE
from ..models.io import atomic_output_dir
from ..ops.beam_search import DEFAULT_WARP_K
from ..trtllm import TRTLLM_CONTAINER  # TensorRT-free; the backend itself loads lazily

BACKENDS = ("auto", "torch", "trtllm")


def trtllm_available() -> bool:
    """True when TensorRT-LLM imports and a CUDA GPU is visible."""
    try:
        import importlib.util

        if importlib.util.find_spec("tensorrt_llm") is None:
            return False
    except (ImportError, ValueError):
        return False
    return torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    require(backend in BACKENDS, f"--backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return "trtllm" if trtllm_available() else "torch"
    if backend == "trtllm" and not trtllm_available():
        raise RedrafterError(
            "--backend trtllm needs TensorRT-LLM 1.2 and an NVIDIA GPU, which this machine does not "
            f"have; run inside the {TRTLLM_CONTAINER} container, or use --backend torch"
        )
    return backend


def build_engine(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    backend: str = "auto",
    max_batch_size: int = 8,
    max_input_len: int = 1024,
    max_seq_len: int = 2048,
    warp_k: int = DEFAULT_WARP_K,
    overwrite: bool = False,
    extra_build_config: dict[str, Any] | None = None,
) -> Path:
    """Build an engine directory from a ReDrafter checkpoint directory."""
    ckpt = require_model_dir(checkpoint_dir, "--checkpoint_dir", "checkpoint")
    cfg = read_checkpoint_config(ckpt)
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("max_input_len", max_input_len),
        ("max_seq_len", max_seq_len),
    ):
        require(isinstance(value, int) and value >= 1, f"--{name} must be >= 1, got {value}")
    require(
        max_input_len < max_seq_len,
        f"--max_input_len {max_input_len} must be smaller than --max_seq_len {max_seq_len}",
    )
    require(warp_k >= 0, f"--warp_k must be >= 0, got {warp_k}")
    window = cfg.base.sliding_window
    require(
        window is None or max_seq_len <= window,
        f"--max_seq_len {max_seq_len} exceeds the base model's sliding window {window}; "
        "sliding-window attention is not implemented: build with --max_seq_len <= the window",
    )
    backend = resolve_backend(backend)
    weights = ckpt / rank_file(0)
    require(weights.is_file(), f"{ckpt}: missing {rank_file(0)}")
    if backend == "trtllm":
        from ..trtllm import builder as trt_build  # lazy: needs TensorRT-LLM

        return trt_build.build_trtllm_engine(
            ckpt,
            output_dir,
            cfg,
            max_batch_size=max_batch_size,
            max_input_len=max_input_len,
            max_seq_len=max_seq_len,
            warp_k=warp_k,
            overwrite=overwrite,
            **(extra_build_config or {}),
        )
    # Torch backend: validate by loading every tensor once, then link the weights in.
    if cfg.tp_size == 1:
        load_checkpoint_models(ckpt)
        rank_files = [weights]
        if (ckpt / BLOCKS_FILE).is_file():  # block weights travel with the engine
            check_blocks_match(ckpt)  # the loader trusts them instead of the float32 tensors
            rank_files.append(ckpt / BLOCKS_FILE)
    else:  # every rank's shard, checked against the config and the others, then loaded once
        from ..backends.tp import check_rank_files, load_rank_models

        rank_files = check_rank_files(
            ckpt, cfg, None, json.loads((ckpt / CHECKPOINT_CONFIG).read_text())
        )
        for rank in range(cfg.tp_size):
            load_rank_models(ckpt, cfg, rank)
    build_config = {
        "max_batch_size": max_batch_size,
        "max_input_len": max_input_len,
        "max_seq_len": max_seq_len,
        "warp_k": warp_k,
        **(extra_build_config or {}),
    }
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        (tmp / ENGINE_CONFIG).write_text(
            json.dumps(
                {
                    "version": __version__,
                    "backend": "torch",
                    "pretrained_config": json.loads((ckpt / CHECKPOINT_CONFIG).read_text()),
                    "build_config": build_config,
                },
                indent=2,
            )
        )
        for f in rank_files:
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        copy_tokenizer_files(ckpt, tmp)
    return Path(output_dir)
