"""One exception family; the CLI turns each into a one-line message and an exit code."""


class XselError(Exception):
    """An error xsel can explain to the user (exit code 1)."""

    exit_code = 1


class InputError(XselError):
    """Bad usage or bad input: a file, row, column or option the user must fix (exit code 2)."""

    exit_code = 2
