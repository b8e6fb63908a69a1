"""What the steps after a search are doing and how long each took, on stderr.

Ensemble, export and report each run for seconds to minutes; a user watching a search
that has printed its leaderboard must see which step is running and how far it is. A
:class:`DeployProgress` prints one line when a step starts and one with its duration
when it ends, a live bar (rich) for steps that know their amount of work, and records
every step's seconds so a caller or a benchmark can print the timing table.

Without a terminal (a log file, CI, a pipe) rich writes plain text with no control
codes; there the bar is replaced by an ``n/total`` line at most every few seconds, so a
log shows progress without a line per unit of work. ``quiet=True`` prints nothing and
still records (library and test use).

A step makes its progress object the *active* one while it runs: code deeper down
(``export_bundle`` called by ``choice.export_choice``, which knows nothing of progress)
picks it up through :func:`resolve` without a parameter threaded through every layer.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

PLAIN_UPDATE_S = 5.0  # without a terminal: at most one "n/total" line per step this often

_ACTIVE: ContextVar["DeployProgress | None"] = ContextVar("automl_ad_deploy_progress", default=None)
_T = TypeVar("_T")


@dataclass(frozen=True)
class StepTiming:
    """One finished step: its description, wall seconds, nesting depth (0 = top level)."""

    name: str
    seconds: float
    depth: int
    failed: bool = False


class Step:
    """The running step, handed out by :meth:`DeployProgress.step`."""

    def __init__(self, owner: "DeployProgress", name: str, total: int | None, depth: int,
                 task: TaskID | None) -> None:
        self._owner, self.name, self.total, self.depth, self._task = owner, name, total, depth, task
        self.completed = 0
        self.started = time.perf_counter()
        self._last_line = self.started

    def advance(self, n: int = 1) -> None:
        """``n`` more units of this step's work are done."""
        self.completed += n
        self._owner._advanced(self, n)


class DeployProgress:
    """Step lines, live bars and step timings for ensemble, export and report."""

    def __init__(self, *, quiet: bool = False, file: TextIO | None = None,
                 plain_every_s: float = PLAIN_UPDATE_S) -> None:
        # file=None follows sys.stderr as it is at each write (pytest swaps it per test).
        self._console = None if quiet else Console(file=file, stderr=file is None, highlight=False,
                                                   soft_wrap=True, markup=False, emoji=False)
        self._plain_every_s = plain_every_s
        self._bars: Progress | None = None
        self._depth = 0
        self._started = 0
        self._done: list[tuple[int, StepTiming]] = []  # (start index, timing): recorded as steps end

    @property
    def timings(self) -> list[StepTiming]:
        """Finished steps in the order they started (a step before the steps inside it)."""
        return [timing for _, timing in sorted(self._done, key=lambda item: item[0])]

    @property
    def quiet(self) -> bool:
        return self._console is None

    @property
    def live(self) -> bool:
        """Whether bars are drawn (a terminal); otherwise plain lines only."""
        return self._console is not None and self._console.is_terminal

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Step]:
        """Run one step: a start line, a bar when ``total`` is given, its duration at the end
        (also when it fails, then the exception goes on)."""
        depth, index = self._depth, self._started
        self._started += 1
        self._print(f"{description} ...", depth)
        step = Step(self, description, total, depth, self._add_bar("  " * depth + description, total))
        self._depth += 1
        token = _ACTIVE.set(self)
        failed = True
        try:
            yield step
            failed = False
        finally:
            _ACTIVE.reset(token)
            self._depth -= 1
            seconds = time.perf_counter() - step.started
            self._remove_bar(step)
            self._done.append((index, StepTiming(description, seconds, depth, failed)))
            self._print(f"{description} {'failed after ' if failed else ''}{_seconds(seconds)}", depth)

    def seconds(self) -> dict[str, float]:
        """Seconds per step description (a description run twice adds up)."""
        totals: dict[str, float] = {}
        for timing in self.timings:
            totals[timing.name] = totals.get(timing.name, 0.0) + timing.seconds
        return totals

    def table(self) -> str:
        """The timing table as text, steps in the order they started, nested ones indented."""
        ordered = self.timings
        width = max([len("step")] + [2 * t.depth + len(t.name) for t in ordered])
        lines = [f"{'step':<{width}}  seconds"]
        for timing in ordered:
            label = "  " * timing.depth + timing.name
            lines.append(f"{label:<{width}}  {timing.seconds:7.1f}{'  (failed)' if timing.failed else ''}")
        return "\n".join(lines)

    # --- output -------------------------------------------------------------------------

    def _print(self, text: str, depth: int) -> None:
        if self._console is not None:
            self._console.print("  " * depth + text)  # above a live bar, when one is drawn

    def _add_bar(self, description: str, total: int | None) -> TaskID | None:
        if total is None or not self.live:
            return None
        if self._bars is None:
            # transient: a finished bar disappears, its duration line stays. stdout is left
            # alone: a caller's results there must not move to stderr while a bar is drawn.
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self._console, transient=True,
                                  redirect_stdout=False)
            self._bars.start()
        return self._bars.add_task(description, total=total)

    def _remove_bar(self, step: Step) -> None:
        if self._bars is None or step._task is None:
            return
        self._bars.remove_task(step._task)
        if not self._bars.tasks:
            self._bars.stop()
            self._bars = None

    def _advanced(self, step: Step, n: int) -> None:
        if self._bars is not None and step._task is not None:
            self._bars.update(step._task, advance=n)
            return
        now = time.perf_counter()
        unfinished = step.total is None or step.completed < step.total  # the end line says the rest
        if self._console is not None and unfinished and now - step._last_line >= self._plain_every_s:
            step._last_line = now
            of = f"/{step.total}" if step.total is not None else ""
            self._print(f"{step.name} {step.completed}{of}", step.depth)


def resolve(progress: DeployProgress | None) -> DeployProgress:
    """``progress`` itself, else the one whose step is running around this call, else a
    quiet one: library functions take ``progress=None`` and still report inside ``ship``."""
    if progress is not None:
        return progress
    return _ACTIVE.get() or DeployProgress(quiet=True)


def call_with_progress(function: Callable[..., _T], *args: Any, progress: DeployProgress, **kwargs: Any) -> _T:
    """``function(*args, progress=progress, **kwargs)`` when it takes a ``progress``
    keyword, else without it (it still sees ``progress`` through :func:`resolve` when
    called inside a step): works before and after a callee gains the parameter."""
    if "progress" in inspect.signature(function).parameters:
        kwargs["progress"] = progress
    return function(*args, **kwargs)


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
