"""Shared command-line plumbing: one error path, exit codes, dtype/flag helpers."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..errors import RedrafterError

EXIT_USAGE = 2


def run_main(fn: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run ``fn``; a :class:`RedrafterError` prints ``error: ...`` and exits 2."""
    args = parser.parse_args(argv)
    try:
        return int(fn(args) or 0)
    except RedrafterError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v
