"""Command-line plumbing of the commands that run a tensor-parallel engine (the conventions all
commands share are in :mod:`redrafter_trt.cmdline`)."""

from __future__ import annotations

import argparse
import os

from ..cmdline import positive_int


def add_tp_arguments(p: argparse.ArgumentParser) -> None:
    """``--tp_size N`` and ``--tp_timeout S`` on a command that runs an engine."""
    p.add_argument(
        "--tp_size",
        type=positive_int,
        default=None,
        help="tensor-parallel ranks (default: the engine's tp_size, from redrafter-convert "
        "--tp_size). A torch engine's ranks are started by this command (rank 0 is this "
        "process and does all I/O); under torchrun every rank runs the same command",
    )
    p.add_argument(
        "--tp_timeout",
        type=float,
        default=None,
        help="seconds a tensor-parallel collective waits for the other ranks before the run "
        "ends with a message naming the rank (default: 120)",
    )


def apply_tp_threads(args: argparse.Namespace) -> None:
    """With ``--tp_size N`` and no explicit ``--threads``, each rank takes its share of the
    automatic thread count (N ranks share the cores)."""
    import torch

    n = getattr(args, "tp_size", None) or 1
    if n > 1 and getattr(args, "threads", None) is None and "LOCAL_WORLD_SIZE" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // n))
