"""Live view of a search (rich): running/finished trials, best so far, budget, ETA."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from automl_ad.tuning.budget import Ledger


# What the store callback reports when a trial ends (search.LiveViewCallback).
FINAL_STATES = frozenset({"finished", "stopped", "error"})


@dataclass
class TrialRow:
    trial_id: str
    method: str
    status: str = "PENDING"
    epoch: int = 0
    objective: float | None = None
    test_auroc: float | None = None


@dataclass
class SearchProgress:
    """Trial rows kept by the Tune callbacks; ``render`` draws them with rich."""

    ledger: Ledger
    max_epochs: int
    rows: dict[str, TrialRow] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    used_at_start: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Not a terminal (CI, a log file, `| tee`): the live table cannot redraw, so each
    # finished trial gets one plain line instead.
    plain_lines: bool = field(default_factory=lambda: not sys.stdout.isatty())

    def update(self, trial_id: str, config: dict[str, Any], status: str, result: dict[str, Any] | None) -> None:
        with self.lock:
            row = self.rows.setdefault(trial_id, TrialRow(trial_id, str(config.get("method", "?"))))
            finished_now = status != row.status and status in FINAL_STATES
            row.status = status
            if result:
                row.epoch = int(result.get("epoch", row.epoch) or row.epoch)
                if result.get("objective") is not None:
                    row.objective = float(result["objective"])
                if result.get("test_image_auroc") is not None:
                    row.test_auroc = float(result["test_image_auroc"])
        if finished_now and self.plain_lines:
            print(self.line(row), flush=True)

    def line(self, row: TrialRow) -> str:
        best = self.best()
        objective = "-" if row.objective is None else f"{row.objective:.4f}"
        parts = [
            f"[{_fmt_duration(time.monotonic() - self.started)}] trial {row.trial_id} {row.method} {row.status.lower()} "
            f"after {row.epoch}/{self.max_epochs} rounds, val {objective}"
        ]
        if best is not None:
            parts.append(f"best {best.objective:.4f} ({best.method})")
        parts.append(f"budget {self.ledger.budget.describe(self.ledger.used())}")
        return " | ".join(parts)

    def best(self) -> TrialRow | None:
        scored = [r for r in self.rows.values() if r.objective is not None]
        return max(scored, key=lambda r: r.objective) if scored else None

    def eta_s(self) -> float | None:
        """Seconds until the budget is spent at this session's burn rate."""
        budget = self.ledger.budget
        remaining = self.ledger.remaining()
        if budget.kind == "wall":
            return remaining
        elapsed = time.monotonic() - self.started
        burned = self.ledger.used() - self.used_at_start
        if burned <= 0 or elapsed <= 0:
            return None
        return remaining / (burned / elapsed)

    def render(self):
        from rich.table import Table

        with self.lock:
            rows = sorted(self.rows.values(), key=lambda r: r.trial_id)
            best = self.best()
        budget = self.ledger.budget
        eta = self.eta_s()
        title = (
            f"budget {budget.describe(self.ledger.used())}"
            f" | best {best.objective:.4f} ({best.method})" if best else f"budget {budget.describe(self.ledger.used())}"
        )
        table = Table(title=title, caption=f"ETA {_fmt_duration(eta)}" if eta is not None else "ETA -")
        for column in ("trial", "method", "status", "round", "val objective", "test AUROC"):
            table.add_column(column)
        for row in rows[-20:]:  # the live view shows the latest trials only
            table.add_row(
                row.trial_id,
                row.method,
                row.status,
                f"{row.epoch}/{self.max_epochs}",
                "-" if row.objective is None else f"{row.objective:.4f}",
                "-" if row.test_auroc is None else f"{row.test_auroc:.4f}",
            )
        return table


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
