"""Safe tensor-file I/O and all-or-nothing output directories.

Checkpoints are read from safetensors, or from ``.bin``/``.pt`` state dicts through
``torch.load(weights_only=True)`` only: nothing arbitrary is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import RedrafterError, require


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one weights file into a dict of CPU tensors, with a clear error when it is bad."""
    path = Path(path)
    require(path.is_file(), f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise RedrafterError(f"{path}: cannot read safetensors file ({e}); it may be "
                                 "truncated or corrupt: re-download or re-convert it") from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the safe unpickler is a bad file
        raise RedrafterError(f"{path}: cannot read state dict with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {e})") from e
    require(isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()),
            f"{path}: expected a state dict of tensors")
    return sd


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    require(path.is_file(), f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RedrafterError(f"{path}: {what} is not valid JSON ({e})") from e
    require(isinstance(data, dict), f"{path}: {what} must be a JSON object")
    return data


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` only on success.

    A non-empty existing ``path`` is an error unless ``overwrite``; on any exception the
    temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists():
        require(path.is_dir(), f"{path}: exists and is not a directory")
        require(overwrite or not any(path.iterdir()),
                f"{path}: output directory is not empty; pass --overwrite or choose another")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
