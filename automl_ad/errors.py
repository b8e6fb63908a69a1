"""Errors that reach the user as one line and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (path, option, file, parameter range).

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    Raise it with a message that names the offending file, key or value.
    """


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be used: truncated, not ours, or weights of other shapes.

    Callers that can fall back (an earlier checkpoint, a re-run, the next candidate)
    catch this one; elsewhere it is an ordinary one-line ``error:``.
    """


class Interrupted(Exception):
    """Work stopped part-way because its caller asked it to (a search's budget deadline
    passed during a memory bank's coreset search or a validation). Not a user error:
    the training loop turns it into an early stop with nothing reported."""
