"""The one exception type for bad input.

Every package raises `InputError` when what the user handed in (a path, a
store, a flag) cannot be used. The CLI turns it into a one-line message and
exit code 2; anything else is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: the message is shown as is, on one line."""


def error_line(exc: BaseException) -> str:
    """An InputError or OSError as one line: its message, or strerror and the file it concerns."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
