"""Trial scratch folders: a trial killed by Tune leaves its folder; the next trial on the
node, or the search driver at the end, removes it (tuning/scratch.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from automl_ad.tuning import scratch


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_new_trial_folder_removes_the_folders_of_dead_trials_and_keeps_the_rest(tmp_path):
    host = scratch._host()
    dead = tmp_path / f"{scratch.PREFIX}{host}_{_dead_pid()}_abc"
    (dead / "checkpoint").mkdir(parents=True)
    (dead / "checkpoint" / "state.pt").write_bytes(b"x" * 1000)
    live = tmp_path / f"{scratch.PREFIX}{host}_{os.getppid()}_def"  # pytest's parent: alive
    other_host = tmp_path / f"{scratch.PREFIX}elsewhere_{_dead_pid()}_ghi"  # a shared /tmp
    unrelated = tmp_path / "automl_ad_trial_old-naming"
    for folder in (live, other_host, unrelated):
        folder.mkdir()

    mine = scratch.new_trial_folder(tmp_path)

    assert not dead.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert mine.exists() and mine.name.startswith(f"{scratch.PREFIX}{host}_{os.getpid()}_")
    assert scratch.owned_by_live_process(mine) and scratch.owned_by_live_process(live)
    assert not scratch.owned_by_live_process(unrelated)
    assert scratch.remove_orphans(tmp_path) == 0, "a second sweep finds nothing left to remove"
