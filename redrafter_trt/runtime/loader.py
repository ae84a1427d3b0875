"""Opening an engine directory (``redrafter-build`` writes them, :mod:`.engine`):
:func:`load` reads ``config.json``, builds the backend it names and returns a
:class:`~redrafter_trt.runtime.Generator`. Public as :func:`redrafter_trt.load`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..contract import Backend
from ..errors import RedrafterError, require
from ..formats.checkpoint import (
    DTYPES,
    ENGINE_CONFIG,
    RedrafterCheckpointConfig,
    load_checkpoint_models,
    require_model_dir,
)
from ..memory import trim_heap
from ..models.io import read_json
from ..ops.beam_search import DEFAULT_WARP_K
from .generator import Generator


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
        require(
            torch.cuda.is_available(),
            f"{flag} {device}: this torch ({torch.__version__}) has no usable CUDA device "
            "(a CPU-only build, or no GPU/driver visible); use --device cpu",
        )
        n = torch.cuda.device_count()
        require(
            dev.index is None or dev.index < n,
            f"{flag} {device}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})",
        )
    return dev


def read_engine_config(engine_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an engine directory, with its ``backend``, ``pretrained_config``
    and ``build_config`` present."""
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
    except Exception as e:
        raise RedrafterError(f"{path}: cannot load the tokenizer files ({e})") from e


def _torch_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    require(dtype in DTYPES or dtype == "float64", f"dtype {dtype!r} not supported")
    return torch.float64 if dtype == "float64" else DTYPES[dtype]


def load(
    engine_dir: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    proposer=None,
    adaptive: str = "auto",
    log=None,
    tp_size: int | None = None,
    tp_timeout: float | None = None,
) -> Generator:
    """Open an engine directory and return a :class:`~redrafter_trt.runtime.Generator`.

    ``adaptive``: per-step beams and depth (down to plain decoding) from a cost model of this
    machine and engine (:func:`redrafter_trt.runtime.adaptive.stored_policy`): ``auto`` (the
    default) and ``on`` use the one stored for this machine and thread count, or measure one now
    (seconds) and store it; ``off`` keeps the engine's fixed shape. ``gen.policy_note`` says
    which applies; ``log`` gets the measurement's progress. With a plugged-in ``proposer``,
    ``auto`` keeps the fixed shape (the cost model times the draft head, not the proposer).

    ``tp_size``: the ranks to run a tensor-parallel engine on (None: the engine's own tp_size;
    another number is an error naming both). A torch engine with tp_size > 1 starts its ranks
    here (:mod:`redrafter_trt.runtime.tp`; under torchrun the ranks other than 0 follow rank 0
    inside this call and exit); ``gen.close()`` stops them. ``tp_timeout``: seconds a collective
    may wait for the other ranks."""
    engine_dir = require_model_dir(engine_dir, "--engine_dir", "engine")
    dev = resolve_device(device)
    cfg = read_engine_config(engine_dir)
    ckpt_cfg = RedrafterCheckpointConfig.from_dict(
        cfg["pretrained_config"], str(engine_dir / ENGINE_CONFIG)
    )
    bc = cfg["build_config"]
    if tp_size is not None:
        require(
            isinstance(tp_size, int) and tp_size >= 1, f"--tp_size must be >= 1, got {tp_size!r}"
        )
    tp = ckpt_cfg.tp_size if tp_size is None else tp_size
    if cfg["backend"] == "torch" and (tp > 1 or ckpt_cfg.tp_size > 1):
        from ..backends.tp import DEFAULT_TIMEOUT_S, check_rank_files, read_config_dict
        from .tp import start_torch_tp

        require(
            proposer is None,
            "proposer: a plugged-in proposer runs in one process; with tp_size > 1 every rank "
            "runs the draft head",
        )
        # every rank file checked before any rank starts
        check_rank_files(engine_dir, ckpt_cfg, tp, read_config_dict(engine_dir))
        require(
            adaptive != "on",
            "--adaptive on: adaptive speculation is not available with tp_size > 1 "
            "(its cost model times one process); use --adaptive off",
        )
        adaptive = "off"
        backend: Backend = start_torch_tp(
            engine_dir,
            ckpt_cfg,
            bc,
            dev,
            dtype=_torch_dtype(dtype),
            timeout_s=tp_timeout or DEFAULT_TIMEOUT_S,
            proposer=proposer,
        )
    elif cfg["backend"] == "trtllm" and (tp > 1 or ckpt_cfg.tp_size > 1):
        from ..backends.tp import DEFAULT_TIMEOUT_S
        from ..trtllm.builder import engine_file
        from ..trtllm.mpi import start_trtllm_tp  # lazy: needs TensorRT-LLM and mpi4py

        n = ckpt_cfg.tp_size
        require(
            tp == n,
            f"--tp_size {tp}: {engine_dir} was built for tp_size {n}; run it with --tp_size {n}",
        )
        missing = [engine_file(r) for r in range(n) if not (engine_dir / engine_file(r)).is_file()]
        require(not missing, f"{engine_dir}: missing {', '.join(missing)} (tp_size {n})")
        backend = start_trtllm_tp(
            engine_dir, ckpt_cfg, bc, timeout_s=tp_timeout or DEFAULT_TIMEOUT_S
        )
    elif cfg["backend"] == "trtllm":
        from ..trtllm import runtime as trt_runtime  # lazy: needs TensorRT-LLM

        backend = trt_runtime.TrtllmBackend(engine_dir, ckpt_cfg, bc)
    elif cfg["backend"] == "torch":
        from ..backends.torch_backend import TorchBackend

        torch_dtype = _torch_dtype(dtype)
        _, base, drafter = load_checkpoint_models(engine_dir, dtype=torch_dtype, config=ckpt_cfg)
        backend = TorchBackend(
            base.to(dev),
            drafter.to(dev),
            ckpt_cfg.num_beams,
            ckpt_cfg.draft_len,
            warp_k=bc.get("warp_k", DEFAULT_WARP_K),
            max_batch_size=bc["max_batch_size"],
            max_input_len=bc["max_input_len"],
            max_seq_len=bc["max_seq_len"],
            proposer=proposer,
        )
    else:
        raise RedrafterError(f"{engine_dir / ENGINE_CONFIG}: unknown backend {cfg['backend']!r}")
    tok = load_tokenizer(engine_dir)
    eos = list(ckpt_cfg.base.eos_token_id)
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(int(tok.eos_token_id))
    gen = Generator(
        backend, tokenizer=tok, eos_token_ids=eos, random_drafter=ckpt_cfg.random_drafter
    )
    from .adaptive import stored_policy

    if proposer is not None and adaptive == "auto":
        # the cost model times the draft head, not a plugged-in proposer: its fixed shape
        gen.policy, gen.policy_note = None, "adaptive speculation off: a plugged-in proposer"
    else:
        gen.policy, gen.policy_note = stored_policy(backend, engine_dir, adaptive, log=log)
    trim_heap()  # the load's freed temporaries: about 30 MB on SmolLM2, mostly the tokenizer's
    return gen


__all__ = ["load", "read_engine_config", "load_tokenizer", "resolve_device"]
