"""Training checkpoints (``step-XXXXXXX.pt``) and exact resume: parameters, optimizer, schedule,
data position and RNG state, read back only with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import RedrafterError, require
from .config import TrainConfig
from .positions import PositionSampler
from .step import unwrap

CHECKPOINT_FORMAT = "redrafter-train-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(
    path: Path,
    drafter,
    opt,
    sampler: PositionSampler,
    step: int,
    total: int,
    cfg: TrainConfig,
    data_key: str,
    history: list,
    elapsed: float,
) -> Path:
    """Write ``step-XXXXXX.pt`` atomically (tmp file + rename)."""
    path.mkdir(parents=True, exist_ok=True)
    f = path / f"step-{step:07d}.pt"
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "total_steps": total,
        "drafter": unwrap(drafter).state_dict(),
        "drafter_config": unwrap(drafter).config.to_dict(),
        "optimizer": opt.state_dict(),
        "data": sampler.state(),
        "settings": json.dumps(cfg.schedule_fields(), sort_keys=True),
        "data_key": data_key,
        "rng": torch.get_rng_state(),
        "history": json.dumps(history),
        "elapsed_s": elapsed,
    }
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, f)
    return f


def latest_checkpoint(path: Path) -> Path | None:
    files = sorted(path.glob("step-*.pt")) if path.is_dir() else []
    return files[-1] if files else None


def load_checkpoint(f: Path) -> dict[str, Any]:
    require(f.is_file(), f"--resume {f}: checkpoint file not found")
    try:
        st = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RedrafterError(
            f"--resume {f}: cannot read the checkpoint ({type(e).__name__}: {e}); "
            "it may be truncated: resume from an earlier step-*.pt or start over"
        ) from e
    require(
        isinstance(st, dict) and st.get("format") == CHECKPOINT_FORMAT,
        f"--resume {f}: not a redrafter-train checkpoint",
    )
    require(
        st.get("version") == CHECKPOINT_VERSION,
        f"--resume {f}: checkpoint version {st.get('version')} != {CHECKPOINT_VERSION}",
    )
    return st


def find_resume(
    cfg: TrainConfig, ckpt_dir: Path, log: Callable[[str], None]
) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint file, its state) that ``--resume`` names (``auto``: the latest in
    ``ckpt_dir``), or (None, None); read before any expensive work, so a bad one fails fast."""
    resume_file, st = None, None
    if cfg.resume:
        resume_file = latest_checkpoint(ckpt_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if resume_file is None:
            log(f"[train] --resume auto: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            st = load_checkpoint(resume_file)
    return resume_file, st


def restore(
    st: dict[str, Any],
    resume_file: Path,
    cfg: TrainConfig,
    data_key: str,
    drafter,
    opt,
    sampler: PositionSampler,
    log: Callable[[str], None],
) -> tuple[int, int, list, float]:
    """Load a checkpoint's state into the head, optimizer, sampler and RNG, after checking it was
    made with the same settings and data; returns (step, total steps, history, elapsed seconds)."""
    require(
        st["settings"] == json.dumps(cfg.schedule_fields(), sort_keys=True),
        f"--resume {resume_file}: made with other training settings; resume with the same "
        f"flags (checkpoint: {st['settings']})",
    )
    require(
        st["data_key"] == data_key,
        f"--resume {resume_file}: made with other data (features {st['data_key']} != {data_key})",
    )
    try:
        drafter.load_state_dict(st["drafter"])
        opt.load_state_dict(st["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise RedrafterError(f"--resume {resume_file}: does not fit this head ({e})") from e
    sampler.load(st["data"])
    torch.set_rng_state(st["rng"])
    step, total = int(st["step"]), int(st["total_steps"])
    history = json.loads(st["history"])
    prior_elapsed = float(st.get("elapsed_s", 0.0))
    log(f"[train] resumed from {resume_file} at step {step}/{total}")
    return step, total, history, prior_elapsed
