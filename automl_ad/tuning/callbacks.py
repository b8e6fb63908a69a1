"""The search driver's Tune callbacks and stopper: the budget ledger, the deadline clock,
the live view and the store, in the order Tune calls them (``driver_callbacks``).

Module level so ``Tuner.restore`` can unpickle them by reference. A restored callback
is a copy of the pickled one, and ``Tuner.restore`` takes no new callbacks: what lives
only in the driver process (the live view) cannot be handed to it at construction. The
driver passes the view down the call instead: ``showing(view)`` around ``tuner.fit()``
sets a context variable that the live-view callback reads (Tune calls callbacks in the
thread that called ``fit``), so a new and a restored search see the same view and two
searches in two threads never see each other's.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ray.tune import Callback
from ray.tune.stopper import Stopper

from automl_ad.results.remote_storage import Storage
from automl_ad.tuning import interrupt
from automl_ad.tuning.budget import Ledger, start_clock
from automl_ad.tuning.finalize import checkpoint_location, finalize_trial, utc_now
from automl_ad.tuning.progress import SearchProgress
from automl_ad.tuning.trainable import TrialContext, TrialDevices

_LIVE_VIEW: ContextVar[SearchProgress | None] = ContextVar("automl_ad_search_live_view", default=None)


@contextmanager
def showing(view: SearchProgress) -> Iterator[None]:
    """Trial updates of the searches run inside this block go to ``view``."""
    token = _LIVE_VIEW.set(view)
    try:
        yield
    finally:
        _LIVE_VIEW.reset(token)


class BudgetStopper(Stopper):
    """Stops a running trial at its next report once a device/wall budget is spent."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.ledger.budget.kind != "trials" and self.ledger.exhausted()

    def stop_all(self) -> bool:
        return False


class _DriverCallback(Callback):
    """A driver-side callback whose ``_``-prefixed state lives in this process only: it is
    left out when Tune pickles the experiment and rebuilt by ``_reset`` on a restore."""

    def _reset(self) -> None:
        pass

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()


def _running(trials: Sequence[Any]) -> list[Any]:
    return [trial for trial in trials if trial.status == "RUNNING"]


class LedgerCallback(_DriverCallback):
    """Charges each trial's allocated devices x wall time to the ledger, only while this
    driver runs it: at its start, every report, every second while it runs, and its end."""

    def __init__(self, ledger: Ledger, devices_of: Callable[[Mapping[str, Any] | None], float]) -> None:
        self.ledger = ledger
        self.devices_of = devices_of
        self._reset()

    def _reset(self) -> None:
        self._started: dict[str, float] = {}
        self._base: dict[str, float] = {}
        self._last_tick = 0.0

    def _begin(self, tid: str) -> None:
        entry = self.ledger.trial(tid) or {}
        self._base[tid] = float(entry.get("wall_s", 0.0))
        self._started[tid] = time.monotonic()

    def _charge(self, trial: Any, finished: bool = False) -> None:
        tid = trial.trial_id
        if tid not in self._started:
            self._begin(tid)
        wall = self._base[tid] + time.monotonic() - self._started[tid]
        self.ledger.record(tid, self.devices_of(trial.config), wall, finished=finished)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._begin(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._charge(trial)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last_tick >= 1.0:
            self._last_tick = now
            self.ledger.tick()
            # Charge running trials as time passes, not only at their reports: Tune asks
            # the stopper before it calls on_trial_result, so the stopper must already
            # see the time spent up to this report.
            for trial in _running(trials):
                self._charge(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._charge(trial, finished=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._charge(trial, finished=True)


class DeadlineClockCallback(_DriverCallback):
    """Device and wall budgets: the BudgetClock actor that tells every trial when the
    budget runs out if the trials running now go on (``budget.DeadlineWatch`` reads it)."""

    def __init__(self, experiment_dir: Path, ledger: Ledger,
                 devices_of: Callable[[Mapping[str, Any] | None], float]) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.ledger = ledger
        self.devices_of = devices_of
        self._reset()

    def _reset(self) -> None:
        self._clock = None
        self._last_tick = 0.0

    def setup(self, **info):
        # Before any trial starts, so each trial's DeadlineWatch finds the clock.
        self._clock = start_clock(self.experiment_dir)
        self._publish([])

    def on_experiment_end(self, trials, **info):
        if self._clock is not None:  # one idle process per search otherwise (--category all)
            import ray

            ray.kill(self._clock)
            self._clock = None

    def _publish(self, running: Sequence[Any]) -> None:
        if self._clock is not None:
            self._clock.set.remote(self.ledger.projected_end(sum(self.devices_of(t.config) for t in running)))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._publish([t for t in trials if t.status == "RUNNING" or t is trial])

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last_tick >= 1.0:
            self._last_tick = now
            self._publish(_running(trials))


def _status(trial: Any, max_epochs: int) -> str:
    """How an ended trial ended: finished (all rounds) or stopped (ASHA, the budget)."""
    return "finished" if int((trial.last_result or {}).get("epoch", 0) or 0) >= max_epochs else "stopped"


class LiveViewCallback(_DriverCallback):
    """Feeds the driver's live table (``SearchProgress``) with every trial's state."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs

    def _update(self, trial: Any, status: str, result: Mapping[str, Any] | None) -> None:
        progress = _LIVE_VIEW.get()
        if progress is not None:
            progress.update(trial.trial_id, trial.config, status, result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "RUNNING", None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trial, _status(trial, self.max_epochs), dict(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "error", dict(trial.last_result or {}))


class StoreCallback(_DriverCallback):
    """Hands each ended trial to the store (``finalize_trial``), then pushes the experiment
    to its bucket. After LedgerCallback, which has charged the trial's last seconds."""

    def __init__(self, experiment_dir: Path, ledger: Ledger, context: TrialContext, device_kind: str,
                 fingerprints: dict[int, str], storage: Storage | None = None) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.storage = storage  # an object store the experiment folder mirrors, else None
        self.ledger = ledger
        self.context = context
        self.device_kind = device_kind
        self.fingerprints = fingerprints
        self._reset()

    def _reset(self) -> None:
        self._first_start: dict[str, dt.datetime] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._first_start.setdefault(trial.trial_id, utc_now())

    def _end(self, trial: Any, status: str) -> None:
        result = dict(trial.last_result or {})
        checkpoint = checkpoint_location(result.get("checkpoint_path"), trial.checkpoint, self.storage)
        wall = (self.ledger.trial(trial.trial_id) or {}).get("wall_s")
        finalize_trial(self.experiment_dir, self.context, self.context.category, trial.trial_id,
                       dict(trial.config), result, checkpoint, status, wall, self.ledger, self.device_kind,
                       self.fingerprints, started=self._first_start.get(trial.trial_id), storage=self.storage)
        if self.storage is not None:
            self.storage.push_quietly(self.context.experiment)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, _status(trial, self.context.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "error")


def driver_callbacks(folder: Path, ledger: Ledger, context: TrialContext, device_kind: str,
                     fingerprints: dict[int, str], storage: Storage | None) -> list[Callback]:
    """The search driver's callbacks, in the order Tune must call them: the ledger first
    (the store reads the time it charged), the clock (device and wall budgets only)."""
    devices = TrialDevices(context, device_kind)
    # A trial that found the disk full ends the search first, before the ledger and store write.
    callbacks: list[Callback] = [interrupt.StopOnFullDisk(folder), LedgerCallback(ledger, devices)]
    if ledger.budget.kind != "trials":
        callbacks.append(DeadlineClockCallback(folder, ledger, devices))
    return callbacks + [LiveViewCallback(context.max_epochs),
                        StoreCallback(folder, ledger, context, device_kind, fingerprints, storage)]
