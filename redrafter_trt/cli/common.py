"""Shared command-line plumbing: one error path, exit codes, dtype/flag helpers."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Callable, Iterator, Sequence

from .. import __version__
from ..errors import RedrafterError, Terminated

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
TERMINATING_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0 (every command has it)."""
    if "--version" not in parser._option_string_actions:
        parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                            help="print the package version and exit")


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into a :class:`~redrafter_trt.errors.Terminated` exception while the
    block runs, so temporary directories are cleaned up as on Ctrl-C (the default action of
    SIGTERM kills the process without running any cleanup). Outside the main thread, where
    Python cannot install handlers, nothing changes."""
    previous = {}
    try:
        for s in TERMINATING_SIGNALS:
            previous[s] = signal.signal(s, _raise_terminated)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_main(fn: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run ``fn``; a :class:`RedrafterError` prints ``error: ...`` and exits 2.

    Ctrl-C exits 130 and SIGTERM/SIGHUP exit 128 + the signal number, after the cleanup of any
    output being written (no temporary directory is left behind)."""
    add_version_flag(parser)
    args = parser.parse_args(argv)
    try:
        with terminate_like_interrupt():
            return int(fn(args) or 0)
    except RedrafterError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as e:
        print(f"{parser.prog}: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum


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
