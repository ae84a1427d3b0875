"""Package a trained head for shipping: drop the vocabulary projection it shares with its base.

``python -m redrafter_trt.heads.package --head DIR --model_dir smollm2 --output OUT`` reads a
head trained with ``--lm_head_init base --freeze_lm_head`` (whose final projection is the base's
``lm_head``, bit for bit), checks that it is, and writes OUT with everything but that projection;
``config.json`` gets ``lm_head_from_base`` (the SHA-256 of the base projection it needs), and a
``SHA256SUMS`` of the directory's files. Loading OUT through ``load_drafter`` with the base's
projection gives back the same head.

A head with a projection of its own (``--own_projection``: trained, for example over a draft
vocabulary) is written whole; ``--dtype float16`` halves its size (the loader widens the values
back to float32 exactly, so the packaged head is what is measured and shipped).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import require
from ..models.drafter import (
    DRAFT_VOCAB,
    DRAFTER_CONFIG,
    DRAFTER_WEIGHTS,
    LM_HEAD_FROM_BASE,
    load_drafter,
    projection_digest,
)
from ..models.io import atomic_output_dir, save_safetensors
from . import write_checksums

TRAINING_REPORT = "training_report.json"
EXTRA_FILES = (TRAINING_REPORT, "DATA.md")


def without_local_paths(value: Any) -> Any:
    """``value`` (a training report) with every absolute path cut to its last component: the
    trainer records where its output, start head, base model and feature caches lay on the
    machine that trained it, which says nothing to a user of the shipped head. Relative paths
    (the data files, named as in the repository) are kept."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and PurePosixPath(value).is_absolute():
        return PurePosixPath(value).name
    return value


def package_head(
    head_dir: Path,
    base_lm_head: torch.Tensor,
    output: Path,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    own_projection: bool = False,
) -> Path:
    """Write the shipped form of ``head_dir`` to ``output`` (atomically); ``own_projection``
    keeps the head's own vocabulary projection instead of requiring the base's."""
    head = load_drafter(head_dir, base_lm_head=base_lm_head)  # a head stored whole, or shared
    n = head.config.num_draft_layers
    proj_name = f"lm_head.{n}.weight"
    sd = head.state_dict()
    rows = base_lm_head if DRAFT_VOCAB not in sd else base_lm_head[sd[DRAFT_VOCAB].long()]
    shared = torch.equal(sd[proj_name].float(), rows.float())
    require(
        shared or own_projection,
        f"{head_dir}: the head's {proj_name} is not the base model's lm_head; only a head "
        "trained with --lm_head_init base --freeze_lm_head shares its projection (pass "
        "--own_projection to ship a head with a projection of its own, stored whole)",
    )
    raw = json.loads((head_dir / DRAFTER_CONFIG).read_text())
    raw.pop(LM_HEAD_FROM_BASE, None)
    if not own_projection:
        raw[LM_HEAD_FROM_BASE] = projection_digest(base_lm_head)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / DRAFTER_CONFIG).write_text(json.dumps(raw, indent=2) + "\n")
        save_safetensors(
            {
                k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
                for k, v in sd.items()
                if own_projection or k != proj_name
            },
            tmp / DRAFTER_WEIGHTS,
        )
        names = [DRAFTER_CONFIG, DRAFTER_WEIGHTS]
        for extra in EXTRA_FILES:
            if (head_dir / extra).is_file():
                if extra == TRAINING_REPORT:
                    report = json.loads((head_dir / extra).read_text())
                    (tmp / extra).write_text(
                        json.dumps(without_local_paths(report), indent=2) + "\n"
                    )
                else:
                    shutil.copyfile(head_dir / extra, tmp / extra)
                names.append(extra)
        write_checksums(tmp, names)
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m redrafter_trt.heads.package",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--head", required=True, type=Path, help="trained head directory (redrafter-train output)"
    )
    p.add_argument(
        "--model_dir",
        default="smollm2",
        help="its base model: a Hugging Face directory or 'smollm2'",
    )
    p.add_argument(
        "--output", required=True, type=Path, help="directory to write the shipped head to"
    )
    p.add_argument(
        "--own_projection",
        action="store_true",
        help="the head has a vocabulary projection of its own (not the base's lm_head): "
        "store it with the rest instead of refusing the head",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="storage dtype of the weights; the loader widens them to float32 (default: float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p


def main(argv=None) -> int:
    from ..cmdline import run_main
    from ..formats.hf import load_hf_base
    from ..formats.names import LM_HEAD
    from ..models.hub import resolve_base_model_dir

    def run(args) -> int:
        _, sd = load_hf_base(resolve_base_model_dir(args.model_dir))
        out = package_head(
            args.head,
            sd[LM_HEAD],
            args.output,
            args.overwrite,
            getattr(torch, args.dtype),
            args.own_projection,
        )
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"wrote {out} ({size / 1e6:.1f} MB)", file=sys.stderr)
        return 0

    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
