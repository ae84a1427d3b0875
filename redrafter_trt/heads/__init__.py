"""Draft heads shipped with the toolkit, one per built-in base model.

``smollm2`` (SmolLM2-135M-Instruct) has a trained head in ``redrafter_trt/heads/smollm2/``: an
ordinary drafter directory (``config.json`` + ``model.safetensors`` + ``training_report.json``)
whose vocabulary projection is the base model's own and is therefore not stored a second time
(``config.json`` names it with ``lm_head_from_base``; loading fills it from the base). The
directory's ``SHA256SUMS`` lets a corrupt or missing file be named before anything loads it, with
the command that rebuilds the head.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import RedrafterError

HEADS_DIR = Path(__file__).resolve().parent
CHECKSUMS = "SHA256SUMS"

# base model name (as --model_dir takes it) -> (head directory, the command that rebuilds it)
BUILTIN_HEADS: dict[str, tuple[Path, str]] = {
    "smollm2": (HEADS_DIR / "smollm2", "bash build_scripts/train_smollm2_head.sh"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def builtin_head(model_name: str) -> Path | None:
    """The shipped head for the built-in base ``model_name`` (checked), or ``None`` if there is
    no built-in head for it. Raises :class:`RedrafterError` naming the file and the rebuild
    command when a shipped file is missing or does not match its checksum."""
    if model_name not in BUILTIN_HEADS:
        return None
    path, rebuild = BUILTIN_HEADS[model_name]
    check_head_files(path, rebuild)
    return path


def check_head_files(path: Path, rebuild: str) -> None:
    """Every file listed in ``path/SHA256SUMS`` exists and matches."""
    sums = path / CHECKSUMS
    if not sums.is_file():
        raise RedrafterError(
            f"{sums}: the shipped draft head is missing its checksum list; "
            f"rebuild the head with `{rebuild}` (or reinstall the package)"
        )
    for lineno, line in enumerate(sums.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise RedrafterError(f"{sums}:{lineno}: expected '<sha256> <file name>', got {line!r}")
        digest, name = parts
        f = path / name
        if not f.is_file():
            raise RedrafterError(
                f"{f}: missing from the shipped draft head; rebuild it with "
                f"`{rebuild}` (or reinstall the package)"
            )
        if _sha256(f) != digest:
            raise RedrafterError(
                f"{f}: corrupt (its SHA-256 does not match {sums}); rebuild the "
                f"head with `{rebuild}` (or reinstall the package)"
            )


def write_checksums(path: Path, names: list[str]) -> None:
    """Record the SHA-256 of ``names`` (files in ``path``) in ``path/SHA256SUMS``."""
    lines = [f"{_sha256(path / n)}  {n}" for n in sorted(names)]
    (path / CHECKSUMS).write_text("\n".join(lines) + "\n")
