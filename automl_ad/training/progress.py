"""The rich progress bar of ``train`` (``fit(progress=True)``): loss, val objective and ETA."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from automl_ad.training.config import EpochReport, TrainConfig


class ProgressBar:
    """A rich progress bar: loss, val objective and ETA over all steps of the run."""

    def __init__(self, cfg: "TrainConfig", plan: list[str], steps_per_epoch: int, start_epoch: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[objective]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._progress.start()
        self._plan = plan
        self._task = self._progress.add_task(
            f"{cfg.method} epoch {start_epoch + 1}/{len(plan)} ({plan[min(start_epoch, len(plan) - 1)]})",
            total=len(plan) * steps_per_epoch,
            completed=start_epoch * steps_per_epoch,
            loss="-",
            objective="-",
        )
        self._method = cfg.method

    def advance(self, loss: float) -> None:
        self._progress.update(self._task, advance=1, loss=f"{loss:.4f}")

    def epoch_done(self, report: "EpochReport") -> None:
        nxt = min(report.epoch, len(self._plan) - 1)
        self._progress.update(
            self._task,
            objective=f"{report.objective:.4f}",
            description=f"{self._method} epoch {min(report.epoch + 1, len(self._plan))}/{len(self._plan)} ({self._plan[nxt]})",
        )

    def close(self) -> None:
        self._progress.stop()
