"""Per-node scratch folders of running trials, and the removal of those whose trial died.

A trial writes its epoch checkpoints to a local folder before Tune copies them into the
experiment. Tune stops a trial (ASHA, the budget, the end of the search) by killing its
process, so the trial's own ``finally`` never runs and the folder (about 130 MB for a
256 px PatchCore bank) stays behind: 71 of them (1.8 GB) had piled up in this VM's /tmp
after a few days of searches and tests, and nothing bounded them. The folder
name carries the host and the process id of its trial, so any later trial on the node, and
the search driver when the search ends, can tell which folders no living trial owns.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

PREFIX = "automl_ad_trial_"


def _host() -> str:
    # A folder name must not hold a separator; host names rarely do, but be sure.
    return socket.gethostname().replace(os.sep, "-").replace("_", "-") or "host"


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to judge
    return True


def _owner_pid(folder: Path, host: str) -> int | None:
    """The process id in a scratch folder's name when that process ran on this host."""
    parts = folder.name[len(PREFIX):].split("_")
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
        return None  # another host's (a shared /tmp) or an older naming: left alone
    return int(parts[1])


def owned_by_live_process(folder: Path) -> bool:
    """Whether a scratch folder names this host and a process that is still running."""
    pid = _owner_pid(folder, _host())
    return pid is not None and (pid == os.getpid() or _owner_alive(pid))


def remove_orphans(root: Path | None = None) -> int:
    """Remove this host's scratch folders whose trial process has died; how many."""
    root = Path(root or tempfile.gettempdir())
    removed = 0
    for folder in root.glob(f"{PREFIX}*"):
        if _owner_pid(folder, _host()) is None or owned_by_live_process(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def new_trial_folder(root: Path | None = None) -> Path:
    """A fresh scratch folder owned by this process, after removing the orphans of dead trials."""
    root = Path(root or tempfile.gettempdir())
    remove_orphans(root)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{_host()}_{os.getpid()}_", dir=root))
