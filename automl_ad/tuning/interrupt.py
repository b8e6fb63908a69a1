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
volume is full (or a driver callback that could not store it) ends Tune's loop the same
way, and ``raise_if_stopped`` raises that ``OutOfSpace``: one line naming the file, instead
of every later trial failing the same way until the budget is spent. ``--resume`` goes
on once space is freed.
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
# Where Ray logs them, and its tracebacks of a full disk: ray._private.worker logs the
# "Unhandled error" of a trial whose result the stopped loop never collected, and
# experiment_state a failed copy of Tune's state (seen on a full tmpfs).
_TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.analysis.experiment_analysis",
                 "ray.tune.execution.experiment_state", "ray._private.worker")

_active: "SignalGuard | None" = None  # the CLI's guard while a search command runs
_full_disk: dict[str, OutOfSpace] = {}  # experiment folder -> the full disk that stopped its search


class _Quoted(Exception):
    """A log message, for ``out_of_space`` to read."""


class _QuietTuneStop(logging.Filter):
    """Drops Ray Tune's log lines about a stop the guard reports itself: the restore hint
    after a signal, and the traceback of a trial that found the disk full."""

    def __init__(self, guard: "SignalGuard") -> None:
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        folder = self.guard.folder
        stopping = self.guard.signum is not None or (folder is not None and _key(folder) in _full_disk)
        if stopping and any(line in message for line in _TUNE_STOP_LINES):
            return False
        if record.exc_info and record.exc_info[1] is not None and out_of_space(record.exc_info[1]):
            return False
        # A traceback quoted in the message (Ray's "Unhandled error"): the disk was full,
        # which the search reports itself in one line.
        return not out_of_space(_Quoted(message))


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
    _full_disk.pop(_key(folder), None)  # from an earlier search of it in this process
    guard = _active
    if guard is not None:
        guard.experiment, guard.folder = experiment, Path(folder)
        guard.install()


def raise_if_stopped(folder: Path) -> None:
    """``run_search``, after the tuner returned: OutOfSpace when a full disk ended the
    search of ``folder`` (``StopOnFullDisk``), Interrupted when a signal did."""
    full = _full_disk.pop(_key(folder), None)
    if full is not None:
        raise full
    guard = _active
    if guard is not None and guard.signum is not None:
        raise Interrupted(guard.signum)


def _key(folder: Path | str) -> str:
    return str(Path(folder).resolve())


# --- a full disk in a trial ------------------------------------------------------------

class TrialFailed(Exception):
    """A trial's error as Tune keeps it when it cannot pickle it: its traceback as text."""


def _trial_error(trial: Any) -> BaseException | None:
    """The error a failed trial raised: the exception Tune pickled, else its traceback
    text. Tune writes both beside the trial on the driver (``error.pkl``/``error.txt`` under
    ``trial.local_path``) before it calls the callbacks, and syncs them to the storage
    path only later, so the local files are read first."""
    from ray import cloudpickle

    readers: list[Callable[[], Any]] = [
        lambda: cloudpickle.loads(Path(trial.pickled_error_file).read_bytes()) if trial.pickled_error_file else None,
        lambda: Path(trial.error_file).read_text() if trial.error_file else None,
        trial.get_pickled_error,
        trial.get_error,
    ]
    for read in readers:
        try:
            error = read()
        except Exception:  # noqa: BLE001 - missing or unreadable: try the next form
            continue
        if isinstance(error, BaseException):
            return error
        if isinstance(error, str) and error.strip():
            return TrialFailed(error)
    return None


class StopOnFullDisk(Callback):
    """Stops the search at the first trial that failed for want of disk space (Tune would
    retry it and start the next trials, each failing the same way until the budget is
    spent). It ends Tune's loop the way a signal does (state saved, the trial left to
    resume), and ``raise_if_stopped`` then raises the trial's ``OutOfSpace``, which the
    CLI prints as one line. An exception raised here instead would reach the driver
    wrapped in Tune's ``TuneError`` with a traceback, or, from a trial Tune was stopping,
    not at all. Listed before the callbacks that write (ledger, store).

    A driver callback that fails to write (the store's) is turned by Tune into a failure
    of that trial, so it is caught here the same way."""

    def __init__(self, experiment_dir: Path) -> None:
        self.experiment_dir = Path(experiment_dir)

    def _check(self, trial: Any) -> None:
        error = _trial_error(trial)
        if error is None or not out_of_space(error):
            return
        full = as_out_of_space(error, self.experiment_dir, f"the files of trial {trial.trial_id}")
        event = _tune_stop_event(sys._getframe())
        if event is None:  # not inside Tune's loop (a direct call): nothing to end but this
            raise full
        _full_disk.setdefault(_key(self.experiment_dir), full)
        event.set()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trial)


__all__ = ["SignalGuard", "StopOnFullDisk", "active", "watch", "raise_if_stopped", "Interrupted", "OutOfSpace"]
