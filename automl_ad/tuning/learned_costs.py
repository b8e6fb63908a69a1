"""What trials really cost on this machine against what their plan said, kept across
searches, so the next plan starts from what this machine does rather than from the
calibration's lab conditions.

A calibration times each method in one warm process on synthetic images. A trial in a
search also pays what no calibration sees: a fresh process (imports, weights read, the
first passes through every kernel), the Ray driver and live view on the same cores, and
the validation's real image count. On the 2-core VM that made a PatchCore trial at 256 px
cost about twice its plan (planned 30 s, measured 57-77 s) and a 10-minute search run 8
trials where it planned 11. Within a search ``BudgetedOptunaSearch._correction`` learns
that ratio from the trials that finished; this module keeps it for the next search, per
machine, device and method: ``factor`` is the sum of used over the sum of planned seconds
of the last ``KEEP`` finished trials, and the planner multiplies the method's costs by it.

The file (``learned_costs.json`` beside the calibration cache) is owned here; writes are
atomic (temporary file + rename), and a damaged or foreign file reads as empty. A ratio is
of used to *planned* seconds, so it holds only for the calibration that planned them: the
file names its ``CALIBRATION_VERSION``, and a file of another one reads as empty too (stop
34: CFA's step got 2.5x faster and its learnt 0.58, kept from the slower code, planned its
trials at a third of what they cost).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterable

from automl_ad.tuning.calibration import CALIBRATION_VERSION, cache_path

LEARNED_VERSION = 2  # 2: PatchCore's configurations costed by the refitted estimated_work
KEEP = 24  # the most recent finished trials a method's factor rests on
MIN_TRIALS = 2  # fewer than this and the plan keeps the calibrated cost
FACTOR_RANGE = (0.5, 4.0)  # a learnt factor outside this says more about a fault than a speed


LEARNED_ENV = "AUTOML_AD_LEARNED_COSTS"  # another file (the tests give each test its own)


def learned_path() -> Path:
    env = os.environ.get(LEARNED_ENV)
    return Path(env).expanduser() if env else cache_path().with_name("learned_costs.json")


def machine_key(device: str, threads: int, host: str | None = None) -> str:
    """The machine, device and thread count a factor holds for (as the calibration keys)."""
    from automl_ad.tuning.calibration import device_name

    return f"{host or socket.gethostname()}|{device_name(device)}|{int(threads)}t"


def _load(path: Path) -> dict[str, dict[str, list[list[float]]]]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (not isinstance(content, dict) or content.get("version") != LEARNED_VERSION
            or content.get("calibration_version") != CALIBRATION_VERSION):
        return {}
    machines = content.get("machines")
    return machines if isinstance(machines, dict) else {}


def cost_key(method: str, tiles: int = 1) -> str:
    """Where a method's ratios are kept: apart for a tiled geometry, whose trials miss
    their plan by another ratio (a memory bank of four times the inputs also slows each
    of its four times as many inferences; measured on KolektorSDD: 2.15x the calibrated
    PatchCore trial tiled, 1.77x untiled), which must not move the untiled plans."""
    return method if tiles <= 1 else f"{method}@{tiles}tiles"


def factors(machine: str, path: Path | None = None) -> dict[str, tuple[float, int]]:
    """``{method: (factor, trials it rests on)}`` for ``machine``; a method with fewer
    than ``MIN_TRIALS`` recorded trials is left out (its plan keeps the calibrated cost)."""
    out = {}
    for method, seen in _load(Path(path or learned_path())).get(machine, {}).items():
        usable = [(float(t[0]), float(t[1])) for t in seen if t[0] > 0 and t[1] > 0][-KEEP:]
        if len(usable) < MIN_TRIALS:
            continue
        ratio = sum(u for _, u in usable) / sum(p for p, _ in usable)
        out[method] = (min(FACTOR_RANGE[1], max(FACTOR_RANGE[0], ratio)), len(usable))
    return out


def record(machine: str, trials: Iterable[tuple[str, float, float, str]], path: Path | None = None) -> int:
    """Add ``(method, planned seconds before any learnt factor, used seconds, trial
    name)`` of finished trials to ``machine``'s history (a trial already there, as after a
    resume, is not counted twice); the number added."""
    path = Path(path or learned_path())
    machines = _load(path)
    history = machines.setdefault(machine, {})
    added = 0
    for method, planned, used, name in trials:
        seen = history.setdefault(str(method), [])
        if planned <= 0 or used <= 0 or any(len(t) > 2 and t[2] == name for t in seen):
            continue
        seen.append([round(float(planned), 3), round(float(used), 3), str(name)])
        history[str(method)] = seen[-KEEP:]
        added += 1
    if not added:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": LEARNED_VERSION, "calibration_version": CALIBRATION_VERSION,
                       "machines": machines}, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return added
