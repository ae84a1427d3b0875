"""The conventions every command shares: one error path and its exit codes, ``--version``, the
rejection of unknown flags, integer flag types, ``--threads`` and ``--adaptive``.

Used by the commands of ``cli/`` and by the modules that carry a command of their own
(``python -m redrafter_trt.bench.serving``, ``python -m redrafter_trt.heads.package``); it
imports only the foundation, so any layer may use it.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import difflib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from ._version import __version__
from .errors import RedrafterError, Terminated

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
TERMINATING_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0 (every command has it)."""
    if "--version" not in parser._option_string_actions:
        parser.add_argument(
            "--version",
            action="version",
            version=f"%(prog)s {__version__}",
            help="print the package version and exit",
        )


def _raise_terminated(signum, frame):
    raise Terminated(signum)


RERAISE_AFTER_S = 0.05


def _raise_swallowed_again(previous_hook):
    """An ``sys.unraisablehook`` that raises a swallowed :class:`Terminated` again.

    Python ignores an exception raised inside a weakref callback or a ``__del__`` (it prints
    "Exception ignored in ..." and goes on): a signal whose handler runs there, as one landing
    while an import releases its module lock does, would be lost and the command would run on to
    the end. This hook has another thread hand such a signal back to the main thread
    :data:`RERAISE_AFTER_S` later, when it has left the callback, and its handler raises it again
    (handed back at once, it would be raised in the callback and lost again); any other
    unraisable exception goes to the previous hook."""

    def hook(unraisable):
        if isinstance(unraisable.exc_value, Terminated):
            args = (unraisable.exc_value.signum,)
            later = threading.Timer(RERAISE_AFTER_S, _thread.interrupt_main, args=args)
            later.daemon = True
            later.start()
        else:
            previous_hook(unraisable)

    return hook


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into a :class:`~redrafter_trt.errors.Terminated` exception while the
    block runs, so temporary directories are cleaned up as on Ctrl-C (the default action of
    SIGTERM kills the process without running any cleanup); one that Python swallowed is raised
    again (:func:`_raise_swallowed_again`). Outside the main thread, where Python cannot install
    handlers, nothing changes."""
    previous = {}
    try:
        for s in TERMINATING_SIGNALS:
            previous[s] = signal.signal(s, _raise_terminated)
    except ValueError:  # not the main thread
        pass
    previous_hook = sys.unraisablehook
    if previous:
        sys.unraisablehook = _raise_swallowed_again(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


def run_main(
    fn: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run ``fn``; a :class:`RedrafterError` prints ``error: ...`` and exits 2.

    Ctrl-C exits 130 and SIGTERM/SIGHUP exit 128 + the signal number, after the cleanup of any
    output being written (no temporary directory is left behind)."""
    add_version_flag(parser)
    reject_unknown_flags(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "threads"):  # every command that runs a model has --threads
            args.threads_used, args.threads_reason = apply_threads(args.threads)
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


def _known_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _known_flags(sub)
    return flags


def reject_unknown_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Exit 2 naming a flag the command does not know (and the closest one it does), before
    argparse would report only the required arguments a mistyped flag leaves missing."""
    known = _known_flags(parser)
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name in known or (parser.allow_abbrev and sum(k.startswith(name) for k in known) == 1):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        parser.error(
            f"unrecognized argument {name}" + (f" (did you mean {close[0]}?)" if close else "")
        )


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


# ---------------------------------------------------------------------- CPU threads
#: Environment variable that overrides the automatic thread count (like ``--threads``).
THREADS_ENV = "REDRAFTER_THREADS"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None, local_ranks: int | None = None) -> tuple[int, str]:
    """The default torch / kernel CPU thread count: the cores this process may run on (its
    affinity mask), shared among ``local_ranks`` processes of one distributed job
    (``LOCAL_WORLD_SIZE``); at least 1. It does not depend on the moment's load, so the same
    command chooses the same way (and finds the same measured cost model) on the same machine;
    on a machine shared with other busy work, pass ``--threads``. Returns (threads, a one-line
    reason)."""
    cores = available_cores() if cores is None else cores
    if local_ranks is None:
        try:
            local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            local_ranks = 1
    n = max(1, cores // local_ranks)
    why = f"{cores} cores" + (f", {local_ranks} local ranks" if local_ranks > 1 else "")
    return n, why


def add_adaptive_argument(p: argparse.ArgumentParser, lead: str = "") -> None:
    """``--adaptive auto|on|off`` on a command that runs an engine."""
    p.add_argument(
        "--adaptive",
        choices=("auto", "on", "off"),
        default="auto",
        help=lead
        + "per step, draft the beams and depth (down to none, plain decoding) that a cost "
        "model of this machine and engine predicts pay at the current batch size. auto and on: "
        "the model kept in ENGINE_DIR/cost_model.json for this machine and thread count, or "
        "one measured at load (seconds) and kept there (the user cache for a read-only "
        "engine); auto falls back to the fixed shape where no model can be had (a TensorRT-LLM "
        "engine, no draft head), on refuses; off = always the engine's own shape "
        "(default: %(default)s)",
    )


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N`` on a command that runs a model."""
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads of the model kernels and torch (default: $REDRAFTER_THREADS or "
        "$OMP_NUM_THREADS, else every core this process may run on; the default does not depend "
        "on the machine's load: on a machine shared with busy work, set it)",
    )


def apply_threads(threads: int | None) -> tuple[int, str]:
    """Set torch's intra-op thread count: ``threads``, else ``$REDRAFTER_THREADS``, else
    :func:`default_threads`. Returns (threads, where the number came from)."""
    import torch

    if threads is not None:
        n, why = threads, "--threads"
    elif os.environ.get(THREADS_ENV):
        text = os.environ[THREADS_ENV]
        try:
            n = positive_int(text)
        except argparse.ArgumentTypeError as e:
            raise RedrafterError(f"${THREADS_ENV}={text!r}: {e}") from None
        why = f"${THREADS_ENV}"
    elif (
        os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1
    ):
        n, why = int(os.environ["OMP_NUM_THREADS"]), "$OMP_NUM_THREADS"
    else:
        n, why = default_threads()
        why = f"auto: {why}"
    torch.set_num_threads(n)
    return n, why
