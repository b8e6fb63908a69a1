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
of the last ``KEEP`` finished trials, and the planner multiplies the method's costs by it
(or, with enough trials of different sizes, a fitted start-up + factor: below).

The file (``learned_costs.json`` beside the calibration cache) is owned here; writes are
atomic (temporary file + rename), and a damaged or foreign file reads as empty. A ratio is
of used to *planned* seconds, so it holds only for the calibration that planned them: the
file names its ``CALIBRATION_VERSION``, and a file of another one reads as empty too (stop
34: CFA's step got 2.5x faster and its learnt 0.58, kept from the slower code, planned its
trials at a third of what they cost).

Two things one ratio per method could not hold (stop 38, measured on stop 37's ten
searches). (1) A start-up that does not scale: PatchCore trials at 128 px cost 0.3-0.5 of
their plan while those at 256 px cost 0.9-1.1, because the ratio also multiplied a
start-up of 6 s that a trial in a warm Ray worker does not pay. Each kept trial also
carries the start-up its plan counted, and with enough trials of different sizes the
method's cost is fitted as ``start-up + factor x work`` (least squares; PatchCore on the
2-core VM: 2.6 s + 1.88x after stop 37's searches). (2) Which configurations a search draws: the plan counts a
drawn trial at the mean over random draws of the space, but TPE samples where the good
trials were, nearer the defaults: PatchCore's drawn trials cost 0.5x that mean. The
realized cost factor of every drawn (not warm-start) trial against the factor its plan
counted for it (the space's mean less the draws the pace passes over, before any learnt
ratio) is kept too, and ``draw_ratios`` scales the next TPE plan's drawn trials by it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from automl_ad.tuning.calibration import CALIBRATION_VERSION, cache_path

LEARNED_VERSION = 3  # 3: each trial keeps its planned start-up; drawn trials' cost factors
# a version 2 file's trials mean the same (without their start-up: one ratio, until they
# are out of the last KEEP); its draws section did not exist
READABLE_VERSIONS = (2, 3)
KEEP = 24  # the most recent finished trials a method's factor rests on
MIN_TRIALS = 2  # fewer than this and the plan keeps the calibrated cost
MIN_FIT = 4  # trials a start-up + factor fit needs (else one ratio)
FIT_SPREAD = 2.0  # ... and their largest work at least this times their smallest
FACTOR_RANGE = (0.5, 4.0)  # a learnt factor outside this says more about a fault than a speed
MIN_DRAWS = 4  # drawn trials a draw ratio needs
DRAW_RANGE = (0.25, 2.0)


@dataclass(frozen=True)
class LearnedCost:
    """What a method's trials cost on this machine against their calibrated plan: a
    trial costs ``start_up + factor x work`` (``work``: the calibrated seconds less the
    plan's start-up), or ``factor x`` all of it when ``start_up`` is None (too few trials,
    or all of one size, to tell the two apart)."""

    factor: float
    trials: int
    start_up: float | None = None
    # the start-up the trials' plans counted (a plan with another one, as with or
    # without a TorchTrainer, scales the learnt one by their ratio: planner.overhead_of)
    planned_start_up: float | None = None


LEARNED_ENV = "AUTOML_AD_LEARNED_COSTS"  # another file (the tests give each test its own)


def learned_path() -> Path:
    env = os.environ.get(LEARNED_ENV)
    return Path(env).expanduser() if env else cache_path().with_name("learned_costs.json")


def machine_key(device: str, threads: int, host: str | None = None) -> str:
    """The machine, device and thread count a factor holds for (as the calibration keys)."""
    from automl_ad.tuning.calibration import device_name

    return f"{host or socket.gethostname()}|{device_name(device)}|{int(threads)}t"


def _load(path: Path, section: str = "machines") -> dict[str, dict[str, list[list[Any]]]]:
    """``section`` of the file (``machines``: trial costs; ``draws``: drawn trials' cost
    factors), ``{machine: {method: [row, ...]}}``; empty when damaged or foreign."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    versions = READABLE_VERSIONS if section == "machines" else (LEARNED_VERSION,)
    if (not isinstance(content, dict) or content.get("version") not in versions
            or content.get("calibration_version") != CALIBRATION_VERSION):
        return {}
    found = content.get(section)
    if not isinstance(found, dict):
        return {}
    # a damaged part (hand-edited, another tool's) is left out, the rest kept
    return {machine: {method: [row for row in rows if isinstance(row, list)]
                      for method, rows in methods.items() if isinstance(rows, list)}
            for machine, methods in found.items() if isinstance(methods, dict)}


def cost_key(method: str, tiles: int = 1) -> str:
    """Where a method's ratios are kept: apart for a tiled geometry, whose trials miss
    their plan by another ratio (a memory bank of four times the inputs also slows each
    of its four times as many inferences; measured on KolektorSDD: 2.15x the calibrated
    PatchCore trial tiled, 1.77x untiled), which must not move the untiled plans."""
    return method if tiles <= 1 else f"{method}@{tiles}tiles"


def factors(machine: str, path: Path | None = None) -> dict[str, LearnedCost]:
    """``{method: LearnedCost}`` for ``machine``; a method with fewer than ``MIN_TRIALS``
    recorded trials is left out (its plan keeps the calibrated cost)."""
    out = {}
    for method, seen in _load(Path(path or learned_path())).get(machine, {}).items():
        usable = [(t[0], t[1], t[3] if len(t) > 3 else 0.0) for t in _positive_rows(seen)]
        if len(usable) < MIN_TRIALS:
            continue
        out[method] = _fit(usable)
    return out


def _positive_rows(seen: list[list[Any]]) -> list[list[Any]]:
    """The last ``KEEP`` rows ``[a, b, name, *numbers]`` with ``a`` and ``b`` positive,
    numbers as floats; a damaged row (hand-edited, truncated) is passed over, not fatal."""
    out = []
    for row in seen:
        try:
            numbers = [float(v) for i, v in enumerate(row) if i != 2]
        except (TypeError, ValueError):
            continue
        if len(numbers) >= 2 and numbers[0] > 0 and numbers[1] > 0:
            out.append([numbers[0], numbers[1], row[2] if len(row) > 2 else "", *numbers[2:]])
    return out[-KEEP:]


def _fit(trials: Sequence[tuple[float, float, float]]) -> LearnedCost:
    """(planned, used, planned start-up) seconds of a method's trials -> its cost model."""
    low, high = FACTOR_RANGE
    ratio = sum(u for _, u, _ in trials) / sum(p for p, _, _ in trials)
    plain = LearnedCost(min(high, max(low, ratio)), len(trials))
    work = [p - s for p, _, s in trials]
    used = [u for _, u, _ in trials]
    start_ups = {round(s, 3) for *_, s in trials}
    if len(trials) < MIN_FIT or len(start_ups) > 1 or min(start_ups) <= 0 or min(work) <= 0 \
            or max(work) < FIT_SPREAD * min(work):
        return plain  # too few trials, trials planned with different start-ups, or work of one size
    mean_w, mean_u = sum(work) / len(work), sum(used) / len(used)
    slope = (sum((w - mean_w) * (u - mean_u) for w, u in zip(work, used))
             / sum((w - mean_w) ** 2 for w in work))
    start_up = mean_u - slope * mean_w
    if start_up < 0 or not low <= slope <= high:
        return plain  # a fit the trials do not support: one ratio, as with fewer trials
    if start_up > min(used):  # no trial costs less than its start-up: refit through the cap
        start_up = min(used)
        slope = min(high, max(low, sum((u - start_up) * w for w, u in zip(work, used)) / sum(w * w for w in work)))
    return LearnedCost(slope, len(trials), start_up, trials[0][2])


def draw_ratios(machine: str, path: Path | None = None) -> dict[str, tuple[float, int]]:
    """``{method: (realized / counted cost factor of its drawn trials, drawn trials)}``
    over the last ``KEEP`` drawn trials (at least ``MIN_DRAWS``), clamped to DRAW_RANGE."""
    out = {}
    for method, seen in _load(Path(path or learned_path()), "draws").get(machine, {}).items():
        usable = [(t[0], t[1]) for t in _positive_rows(seen)]
        if len(usable) < MIN_DRAWS:
            continue
        ratio = sum(r for r, _ in usable) / sum(p for _, p in usable)
        out[method] = (min(DRAW_RANGE[1], max(DRAW_RANGE[0], ratio)), len(usable))
    return out


def record(machine: str, trials: Iterable[tuple[str, float, float, str] | tuple[str, float, float, str, float]],
           path: Path | None = None,
           draws: Iterable[tuple[str, float, float, str]] = ()) -> int:
    """Add ``(method, planned seconds before any learnt factor, used seconds, trial
    name[, the start-up in those planned seconds])`` of finished trials to ``machine``'s
    history, and ``(method, realized cost factor, the factor the plan counted, trial
    name)`` of drawn trials (a trial already there, as after a resume, is not counted
    twice); the number of trials added."""
    path = Path(path or learned_path())
    machines, drawn = _load(path), _load(path, "draws")
    added = _append(machines.setdefault(machine, {}),
                    ((t[0], t[1], t[2], t[3], *([round(float(t[4]), 3)] if len(t) > 4 else [])) for t in trials))
    changed = added + _append(drawn.setdefault(machine, {}), draws)
    if not changed:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": LEARNED_VERSION, "calibration_version": CALIBRATION_VERSION,
                       "machines": machines, "draws": drawn}, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return added


def _append(history: dict[str, list[list[Any]]], rows: Iterable[tuple[Any, ...]]) -> int:
    """Add ``(method, a, b, name, *rest)`` rows not yet kept under their method (last KEEP)."""
    added = 0
    for method, first, second, name, *rest in rows:
        seen = history.setdefault(str(method), [])
        if first <= 0 or second <= 0 or any(len(t) > 2 and t[2] == name for t in seen):
            continue
        seen.append([round(float(first), 3), round(float(second), 3), str(name), *rest])
        history[str(method)] = seen[-KEEP:]
        added += 1
    return added
