"""Errors that reach the user as one line and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (path, option, file, parameter range).

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    Raise it with a message that names the offending file, key or value.
    """
