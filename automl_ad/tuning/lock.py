"""One search driver per experiment: ``<experiment>/.driver.lock``.

Two drivers on one experiment (a second ``search --resume``, or two jobs with the same
experiment name on shared storage) would both charge one budget ledger and both write
the trial store. The lock file is created with ``O_EXCL`` (atomic on local disks and
NFS v3+) and names its holder: host, pid, start time. While the search runs, a thread
touches it every ``HEARTBEAT_S`` seconds.

A lock is stale, and taken over, when its holder is gone: on the same host, when that
pid no longer runs; from another host, when the file has not been touched for
``STALE_AFTER_S`` seconds (a driver killed with SIGKILL leaves its lock behind, and
``--resume`` must still work).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automl_ad.errors import UserError, writing
from automl_ad.experiment import LOCK_FILE

# A dot file: never copied to an s3:// / gs:// store (a lock guards one filesystem,
# local or a shared mount), and a resumed copy elsewhere does not inherit it.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when it vanished or is unreadable (half-written)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_stale(path: Path, holder: dict[str, Any] | None) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if holder is None:
        return age > STALE_AFTER_S  # unreadable: wait out a writer that is just starting
    if holder.get("host") == socket.gethostname():
        return not _pid_alive(int(holder.get("pid", -1)))
    return age > STALE_AFTER_S


@dataclass
class DriverLock:
    """A held lock; :meth:`release` (or the context manager) removes it."""

    path: Path
    token: str
    _stop: threading.Event
    _thread: threading.Thread
    made: Path | None = None  # the highest folder acquire() created, removed again if left empty

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        holder = _holder(self.path)
        if holder is not None and holder.get("token") == self.token:  # never remove another's lock
            self.path.unlink(missing_ok=True)
        _remove_empty(self.path.parent, self.made)  # a search refused before its first file leaves nothing


def _remove_empty(folder: Path, top: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty."""
    if top is None:
        return
    current = folder
    while current.is_dir() and not any(current.iterdir()):
        current.rmdir()
        if current == top:
            return
        current = current.parent

    def __enter__(self) -> "DriverLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            return


def _create(path: Path, content: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError:
        with writing(path, "the driver lock"):
            raise
    try:
        with writing(path, "the driver lock"), os.fdopen(fd, "w") as stream:
            json.dump(content, stream)
    except BaseException:
        # An empty lock of a driver that never ran would read as "a writer just
        # starting" and hold off --resume for minutes: remove it.
        path.unlink(missing_ok=True)
        raise
    return True


def acquire(folder: Path, experiment: str) -> DriverLock:
    """Hold the experiment's driver lock, or UserError naming the driver that holds it."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    made = missing[-1] if missing else None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    content = {"host": socket.gethostname(), "pid": os.getpid(),
               "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "token": f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"}
    for _ in range(3):  # a stale lock is removed once; a racing driver may then win it
        try:
            created = _create(path, content)
        except BaseException:
            _remove_empty(folder, made)  # a full disk: leave no folder behind either
            raise
        if created:
            stop = threading.Event()
            thread = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
            thread.start()
            return DriverLock(path, content["token"], stop, thread, made)
        holder = _holder(path)
        if not _is_stale(path, holder):
            _remove_empty(folder, made)
            who = holder or {}
            raise UserError(
                f"experiment {experiment!r} is being searched by another driver (host {who.get('host', '?')}, "
                f"pid {who.get('pid', '?')}, since {who.get('started', '?')}); wait for it to end "
                f"(a killed driver's lock {path} is taken over once it is stale)")
        path.unlink(missing_ok=True)
    _remove_empty(folder, made)
    raise UserError(f"experiment {experiment!r}: could not take the driver lock {path}")
