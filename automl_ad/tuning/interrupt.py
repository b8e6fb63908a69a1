"""How a running search stops early, cleanly: on SIGINT/SIGTERM, and on a full disk.

Signals. ``automl-ad search`` runs inside ``SignalGuard``. The first SIGINT or SIGTERM
while Ray Tune's loop runs asks Tune to stop the way Tune itself stops on Ctrl-C: the
loop ends, the experiment state is saved one last time, the trial actors are stopped,
and trials that were running stay unfinished in the saved state, so ``Tuner.restore``
(``search --resume``) runs them on. ``run_search`` then raises ``Interrupted`` (via
``raise_if_stopped``) instead of collecting a partial search, and the CLI prints the
``automl-ad search … --resume`` command and exits 128 + the signal number. A signal
outside Tune's loop (planning, val sets, export), or a second signal, raises
``Interrupted`` at once; every file the project writes is written through a temporary
name, so the store stays consistent either way (a kill -9 is survived the same way).
Ray Tune's own lines about the stop (its ``Tuner.restore(...)`` hint, a Python call a CLI
user cannot run) are filtered out while the guard is active.

Why not Tune's own SIGINT handler: Tune ends its loop quietly and ``Tuner.fit`` returns
as if the search were done, so the driver could not tell an interrupted search from a
finished one, and Tune does not handle SIGTERM at all (``ray.init`` installs a SIGTERM
handler that exits at once). The guard finds Tune's stop event in the frame of
``ray.tune.tune.run`` (Ray 2.60; the SIGINT test in ``tests/test_bad_input.py`` runs this
path end to end).

Full disk. ``StopOnFullDisk`` is a driver callback: a trial that failed because its
volume is full stops the whole search with one ``OutOfSpace`` line, instead of every
later trial failing the same way until the budget is spent.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from ray.tune import Callback

from automl_ad.errors import Interrupted, OutOfSpace, as_out_of_space, out_of_space

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Ray Tune's lines about a stop this module handles (its restore hint above all; the
# trials stopped before their first report have no metrics to fetch yet).
_TUNE_STOP_LINES = ("Resume experiment with", "Experiment has been interrupted", "Trials did not complete",
                    "Stop signal received", "Failed to fetch metrics")
_TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.analysis.experiment_analysis")

_active: "SignalGuard | None" = None  # the CLI's guard while a search command runs


class _QuietTuneStop(logging.Filter):
    """Drops Ray Tune's log lines about a stop the guard reports itself: the restore hint
    after a signal, and the traceback of a trial that found the disk full."""

    def __init__(self, guard: "SignalGuard") -> None:
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.guard.signum is not None and any(line in message for line in _TUNE_STOP_LINES):
            return False
        if record.exc_info and record.exc_info[1] is not None and out_of_space(record.exc_info[1]):
            return False
        return True


class SignalGuard:
    """SIGINT/SIGTERM handlers that stop a search cleanly (see the module's docstring).

    Use as a context manager around a whole ``search`` command; ``watch`` and
    ``raise_if_stopped`` (called by ``run_search``) do nothing without one.
    """

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.signum: int | None = None
        self.experiment: str | None = None
        self.folder: Path | None = None
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._previous: dict[int, Any] = {}
        self._environment: str | None = None
        self._filter = _QuietTuneStop(self)

    # --- the context ---------------------------------------------------------------
    def __enter__(self) -> "SignalGuard":
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        self._previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        self.install()
        # Tune would otherwise take SIGINT over inside its loop (and end it quietly).
        self._environment = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for name in _TUNE_LOGGERS:
            logging.getLogger(name).addFilter(self._filter)
        _active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        if not self._previous:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if self._environment is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._environment
        for name in _TUNE_LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)
        if _active is self:
            _active = None

    def install(self) -> None:
        """(Re)install the handlers: ``ray.init`` replaces the SIGTERM handler with its own."""
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._handle)

    # --- a signal -------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
            event = _tune_stop_event(frame)
            if event is not None:
                name = signal.Signals(signum).name
                self._log(f"notice: {name}: stopping the search; the running trials are ended and the experiment "
                          "is saved (send it again to stop at once)")
                event.set()
                return
        raise Interrupted(self.signum if self.signum is not None else signum)


def _tune_stop_event(frame: FrameType | None) -> threading.Event | None:
    """The stop event of the ``ray.tune.tune.run`` call this frame is inside, if any
    (Tune's loop checks it every step; its own SIGINT handler sets the same event)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "run" and code.co_filename.replace(os.sep, "/").endswith("ray/tune/tune.py"):
            event = frame.f_locals.get("experiment_interrupted_event")
            return event if isinstance(event, threading.Event) else None
        frame = frame.f_back
    return None


def active() -> SignalGuard | None:
    """The guard of the running search command, if any."""
    return _active


def watch(experiment: str, folder: Path) -> None:
    """``run_search``, once Ray is up: the experiment a resume command names, and the
    guard's handlers put back over the SIGTERM handler ``ray.init`` installed."""
    guard = _active
    if guard is not None:
        guard.experiment, guard.folder = experiment, Path(folder)
        guard.install()


def raise_if_stopped() -> None:
    """``run_search``, after the tuner returned: Interrupted when a signal ended it."""
    guard = _active
    if guard is not None and guard.signum is not None:
        raise Interrupted(guard.signum)


# --- a full disk in a trial ------------------------------------------------------------

def _trial_error(trial: Any) -> BaseException | None:
    """The exception a failed trial raised (pickled by Tune), else its text as an error."""
    for read in ("get_pickled_error", "get_error"):
        try:
            error = getattr(trial, read)()
        except Exception:  # noqa: BLE001 - an unreadable error file: try the next form
            continue
        if error is not None:
            return error
    return None


class StopOnFullDisk(Callback):
    """Stops the search at the first trial that failed for want of disk space (Tune would
    retry it and start the next trials, each failing the same way): ``OutOfSpace`` from
    here ends ``Tuner.fit`` and reaches the CLI as one line. Before the callbacks that
    write (ledger, store), so this trial's own message is the one reported."""

    def __init__(self, experiment_dir: Path) -> None:
        self.experiment_dir = Path(experiment_dir)

    def _check(self, trial: Any) -> None:
        error = _trial_error(trial)
        if error is not None and out_of_space(error):
            stop = as_out_of_space(error, self.experiment_dir, f"the files of trial {trial.trial_id}")
            raise stop from None

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trial)


__all__ = ["SignalGuard", "StopOnFullDisk", "active", "watch", "raise_if_stopped", "Interrupted", "OutOfSpace"]
