"""The search's schedule: each method's full-fidelity training length per image size, and
ASHA's rungs, decided from the budget, the device and each method's measured speed.

Every trial runs ``R`` validation rounds (ASHA's "epochs", ``fidelity.max_epochs`` in
common.yaml, default 4); a method at an image size trains ``steps_per_epoch = F / R``
optimizer steps per round, where ``F`` is its planned full-fidelity step count. ASHA's
rungs (rounds ``g, g*eta, ... , R``) are therefore the same fractions of every method's
own schedule. The rule (docs/search.md, "Schedule"):

0. Unless the user named the methods (``--methods``), a method with a gradient phase
   joins only if the budget trains it to at least ``MIN_SCHEDULE_TO_JOIN`` (10 %) of its
   paper schedule: the costliest ones leave one at a time until the rest reach it (or
   only methods without training are left). The plan prints who left and why.
1. Paper schedule ``P = paper epochs x fit images / (batch x data-parallel workers)``
   (each method's ``recipe``; a method without a gradient phase has ``P = 0``).
2. Trial cost at ``F`` steps: start-up + method build + ``setup`` on the fit images, plus
   per round ``F/R`` steps and one validation (val-good + frozen anomalies), plus the test
   set at the last round. Under ASHA a trial reaches rung ``k`` with probability
   ``eta^-k``, which gives the expected cost ``E(F)``. Speeds come from the calibration or
   the prior (``calibration.py``).
3. The budget buys ``T`` trial-seconds (device budget / devices per trial; wall budget x
   concurrent trials x 0.9; unbounded for a trial count). Each method should get
   ``n = max(ceil(min_trials / methods), eta^K)`` trials (``K`` promotions: about one of
   them reaches full fidelity), with configurations sampled uniformly over methods and
   sizes: ``sum over methods of mean over sizes of E <= T / n``.
4. Every method trains the same fraction ``phi`` of its paper schedule,
   ``F = clamp(phi x P, min_steps, max_steps)`` (a multiple of ``R``), with ``phi`` the
   largest value (at most 1) that keeps (3). ``phi = 1`` is the paper schedule.
5. Image sizes: each method starts with its smallest candidate; larger ones are added
   (those of methods without training first, then the one nearest the paper's size, then
   cheapest extra cost first). A size of a method without training joins whenever the
   plan stays feasible (the trained methods it leaves under ``MIN_SCHEDULE_TO_JOIN``
   leave by step 0); one of a method with a gradient phase joins while ``phi``
   (uncapped) stays at least 1 or at least ``KEEP_SCHEDULE`` of its value before sizes
   were added, and at least ``SIZE_MIN_SCHEDULE``. Other sizes are dropped (and printed
   with the reason).
6. Expected trials: the warm starts, then configurations drawn uniformly over methods and
   sizes, each at the mean cost of the space's draws (``sampled_costs.py``) less those the
   searcher passes over while it runs behind the plan (``PACE``), times what earlier TPE
   searches' drawn trials cost against that mean (``learned_costs.draw_ratios``).

``fidelity.steps_per_epoch`` in a space file overrides (1)-(4) with a fixed
``F = R x steps_per_epoch`` for every method, and ``fidelity.batch_size`` one batch size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from automl_ad.data.layout import discover_category
from automl_ad.methods.base import Recipe, get_method_class
from automl_ad.tuning.budget import Budget
from automl_ad.synthesis import val_families

# Below this share of its paper schedule a trained method is not worth a budget's trials
# (DRAEM at 0.4 % of its 700 epochs detects little): it is left out of the search.
MIN_SCHEDULE_TO_JOIN = 0.1
KEEP_SCHEDULE = 0.9  # a larger image size may cost at most 10 % of the common schedule
SIZE_MIN_SCHEDULE = 0.5  # ... and trainable methods get one only above half their paper schedule
WALL_EFFICIENCY = 0.9  # share of a wall budget that trials run (scheduling gaps, start-up)
# Start-up of one trial before training (process and actor start, torch import, data
# load), docs/search.md "Overhead": about 15 s with a Ray Train TorchTrainer, about 3 s as
# a reused Tune function actor; a GPU adds CUDA initialisation.
OVERHEAD_S = {("cpu", True): 15.0, ("cpu", False): 3.0, ("gpu", True): 20.0, ("gpu", False): 8.0}
# A method without a gradient phase runs in the Tune function itself even when the others
# get a TorchTrainer (trainable.runs_direct), in a fresh actor (no reuse beside Train
# trials): process start + torch import, measured on the 2-core VM (docs/search.md).
DIRECT_OVERHEAD_S = {"cpu": 6.0, "gpu": 11.0}
PHI_MAX = 1.0e6
# Pacing (docs/search.md "Pace"): while the search runs behind its plan, a sampled
# configuration expected to cost more than PACE x the pace (the budget left over the
# trials the plan still expects) is passed over for another draw, so a few heavy trials
# (PatchCore strides 4+8 at 256 px: 6x its default) cannot eat the trials the plan
# promised; one within PACE_MIN_FACTOR of its default's cost always runs.
PACE = 3.0
PACE_MIN_FACTOR = 1.5


DEFAULT_RECIPE = Recipe(100, 8, 256, "no recipe known: 100 epochs, batch 8, 256 px assumed")


def recipe_for(method: str) -> Recipe:
    """The method's recipe (its class's ``recipe``, written in its folder), else a
    default; a method without a gradient phase (``phases == ()``) has 0 epochs."""
    cls = get_method_class(method)
    recipe = cls.recipe or DEFAULT_RECIPE
    if not tuple(cls.phases) and recipe.epochs:
        recipe = Recipe(0, recipe.batch_size, recipe.image_size, recipe.note + " (no gradient phase)")
    return recipe


@dataclass(frozen=True)
class Fidelity:
    """Fidelity and overrides of the schedule (common.yaml ``fidelity``; the planner here
    decides the schedule within them).

    max_epochs: validation rounds per trial (ASHA's max_t; ``rounds`` in YAML too);
    steps_per_epoch / batch_size: overrides for every method (None: planned per method);
    min_steps / max_steps: bounds of a full-fidelity trial's optimizer steps;
    min_trials: trials the plan keeps room for however small the budget.
    """

    max_epochs: int = 4
    grace_period: int = 1
    reduction_factor: int = 2
    steps_per_epoch: int | None = None  # override: F = rounds x this for every method
    batch_size: int | None = None  # override: one batch size for every method
    min_steps: int = 8
    max_steps: int | None = None
    min_trials: int = 6


@dataclass(frozen=True)
class MethodInput:
    name: str
    trainable: bool
    recipe: Recipe
    sizes: tuple[int, ...]  # candidates
    backbones: tuple[str | None, ...] = (None,)  # searched backbones (None: no backbone field)
    val_images: int = 0  # images in one validation round
    # used / planned seconds of this method's trials in earlier searches on this machine
    # (learned_costs): multiplies every cost the calibration gives, the start-up too
    # unless ``learned_start_up`` (seconds, fitted apart, against a plan's start-up of
    # ``learned_start_up_planned``) replaces it; with one, ``learned`` is the fitted factor
    learned: float = 1.0
    learned_trials: int = 0
    learned_start_up: float | None = None
    learned_start_up_planned: float | None = None
    # ((size, costs of configurations sampled from the space / the default's), ...), one
    # number or a tuple of draws per size: what the expected trial count assumes a drawn
    # configuration costs
    sampled_cost: tuple[tuple[int, float | tuple[float, ...]], ...] = ()
    # what the searcher's drawn trials cost against that mean in earlier searches
    # (learned_costs.draw_ratios: TPE samples nearer the defaults than random draws)
    draw_ratio: float = 1.0

    def sampled_factor(self, size: int, limit: float | None = None) -> float:
        """Mean cost factor of a drawn configuration at ``size``; with ``limit``, of the
        draws the searcher runs when it paces (factor at most ``limit`` or within
        PACE_MIN_FACTOR), the cheapest draw when none is; times ``draw_ratio``."""
        draws = dict(self.sampled_cost).get(int(size))
        if draws is None:
            return 1.0
        values = tuple(draws) if isinstance(draws, (tuple, list)) else (float(draws),)
        kept = [f for f in values if limit is None or f <= max(limit, PACE_MIN_FACTOR)]
        return self.draw_ratio * (sum(kept) / len(kept) if kept else min(values))

    @property
    def measured_backbone(self) -> str | None:
        """The backbone a calibration times (the first choice, the Config's default when
        it is one); the others are taken to cost the same unless measured."""
        return self.backbones[0]


@dataclass(frozen=True)
class DataCounts:
    fit: int
    val_good: int
    test: int


def data_counts(data_root: Any, category: str, val_fraction: float = 0.2) -> DataCounts:
    """Image counts of a category from its layout (no decoding), split as the loader does."""
    from pathlib import Path

    layout = discover_category(Path(data_root), category)
    count = len(layout.train)
    n_val = 0 if count < 2 else min(count - 1, max(1, math.floor(count * val_fraction + 0.5)))
    return DataCounts(fit=max(1, count - n_val), val_good=n_val, test=len(layout.test))


def val_images(method_synthesis: str | None, val_good: int) -> int:
    """Images a trial validates on: val-good + the frozen anomalies of every val family
    but the one it trains with (``automl_ad.evaluation.validation``)."""
    shown = val_families()
    families = len(shown) - (1 if method_synthesis in shown else 0)
    return val_good * (1 + families)


def asha_rungs(rounds: int, grace: int, eta: int) -> list[int]:
    """Rounds at which ASHA decides (the last is ``rounds`` itself)."""
    out, rung = [], max(1, grace)
    while rung < rounds:
        out.append(rung)
        rung *= eta
    return out + [rounds]


# --- the plan ---------------------------------------------------------------------------

@dataclass
class Entry:
    """The schedule of one method at one image size."""

    method: str
    image_size: int
    batch_size: int
    steps: int  # full-fidelity optimizer steps (0: no gradient phase)
    steps_per_epoch: int
    paper_steps: int
    paper_epochs: float
    epochs: float  # paper-epoch equivalent of ``steps``
    rungs: list[int]  # steps at each ASHA rung
    # per backbone ("-": none): fixed (start-up + build + setup), round (training of
    # one round), val (one validation), test (the test set) seconds
    costs: dict[str, dict[str, float]]
    source: str
    trainable: bool = True
    expected_s: float = 0.0  # expected cost of a trial under ASHA
    full_s: float = 0.0  # cost of a full-fidelity trial
    first_rung_s: float = 0.0  # cost up to the first rung
    expected_trials: float = 0.0
    expected_full: float = 0.0
    overhead_s: float | None = None  # start-up in ``fixed`` (None: the plan's, in older plans)
    learned_factor: float = 1.0  # costs are the calibration's times this, but a learnt start-up (overhead_s)
    sampled_factor: float = 1.0  # mean cost of a sampled configuration / the default's
    draw_ratio: float = 1.0  # what sampled_factor was multiplied by (learned_costs.draw_ratios)
    start_up_s: float | None = None  # the start-up before anything learnt (None: older plans)

    @property
    def key(self) -> str:
        return schedule_key(self.method, self.image_size)

    def mean_costs(self) -> dict[str, float]:
        parts = list(self.costs.values())
        return {k: sum(p[k] for p in parts) / len(parts) for k in ("fixed", "round", "val", "test")}


def _scale_work(seconds: float, factor: float, overhead: float) -> float:
    """``seconds`` of a configuration ``factor`` times as costly as the default (the
    start-up ``overhead`` does not scale)."""
    return overhead + factor * max(0.0, seconds - overhead)


def sampled_seconds(entry: "Entry") -> float:
    """Expected seconds of a configuration drawn from the space at ``entry``."""
    return _scale_work(entry.expected_s, entry.sampled_factor, entry.overhead_s or 0.0)


def schedule_key(method: str, image_size: int) -> str:
    return f"{method}@{int(image_size)}"


def trial_cost(costs: Mapping[str, float], rounds_done: int, rounds: int, trainable: bool) -> float:
    """Seconds of a trial that ran ``rounds_done`` of ``rounds`` rounds. The test set is
    not part of it: the driver evaluates it after the search, outside the budget."""
    if not trainable:
        return costs["fixed"] + costs["val"]
    done = max(0, min(rounds_done, rounds))
    return costs["fixed"] + done * (costs["round"] + costs["val"])


def expected_cost(costs: Mapping[str, float], rungs: list[int], eta: int, trainable: bool) -> float:
    """Expected seconds of a trial under ASHA (rung k reached with probability eta^-k)."""
    if not trainable:
        return trial_cost(costs, rungs[-1], rungs[-1], False)
    total, previous = costs["fixed"], 0
    for k, rung in enumerate(rungs):
        total += eta ** -k * (rung - previous) * (costs["round"] + costs["val"])
        previous = rung
    return total


@dataclass
class Plan:
    """What a search runs; stored in ``search.json`` and reused on ``--resume``."""

    budget: str
    budget_kind: str
    device_kind: str
    device_label: str
    devices_per_trial: float
    concurrency: int
    trial_seconds: float | None  # what the budget buys (None: a trial count)
    rounds: int
    grace_period: int
    reduction_factor: int
    rung_rounds: list[int]
    trials_per_method: int
    phi: float  # fraction of the paper schedule every method gets (uncapped)
    fixed_steps: bool  # fidelity.steps_per_epoch override
    data: dict[str, int]
    entries: list[Entry]
    dropped: list[dict[str, Any]] = field(default_factory=list)
    expected_trials: float = 0.0
    expected_full: float = 0.0
    notes: list[str] = field(default_factory=list)
    overhead_s: float = 0.0  # start-up of a trial (included in every entry's fixed cost)
    # A configuration whose setup and one validation (what the budget deadline cannot
    # interrupt) cost more than this is not run: budget / min_trials (None: no limit).
    heavy_limit_s: float | None = None

    # --- lookups ------------------------------------------------------------------------
    def entry(self, method: str, image_size: int) -> Entry | None:
        key = schedule_key(method, image_size)
        return next((e for e in self.entries if e.key == key), None)

    def sizes(self, method: str) -> tuple[int, ...]:
        return tuple(sorted(e.image_size for e in self.entries if e.method == method))

    def all_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({e.image_size for e in self.entries}))

    def schedule(self) -> dict[str, dict[str, int]]:
        """``{"<method>@<size>": {steps_per_epoch, batch_size}}`` for the trials."""
        return {e.key: {"steps_per_epoch": e.steps_per_epoch, "batch_size": e.batch_size} for e in self.entries}

    def _costs(self, method: str, image_size: int, backbone: str | None) -> tuple[Entry, dict[str, float]] | None:
        entry = self.entry(method, image_size)
        if entry is None:
            return None
        costs = entry.costs.get(backbone or "-") or entry.mean_costs()
        return entry, costs

    def _scaled(self, seconds: float, factor: float, entry: Entry | None = None) -> float:
        """``seconds`` of a configuration ``factor`` times as costly as the default
        (the start-up does not scale)."""
        overhead = self.overhead_s if entry is None or entry.overhead_s is None else entry.overhead_s
        return _scale_work(seconds, factor, overhead)

    def first_rung_seconds(self, method: str, image_size: int, backbone: str | None = None,
                           factor: float = 1.0) -> float | None:
        """The least a trial of this configuration costs and still reports (seconds)."""
        return self.seconds_at(method, image_size, backbone, self.rung_rounds[0], factor)

    def seconds_at(self, method: str, image_size: int, backbone: str | None, rounds_done: int,
                   factor: float = 1.0) -> float | None:
        found = self._costs(method, image_size, backbone)
        if found is None:
            return None
        entry, costs = found
        return self._scaled(trial_cost(costs, rounds_done, self.rounds, entry.trainable), factor, entry)

    def expected_seconds(self, method: str, image_size: int, backbone: str | None,
                         factor: float = 1.0) -> float | None:
        """Expected seconds of a trial of this configuration under ASHA (what a pace is in)."""
        found = self._costs(method, image_size, backbone)
        if found is None:
            return None
        entry, costs = found
        seconds = expected_cost(costs, self.rung_rounds, self.reduction_factor, entry.trainable)
        return self._scaled(seconds, factor, entry)

    def too_heavy(self, method: str, image_size: int, backbone: str | None, factor: float) -> str | None:
        """Why a configuration is not worth running under this budget, or None: its
        setup + one validation (uninterruptible by the budget deadline) would take more
        than ``heavy_limit_s``, so it alone would eat the room of other trials."""
        found = self._costs(method, image_size, backbone)
        if found is None or self.heavy_limit_s is None:
            return None
        entry, costs = found
        overhead = self.overhead_s if entry.overhead_s is None else entry.overhead_s
        blocking = factor * (costs["fixed"] - overhead + costs["val"])
        if blocking <= self.heavy_limit_s:
            return None
        return (f"setup + one validation about {blocking:.0f} s ({factor:.3g} x the default configuration), "
                f"more than the {self.heavy_limit_s:.0f} s a trial may block")

    # --- storage ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        values = dict(data)
        values["entries"] = [Entry(**e) for e in values.get("entries", [])]
        return cls(**values)

    # --- text ---------------------------------------------------------------------------
    def text(self) -> str:
        lines = []
        budget = {"device": "device time", "wall": "search wall time", "trials": "trial count"}[self.budget_kind]
        lines.append(f"plan: budget {self.budget} ({budget}) on {self.device_label}; "
                     f"{self.devices_per_trial:g} device(s) per trial, {self.concurrency} trial(s) at a time")
        buys = "no time limit" if self.trial_seconds is None else f"{self.trial_seconds:,.0f} trial-seconds"
        lines.append(f"the budget buys {buys}; data: {self.data['fit']} fit, {self.data['val_good']} val-good, "
                     f"{self.data['test']} test images")
        lines.append(f"every trial: {self.rounds} rounds (ASHA epochs), grace {self.grace_period}, reduction "
                     f"{self.reduction_factor}: rungs at round {', '.join(map(str, self.rung_rounds))}; "
                     f"target {self.trials_per_method} trials per method")
        if self.fixed_steps:
            lines.append("schedule: fixed by fidelity.steps_per_epoch (override)")
        elif self.phi >= 1:
            lines.append("schedule: every method at its paper schedule (phi = 1)")
        else:
            lines.append(f"schedule: every method at {100 * self.phi:.3g} % of its paper schedule "
                         "(phi, bounded below by fidelity.min_steps)")
        header = (f"{'method':<10}{'size':>5}{'batch':>6}{'steps':>8}{'epochs':>9}{'paper':>7}  "
                  f"{'rungs (steps)':<20}{'s/full trial':>13} {'= setup + train + val (+ test after)':<38}"
                  f"{'E[s]':>8}{'trials':>8}{'full':>7}  speed")
        lines.append(header)
        for e in sorted(self.entries, key=lambda x: (x.method, x.image_size)):
            c = e.mean_costs()
            train = e.steps_per_epoch and c["round"] * self.rounds
            val = c["val"] * (self.rounds if e.trainable else 1)
            rungs = "/".join(map(str, e.rungs)) if e.trainable else "- (no training)"
            parts = f"= {c['fixed']:.0f} + {train:.0f} + {val:.0f} (+ {c['test']:.0f})"
            lines.append(
                f"{e.method:<10}{e.image_size:>5}{e.batch_size:>6}{e.steps:>8}{e.epochs:>9.3g}"
                f"{e.paper_epochs:>7.0f}  {rungs:<20}{e.full_s:>13,.0f} {parts:<38}{e.expected_s:>8,.0f}"
                f"{e.expected_trials:>8.1f}{e.expected_full:>7.1f}  {e.source}")
        for drop in self.dropped:
            lines.append(f"dropped: {drop['method']} at {drop['image_size']} px ({drop['reason']})")
        lines.append(f"expected: {self.expected_trials:.1f} trials, {self.expected_full:.1f} of them at full fidelity")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# --- planning -----------------------------------------------------------------------------

def trial_seconds(budget: Budget, devices_per_trial: float, concurrency: int) -> float | None:
    """Trial-seconds the budget buys (None: a trial-count budget)."""
    if budget.kind == "trials":
        return None
    if budget.kind == "device":
        return budget.amount / max(devices_per_trial, 1e-9)
    return budget.amount * max(1, concurrency) * WALL_EFFICIENCY
