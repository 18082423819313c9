"""storage/errors.error_line: any exception as one line."""
import errno

from mcad.storage.errors import InputError, error_line


def test_a_message_becomes_one_line():
    assert error_line(InputError("bad  input\n  on two lines")) == "bad input on two lines"


def test_an_os_error_names_its_file():
    assert error_line(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == \
        "No space left on device: /x/y"


def test_first_keeps_the_first_non_blank_line():
    exc = ValueError("\n  Parser Error: syntax error at  'x'\nLINE 1: SELECT x\n       ^")
    assert error_line(exc, first=True) == "Parser Error: syntax error at 'x'"


def test_an_empty_message_gives_the_type_name():
    assert error_line(ValueError()) == "ValueError"
    assert error_line(ValueError("  \n "), first=True) == "ValueError"
