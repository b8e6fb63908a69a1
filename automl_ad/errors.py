"""Errors that reach the user as one line, and the one place a full disk is recognised.

``UserError`` and its subclasses carry the exit code the CLI ends with (2 unless said
otherwise). ``writing(path, what)`` wraps every write the project makes, so running out
of disk space anywhere (store, checkpoints, cache, val sets, bundle, report, ledger,
lock) becomes ``OutOfSpace`` naming the file and what it holds instead of a library's
traceback; ``out_of_space`` recognises the same condition in errors raised elsewhere
(inside Ray trials, in Ray's or SQLite's own writes) for the CLI boundary.
"""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UserError(ValueError):
    """Bad input from the user (path, option, file, parameter range).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code`` (2).
    Raise it with a message that names the offending file, key or value.
    """

    exit_code = 2


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be used: truncated, not ours, or weights of other shapes.

    Callers that can fall back (an earlier checkpoint, a re-run, the next candidate)
    catch this one; elsewhere it is an ordinary one-line ``error:``.
    """


# errno values that mean "this volume takes no more bytes": a full disk, or a user quota.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries that do not raise OSError say the same: safetensors and pyarrow (Rust and
# C++ I/O errors quote the OS message), SQLite (optuna.db), Ray's wrapped trial errors.
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122",
                  "errno 28", "errno 122", "database or disk is full")


# OutOfSpace's message, to find it again in a traceback's text.
_OWN_MESSAGE = re.compile(r"out of disk space writing (?P<target>[^\n]+?) \((?P<reason>[^()\n]*)\)(?=;|$)", re.M)


class OutOfSpace(UserError):
    """A write failed because its volume is full (ENOSPC) or over quota (EDQUOT).

    Not bad input, so the CLI exits 1, not 2. The message names the file, what it holds
    and, once a caller knows it (``with_hint``), how to go on after freeing space.
    """

    exit_code = 1

    def __init__(self, path: Path | str | None, what: str, reason: str = "No space left on device",
                 hint: str = "") -> None:
        self.path = str(path) if path is not None else None
        self.what = what
        self.reason = reason
        self.hint = hint
        # "writing the report /x/r.html", or "writing /x/y" where only the file is known
        target = " ".join(part for part in (what, self.path) if part)
        text = f"out of disk space{' writing ' + target if target else ''} ({reason})"
        super().__init__(f"{text}; {hint}" if hint else text)

    def with_hint(self, hint: str) -> "OutOfSpace":
        """The same error, ending with what to do once space is freed."""
        return OutOfSpace(self.path, self.what, self.reason, hint)

    def __reduce__(self):
        # Raised inside Ray trials and pickled back to the driver: keep every field.
        return (OutOfSpace, (self.path, self.what, self.reason, self.hint))


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it: ``__cause__``/``__context__`` and the ``cause`` a
    Ray task error wraps, each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]


def _no_space_errno(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (or anything in its chain) is a write that found no space."""
    for current in _chain(error):
        if isinstance(current, OutOfSpace) or _no_space_errno(current):
            return True
        text = str(current).lower()
        if any(marker in text for marker in _NO_SPACE_TEXT):
            return True
    return False


def as_out_of_space(error: BaseException, path: Path | str | None = None,
                    what: str = "") -> OutOfSpace:
    """``error`` (for which ``out_of_space`` holds) as one OutOfSpace: the project's own
    one if the chain holds it (it names the file), else the first OSError's file name,
    else ``path``; the reason is the OS's short message."""
    chain = list(_chain(error))
    for current in chain:
        if isinstance(current, OutOfSpace):
            return OutOfSpace(current.path, current.what, current.reason, current.hint)
    for current in chain:
        # Our own error, known only as text (a trial's traceback as Tune keeps it): as is.
        found = _OWN_MESSAGE.search(str(current))
        if found:
            return OutOfSpace(None, found["target"], found["reason"])
    reason = "No space left on device"
    for current in chain:
        if _no_space_errno(current):
            reason = current.strerror or reason
            if getattr(current, "filename", None) and path is None:
                path = current.filename
            break
    else:
        for current in chain:
            line = next((line.strip() for line in str(current).splitlines()
                         if any(marker in line.lower() for marker in _NO_SPACE_TEXT)), None)
            if line:
                reason = " ".join(line.split())[:160]
                break
    return OutOfSpace(path, what, reason)


@contextmanager
def writing(path: Path | str, what: str) -> Iterator[None]:
    """Around a write of ``path``: running out of space inside becomes one OutOfSpace
    naming ``path`` and ``what`` (e.g. "the budget ledger"). The writer itself keeps the
    previous file (temporary name + ``os.replace``) and removes its temporary file."""
    try:
        yield
    except OutOfSpace:
        raise
    except Exception as error:
        if out_of_space(error):
            raise as_out_of_space(error, path, what) from None
        raise


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command. A KeyboardInterrupt, so no ``except
    Exception`` on the way swallows it; the CLI prints one ``error:`` line and exits
    128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells do."""

    def __init__(self, signum: int, message: str = "") -> None:
        import signal

        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        self.message = message or f"stopped by {self.name}"
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def explained(self, message: str) -> "Interrupted":
        """The same interruption, told in ``message`` (what was kept, how to resume)."""
        return Interrupted(self.signum, message)

    def __reduce__(self):
        return (Interrupted, (self.signum, self.message))


class DeadlineReached(Exception):
    """Work stopped part-way because its caller asked it to (a search's budget deadline
    passed during a memory bank's coreset search or a validation). Not a user error:
    the training loop turns it into an early stop with nothing reported."""

