"""Engine directories: ``redrafter-build`` writes them, :func:`load` opens them.

An engine directory mirrors TensorRT-LLM's: ``config.json`` with ``version``, ``backend``,
``pretrained_config`` (the checkpoint's config) and ``build_config``, plus the backend's files:
``rank0.safetensors`` for the torch backend, ``rank{i}.engine`` for the TensorRT-LLM backend, and
the tokenizer files when the checkpoint has them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import (CHECKPOINT_CONFIG, RedrafterCheckpointConfig, copy_tokenizer_files,
                         load_checkpoint_models, rank_file, read_checkpoint_config,
                         require_model_dir)
from .errors import RedrafterError, require
from .models.io import atomic_output_dir, read_json
from .ops.beam_search import DEFAULT_WARP_K

ENGINE_CONFIG = "config.json"
BACKENDS = ("auto", "torch", "trtllm")
TRTLLM_CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"


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
            f"have; run inside the {TRTLLM_CONTAINER} container, or use --backend torch")
    return backend


def resolve_device(device: str | None, flag: str = "--device") -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (None: cuda when available, else cpu) as a torch device,
    with a :class:`RedrafterError` naming ``flag`` for a bad name or a CUDA device this torch
    cannot use."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise RedrafterError(f"{flag} {device!r}: expected cpu, cuda or cuda:N") from None
    require(dev.type in ("cpu", "cuda"), f"{flag} {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        require(torch.cuda.is_available(),
                f"{flag} {device}: this torch ({torch.__version__}) has no usable CUDA device "
                "(a CPU-only build, or no GPU/driver visible); use --device cpu")
        n = torch.cuda.device_count()
        require(dev.index is None or dev.index < n,
                f"{flag} {device}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return dev


def build_engine(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                 backend: str = "auto", max_batch_size: int = 8, max_input_len: int = 1024,
                 max_seq_len: int = 2048, warp_k: int = DEFAULT_WARP_K, overwrite: bool = False,
                 extra_build_config: dict[str, Any] | None = None) -> Path:
    """Build an engine directory from a ReDrafter checkpoint directory."""
    ckpt = require_model_dir(checkpoint_dir, "--checkpoint_dir", "checkpoint")
    cfg = read_checkpoint_config(ckpt)
    for name, value in (("max_batch_size", max_batch_size), ("max_input_len", max_input_len),
                        ("max_seq_len", max_seq_len)):
        require(isinstance(value, int) and value >= 1, f"--{name} must be >= 1, got {value}")
    require(max_input_len < max_seq_len,
            f"--max_input_len {max_input_len} must be smaller than --max_seq_len {max_seq_len}")
    require(warp_k >= 0, f"--warp_k must be >= 0, got {warp_k}")
    window = cfg.base.sliding_window
    require(window is None or max_seq_len <= window,
            f"--max_seq_len {max_seq_len} exceeds the base model's sliding window {window}; "
            "sliding-window attention is not implemented: build with --max_seq_len <= the window")
    backend = resolve_backend(backend)
    weights = ckpt / rank_file(0)
    require(weights.is_file(), f"{ckpt}: missing {rank_file(0)}")
    if backend == "trtllm":
        from .trtllm import build as trt_build  # lazy: needs TensorRT-LLM

        return trt_build.build_trtllm_engine(ckpt, output_dir, cfg, max_batch_size=max_batch_size,
                                             max_input_len=max_input_len, max_seq_len=max_seq_len,
                                             warp_k=warp_k, overwrite=overwrite,
                                             **(extra_build_config or {}))
    # Torch backend: validate by loading every tensor once, then link the weights in.
    load_checkpoint_models(ckpt)
    build_config = {"max_batch_size": max_batch_size, "max_input_len": max_input_len,
                    "max_seq_len": max_seq_len, "warp_k": warp_k, **(extra_build_config or {})}
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        (tmp / ENGINE_CONFIG).write_text(json.dumps({
            "version": __version__, "backend": "torch",
            "pretrained_config": json.loads((ckpt / CHECKPOINT_CONFIG).read_text()),
            "build_config": build_config}, indent=2))
        try:
            os.link(weights, tmp / rank_file(0))
        except OSError:
            shutil.copy2(weights, tmp / rank_file(0))
        copy_tokenizer_files(ckpt, tmp)
    return Path(output_dir)


def read_engine_config(engine_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(engine_dir) / ENGINE_CONFIG
    cfg = read_json(path, "engine config")
    for key in ("backend", "pretrained_config", "build_config"):
        require(key in cfg, f"{path}: missing {key!r}; is this a redrafter-build engine directory?")
    return cfg


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a checkpoint or engine, or None when it has none."""
    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a bad directory
        raise RedrafterError(f"{path}: cannot load the tokenizer files ({e})") from e


def load(engine_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None,
         proposer=None, adaptive: str = "auto"):
    """Open an engine directory and return a :class:`~redrafter_trt.runtime.Generator`.

    ``adaptive``: per-step beams and depth from the stored ``cost_model.json``
    (:func:`redrafter_trt.runtime.adaptive.stored_policy`: ``auto`` when it matches this machine
    and engine, ``on`` requires it, ``off`` keeps the engine's fixed shape); ``gen.policy_note``
    says which applies."""
    from .runtime.generator import Generator

    engine_dir = require_model_dir(engine_dir, "--engine_dir", "engine")
    dev = resolve_device(device)
    cfg = read_engine_config(engine_dir)
    ckpt_cfg = RedrafterCheckpointConfig.from_dict(cfg["pretrained_config"],
                                                   str(engine_dir / ENGINE_CONFIG))
    bc = cfg["build_config"]
    if cfg["backend"] == "trtllm":
        from .trtllm import runtime as trt_runtime  # lazy: needs TensorRT-LLM

        backend = trt_runtime.TrtllmBackend(engine_dir, ckpt_cfg, bc)
    elif cfg["backend"] == "torch":
        from .backends.torch_backend import TorchBackend
        from .checkpoint import DTYPES

        torch_dtype = None
        if dtype is not None:
            require(dtype in DTYPES or dtype == "float64", f"dtype {dtype!r} not supported")
            torch_dtype = torch.float64 if dtype == "float64" else DTYPES[dtype]
        _, base, drafter = load_checkpoint_models(engine_dir, dtype=torch_dtype, config=ckpt_cfg)
        backend = TorchBackend(base.to(dev), drafter.to(dev), ckpt_cfg.num_beams, ckpt_cfg.draft_len,
                               warp_k=bc.get("warp_k", DEFAULT_WARP_K),
                               max_batch_size=bc["max_batch_size"], max_input_len=bc["max_input_len"],
                               max_seq_len=bc["max_seq_len"], proposer=proposer)
    else:
        raise RedrafterError(f"{engine_dir / ENGINE_CONFIG}: unknown backend {cfg['backend']!r}")
    tok = load_tokenizer(engine_dir)
    eos = list(ckpt_cfg.base.eos_token_id)
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(int(tok.eos_token_id))
    gen = Generator(backend, tokenizer=tok, eos_token_ids=eos, random_drafter=ckpt_cfg.random_drafter)
    from .runtime.adaptive import stored_policy

    gen.policy, gen.policy_note = stored_policy(backend, engine_dir, adaptive)
    return gen
