"""The one error type for user mistakes.

The command line prints a :class:`UserError` as one line and exits 2; any other exception
is a bug in densekit and keeps its traceback (exit 1).
"""


class UserError(ValueError):
    """A mistake in what the user asked for or gave: bad flag, bad file, unknown name."""

    def __init__(self, message: str) -> None:
        # Messages often embed OS or decoder errors that span lines; the CLI promises one.
        super().__init__(" ".join(str(message).split()))
