"""The one exception type for bad input.

Every package raises `InputError` when what the user handed in (a path, a
store, a flag) cannot be used. The CLI turns it into a one-line message and
exit code 2; anything else is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: the message is shown as is, on one line."""
