"""The one exception type for bad input.

Every package raises `InputError` when what the user handed in (a path, a
store, a flag) cannot be used. The CLI turns it into a one-line message and
exit code 2; anything else is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: the message is shown as is, on one line."""


def error_line(exc: BaseException, *, first: bool = False) -> str:
    """An exception as one line: its message, or strerror and the file it concerns.

    first: keep only the message's first non-blank line, for messages whose
    later lines are context (DuckDB's query and caret, a Ray traceback).
    """
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc)
    if first:
        text = next((line for line in text.splitlines() if line.strip()), "")
    return " ".join(text.split()) or type(exc).__name__
