"""One exception type for every user-facing error.

Messages say what was expected, what was found, and which file or flag to change. The command
line entry points catch :class:`RedrafterError` and exit with status 2 and the message, never a
traceback.
"""


class RedrafterError(ValueError):
    """Bad input: a file, a flag or a value that the user can fix."""


def require(condition: object, message: str) -> None:
    """Raise :class:`RedrafterError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise RedrafterError(message)


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: raised from the signal handler the command-line entry points
    install, so that ``finally``/``except BaseException`` blocks clean up (temporary output
    directories are removed) exactly as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
