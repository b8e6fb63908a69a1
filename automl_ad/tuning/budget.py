"""Search budgets and the ledger that enforces them across restarts.

A budget is one of:
  * device time: ``50gpu-h``, ``90gpu-m``, ``4cpu-h``, ``30cpu-s`` -- devices allocated
    to a trial x that trial's wall seconds, summed over trials;
  * search wall time: ``20m``, ``2h``, ``90s`` -- seconds the search was running
    (time the search was down is never charged);
  * a trial count: ``30trials``.

The ledger is a JSON file under the experiment folder, rewritten atomically after each
change. A trial *reserves* its estimated cost before it starts; the reservation is
replaced by what it actually used as it runs, so the numbers survive a SIGKILL of the
driver and a ``--resume`` carries on from them.

The driver also projects when a device/wall budget will run out (``Ledger.projected_end``)
and publishes that wall-clock deadline through a small named Ray actor (``BudgetClock``);
trials read it (``DeadlineWatch``) and stop at their next optimizer step once it has
passed, instead of finishing an epoch on a spent budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from automl_ad.errors import UserError, writing
from automl_ad.experiment import LEDGER_FILE

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DEVICE = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)\s*(?P<device>gpu|cpu)-(?P<unit>[smh])$")
_WALL = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>[smh])$")
_TRIALS = re.compile(r"^(?P<amount>\d+)\s*trials?$")


@dataclass(frozen=True)
class Budget:
    """kind: "device" (device-seconds), "wall" (search seconds) or "trials" (count).

    device: "gpu" or "cpu" for device budgets, None otherwise.
    amount: device-seconds, seconds, or a number of trials.
    """

    kind: str
    amount: float
    device: str | None = None
    text: str = ""

    def describe(self, used: float) -> str:
        """``used / total`` in the budget's own unit, for tables and logs."""
        if self.kind == "trials":
            return f"{int(used)}/{int(self.amount)} trials"
        unit = f"{self.device}-h" if self.kind == "device" else "min"
        scale = 3600.0 if self.kind == "device" else 60.0
        return f"{used / scale:.3g}/{self.amount / scale:.3g} {unit}"


def parse_budget(text: str) -> Budget:
    """Parse ``50gpu-h``, ``90gpu-m``, ``4cpu-h``, ``20m``, ``2h``, ``30trials``."""
    cleaned = str(text).strip().lower()
    if match := _DEVICE.match(cleaned):
        seconds = float(match["amount"]) * _UNIT_SECONDS[match["unit"]]
        kind, device = "device", match["device"]
    elif match := _WALL.match(cleaned):
        seconds = float(match["amount"]) * _UNIT_SECONDS[match["unit"]]
        kind, device = "wall", None
    elif match := _TRIALS.match(cleaned):
        seconds = float(match["amount"])
        kind, device = "trials", None
    else:
        raise UserError(
            f"--budget {text!r} not understood; use e.g. 50gpu-h, 90gpu-m, 4cpu-h, 20m, 2h or 30trials"
        )
    if seconds <= 0:
        raise UserError(f"--budget {text!r} must be greater than zero")
    return Budget(kind=kind, amount=seconds, device=device, text=cleaned)


_SHARED: dict[str, "Ledger"] = {}


def shared_ledger(folder: str | Path, budget: Budget) -> "Ledger":
    """The process's one Ledger for ``folder`` (created on first use)."""
    key = str(Path(folder).resolve())
    ledger = _SHARED.get(key)
    if ledger is None or ledger.budget != budget:
        ledger = _SHARED[key] = Ledger(Path(folder), budget)
    return ledger


class Ledger:
    """Budget accounting persisted as JSON (``<experiment>/budget.json``).

    Each trial entry holds ``reserved`` (its estimate, counted until it reports usage),
    ``used`` (device-seconds, seconds or 1 trial), ``devices``, ``wall_s`` and ``state``
    (running/finished). ``search_s`` accumulates the search's own running time, read
    from ``clock`` (monotonic seconds; a test passes a fake one instead of sleeping).
    Thread-safe: Tune callbacks and the searcher may call it from the driver's threads.
    """

    FILE = LEDGER_FILE

    def __init__(self, folder: Path, budget: Budget, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(folder) / self.FILE
        self.budget = budget
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"budget": budget.text, "search_s": 0.0, "trials": {}}
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("budget") not in (None, budget.text):
                raise UserError(
                    f"--budget {budget.text} differs from {stored['budget']} recorded in {self.path}; "
                    "resume with the same budget"
                )
            self._state.update(stored)
        # A trial that was running when the driver died is charged what it had used
        # then; its reservation no longer holds anything back until it restarts.
        for entry in self._state["trials"].values():
            if entry.get("state") == "running":
                entry["reserved"] = 0.0
        self._session_mark: float | None = None

    # --- state ----------------------------------------------------------------------
    def __reduce__(self):
        # Pickled by path: Tune pickles the searcher, stopper and callbacks that hold a
        # ledger, and every unpickled copy in one process must be the same object, or
        # two copies would overwrite each other's file.
        return (shared_ledger, (str(self.path.parent), self.budget))

    def _save(self) -> None:
        with writing(self.path, "the budget ledger"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.FILE}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(self._state, handle, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                # A full disk must not leave a temporary file per save (one a second).
                Path(tmp).unlink(missing_ok=True)
                raise

    # --- search wall clock -----------------------------------------------------------
    def start_session(self) -> None:
        """Begin charging search wall time (call when the search starts or resumes)."""
        with self._lock:
            self._session_mark = self._clock()

    def tick(self) -> None:
        """Add the search time since the last tick; only running sessions are charged."""
        with self._lock:
            if self._session_mark is None:
                return
            now = self._clock()
            self._state["search_s"] = float(self._state["search_s"]) + (now - self._session_mark)
            self._session_mark = now
            self._save()

    def end_session(self) -> None:
        self.tick()
        with self._lock:
            self._session_mark = None

    # --- trials -----------------------------------------------------------------------
    def trial_cost(self, devices: float, wall_s: float) -> float:
        """What a trial of ``devices`` running ``wall_s`` seconds costs in budget units."""
        if self.budget.kind == "device":
            return devices * wall_s
        if self.budget.kind == "wall":
            return wall_s
        return 1.0

    def used(self) -> float:
        """Budget consumed (finished and running trials, or search seconds)."""
        with self._lock:
            return self._used_locked()

    def _used_locked(self) -> float:
        if self.budget.kind == "wall":
            extra = self._clock() - self._session_mark if self._session_mark is not None else 0.0
            return float(self._state["search_s"]) + extra
        return sum(float(e["used"]) for e in self._state["trials"].values())

    def committed(self) -> float:
        """Used plus what running trials have reserved beyond their usage so far."""
        with self._lock:
            return self._committed_locked()

    def _committed_locked(self) -> float:
        held = sum(
            max(0.0, float(e["reserved"]) - float(e["used"]))
            for e in self._state["trials"].values()
            if e.get("state") == "running"
        )
        return self._used_locked() + held

    def remaining(self) -> float:
        return max(0.0, self.budget.amount - self.used())

    def projected_end(self, running_devices: float, now: float | None = None) -> float | None:
        """``time.time()`` at which the budget is spent if the trials running now keep
        running (they hold ``running_devices`` in all); None for trial-count budgets and
        for a device budget while nothing runs (nothing spends it then)."""
        now = time.time() if now is None else now
        if self.budget.kind == "trials":
            return None
        if self.budget.kind == "wall":
            return now + self.remaining()
        if running_devices <= 0:
            return None
        return now + self.remaining() / running_devices

    def exhausted(self) -> bool:
        return self.used() >= self.budget.amount

    def try_reserve(self, trial_id: str, estimate: float) -> bool:
        """Reserve ``estimate`` for a new trial if the budget can hold it."""
        with self._lock:
            if trial_id in self._state["trials"]:
                return True  # a resumed trial already holds its place
            if self._committed_locked() + estimate > self.budget.amount + 1e-9:
                return False
            self._state["trials"][trial_id] = {
                "reserved": float(estimate),
                "used": 0.0,
                "devices": 0.0,
                "wall_s": 0.0,
                "state": "running",
            }
            self._save()
            return True

    def record(self, trial_id: str, devices: float, wall_s: float, *, finished: bool = False) -> float:
        """Set a trial's usage to ``devices`` x ``wall_s`` (cumulative over sessions, so
        callers pass the wall seconds the trial has run in total). Returns the cost."""
        with self._lock:
            entry = self._state["trials"].setdefault(
                trial_id, {"reserved": 0.0, "used": 0.0, "devices": 0.0, "wall_s": 0.0, "state": "running"}
            )
            entry["devices"] = float(devices)
            entry["wall_s"] = float(wall_s)
            entry["used"] = self.trial_cost(devices, wall_s) if self.budget.kind != "trials" else 1.0
            if finished:
                entry["state"] = "finished"
                entry["reserved"] = entry["used"]
            self._save()
            return float(entry["used"])

    def mark_lost(self, trial_ids: set[str]) -> None:
        """Trials the driver reserved but Tune never saved before a crash: they will not
        run again. Device/wall time they used stays charged (it was spent); they stop
        counting as trials and hold no reservation."""
        with self._lock:
            for trial_id in trial_ids:
                entry = self._state["trials"].get(trial_id)
                if entry is None or entry.get("state") == "finished":
                    continue
                entry["state"], entry["reserved"] = "lost", 0.0
                if self.budget.kind == "trials":
                    entry["used"] = 0.0
            self._save()

    def trial(self, trial_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._state["trials"].get(trial_id)
            return dict(entry) if entry else None

    def trials(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._state["trials"].items()}

    def running(self) -> int:
        with self._lock:
            return sum(1 for e in self._state["trials"].values() if e.get("state") == "running")


# --- the budget deadline, shared with running trials ---------------------------------

class BudgetClock:
    """The search's projected budget deadline (``time.time()`` seconds or None). Run as a
    named Ray actor (``start_clock``) so trials on any node can read it."""

    def __init__(self) -> None:
        self._deadline: float | None = None

    def set(self, deadline: float | None) -> None:
        self._deadline = deadline

    def get(self) -> float | None:
        return self._deadline


def clock_name(experiment_dir: str | Path) -> str:
    """The Ray actor name of an experiment's clock (one per experiment folder)."""
    digest = hashlib.sha1(str(Path(experiment_dir).resolve()).encode()).hexdigest()[:16]
    return f"automl_ad_budget_clock_{digest}"


def start_clock(experiment_dir: str | Path):
    """The experiment's ``BudgetClock`` actor, created on first use (needs Ray)."""
    import ray

    actor_class = ray.remote(num_cpus=0)(BudgetClock)
    return actor_class.options(name=clock_name(experiment_dir), get_if_exists=True).remote()


class DeadlineWatch:
    """Trial side: ``watch()`` is True once the search's budget deadline has passed.

    Asked after every optimizer step, so it compares against a cached deadline and asks
    the clock actor again at most every ``refresh_s`` seconds. Inactive (always False)
    when the experiment has no clock: trial-count budgets, or training outside a search.
    """

    def __init__(self, experiment_dir: str | Path, refresh_s: float = 0.5) -> None:
        import ray

        self.refresh_s = refresh_s
        self._clock = None
        self._deadline: float | None = None
        self._asked = -float("inf")
        if ray.is_initialized():
            try:
                self._clock = ray.get_actor(clock_name(experiment_dir))
            except ValueError:
                self._clock = None

    @property
    def active(self) -> bool:
        return self._clock is not None

    def deadline(self) -> float | None:
        now = time.monotonic()
        if self._clock is not None and now - self._asked >= self.refresh_s:
            import ray

            self._asked = now
            try:
                self._deadline = ray.get(self._clock.get.remote(), timeout=5.0)
            except Exception:  # a slow or lost clock must not fail the trial; keep the last value
                pass
        return self._deadline

    def __call__(self) -> bool:
        deadline = self.deadline()
        return deadline is not None and time.time() >= deadline
