"""Safe tensor-file I/O and all-or-nothing output directories.

Checkpoints are read from safetensors, or from ``.bin``/``.pt`` state dicts through
``torch.load(weights_only=True)`` only: nothing arbitrary is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

import torch

from ..errors import RedrafterError, require


def load_state_dict_file(
    path: str | os.PathLike, skip: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """Read one weights file into a dict of CPU tensors, with a clear error when it is bad.

    ``skip``: names not to read (a safetensors file reads only the others' bytes; tensors whose
    values come from elsewhere, such as GGUF block weights, then cost neither time nor memory)."""
    path = Path(path)
    require(path.is_file(), f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k not in skip}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise RedrafterError(
                f"{path}: cannot read safetensors file ({e}); it may be "
                "truncated or corrupt: re-download or re-convert it"
            ) from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RedrafterError(
            f"{path}: cannot read state dict with torch.load(weights_only=True) "
            f"({type(e).__name__}: {e})"
        ) from e
    require(
        isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()),
        f"{path}: expected a state dict of tensors",
    )
    return {k: v for k, v in sd.items() if k not in skip}


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a safetensors file, from its header (no tensor read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    require(path.is_file(), f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RedrafterError(
            f"{path}: cannot read safetensors file ({e}); it may be truncated or corrupt: "
            "re-download or re-convert it"
        ) from e


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    if metadata:
        _sort_metadata(Path(path))


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted: the library writes
    them in a per-process random order, so the same tensors and metadata would give different
    bytes from run to run. The header keeps its length (the same keys and values, reordered), so
    nothing after it moves."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        out = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(out) > n:  # not the library's layout: leave the file as it was written
            return
        f.seek(8)
        f.write(out + b" " * (n - len(out)))


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    require(path.is_file(), f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RedrafterError(f"{path}: {what} is not valid JSON ({e})") from e
    require(isinstance(data, dict), f"{path}: {what} must be a JSON object")
    return data


TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def _own_temp_re(name: str) -> re.Pattern:
    """``.NAME.tmp-PID-XXXX`` and ``.NAME.old-PID``: the names :func:`atomic_output_dir` uses."""
    n = re.escape(name)
    return re.compile(rf"^\.{n}(?:\.tmp-(\d+)-[A-Za-z0-9_]+|\.old-(\d+))$")


def remove_stale_temp_dirs(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories an interrupted earlier writer of ``path`` left beside it
    (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) whose process ``PID`` is gone; returns them.

    Only names of this exact form are touched, and a directory whose writer is still running is
    left alone, so two writers of the same output never delete each other's work."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pat = _own_temp_re(path.name)
    removed = []
    for entry in parent.iterdir():
        m = pat.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def apply_umask_modes(root: str | os.PathLike) -> None:
    """Give ``root``, its directories and files the modes a plain ``mkdir``/``open`` would:
    ``0o777 & ~umask`` and ``0o666 & ~umask`` (``tempfile.mkdtemp`` and safetensors write
    owner-only ``0o700``/``0o600``). Executable files keep their execute bits under the umask."""
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    for d, _dirs, files in os.walk(root):
        os.chmod(d, dir_mode)
        for f in files:
            fp = os.path.join(d, f)
            if os.path.islink(fp):
                continue
            try:
                executable = os.stat(fp).st_mode & 0o100
                os.chmod(fp, dir_mode if executable else file_mode)
            except PermissionError:  # a hard link to another user's file: leave its mode
                pass


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` only on success.

    A non-empty existing ``path`` is an error unless ``overwrite``; on any exception (and on
    SIGTERM under the command-line entry points, which turn it into an exception) the temporary
    directory is removed and ``path`` is left as it was. The temporary directory is named
    ``.NAME.tmp-PID-XXXX``; one left by a process that is gone (SIGKILL, power loss) is removed
    by the next writer of ``path``. The result has the umask's modes (``0o777 & ~umask`` for
    directories, ``0o666 & ~umask`` for files), like a directory made with ``mkdir``.
    """
    path = Path(path)
    if path.exists():
        require(path.is_dir(), f"{path}: exists and is not a directory")
        require(
            overwrite or not any(path.iterdir()),
            f"{path}: output directory is not empty; pass --overwrite or choose another",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        apply_umask_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
