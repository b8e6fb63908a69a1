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
   (the one nearest the paper's size first, then cheapest extra cost first) while the
   plan stays feasible and ``phi`` (uncapped) stays at least 1 or at least
   ``KEEP_SCHEDULE`` of its value before sizes were added (a method without training may
   take it down to ``MIN_SCHEDULE_TO_JOIN``); a method with a gradient phase also needs
   ``phi >= SIZE_MIN_SCHEDULE``. Other sizes are dropped (and printed with the reason).

``fidelity.steps_per_epoch`` in a space file overrides (1)-(4) with a fixed
``F = R x steps_per_epoch`` for every method, and ``fidelity.batch_size`` one batch size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from automl_ad.data.layout import discover_category
from automl_ad.methods.base import Recipe, create_method, get_method_class
from automl_ad.tuning.budget import Budget
from automl_ad.tuning.calibration import Probe, Speed, SpeedBook
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
    # (learned_costs): multiplies every cost the calibration gives
    learned: float = 1.0
    learned_trials: int = 0
    # ((size, mean cost of a configuration sampled from the space / the default's), ...):
    # what the expected trial count assumes a drawn configuration costs
    sampled_cost: tuple[tuple[int, float], ...] = ()

    def sampled_factor(self, size: int) -> float:
        return dict(self.sampled_cost).get(int(size), 1.0)

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
    learned_factor: float = 1.0  # costs are the calibration's times this (learned_costs)
    sampled_factor: float = 1.0  # mean cost of a sampled configuration / the default's

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


def make_plan(
    budget: Budget,
    methods: Iterable[MethodInput],
    bounds: Fidelity,
    speeds: SpeedBook,
    data: DataCounts,
    *,
    category: str | None = None,
    devices_per_trial: float = 1.0,
    concurrency: int = 1,
    workers: int = 1,
    use_train: bool = True,
    overhead_s: float | None = None,
    keep_all: bool = False,
) -> Plan:
    """The schedule for ``methods`` under ``budget`` (see the module docstring).

    Unless ``keep_all`` (the user named the methods), a method with a gradient phase
    joins only when the budget trains it to at least ``MIN_SCHEDULE_TO_JOIN`` of its
    paper schedule: the most expensive such methods are left out, one at a time, until
    the rest reach it (step 0 of the rule). A budget that cannot buy that for any of
    them is spent on the methods that need no training, when there are any."""
    kwargs = dict(category=category, devices_per_trial=devices_per_trial, concurrency=concurrency,
                  workers=workers, use_train=use_train, overhead_s=overhead_s)
    methods = sorted(methods, key=lambda m: m.name)
    if keep_all or bounds.steps_per_epoch:
        return _make_plan(budget, methods, bounds, speeds, data, **kwargs)
    left_out: list[dict[str, Any]] = []
    while True:
        plan = _make_plan(budget, methods, bounds, speeds, data, **kwargs)
        trained = [e for e in plan.entries if e.trainable]
        starved = trained and (plan.phi < MIN_SCHEDULE_TO_JOIN or any("too small" in n for n in plan.notes))
        if not starved:
            break
        names = {e.method for e in trained}
        if len(names) == len(methods):  # nothing trainless to spend the budget on instead
            if len(names) == 1:
                break
        # the method whose paper schedule costs the most leaves first
        costliest = max(names, key=lambda n: max(e.paper_steps * e.mean_costs()["round"] / max(1, e.steps)
                                                  for e in trained if e.method == n))
        left_out.append({"method": costliest, "image_size": "any",
                         "reason": f"the budget trains methods to only {100 * min(plan.phi, 1):.2g} % of their "
                                   f"paper schedule; a method joins at {100 * MIN_SCHEDULE_TO_JOIN:.0f} % "
                                   "(--methods keeps it)"})
        methods = [m for m in methods if m.name != costliest]
    plan.dropped = left_out + plan.dropped
    return plan


def _make_plan(budget: Budget, methods: list[MethodInput], bounds: Fidelity, speeds: SpeedBook, data: DataCounts,
               **options: Any) -> Plan:
    """One plan for exactly ``methods``; ``options`` are ``make_plan``'s keywords."""
    if not methods:
        raise ValueError("no methods to plan")
    planner = _Planner(budget, methods, bounds, speeds, data, **options)
    chosen, phi, dropped = planner.choose_sizes()
    return planner.plan(chosen, phi, dropped)


class _Planner:
    """The arithmetic of one plan: each method's steps for a schedule share ``phi`` (of
    its paper schedule), a trial's expected cost, and the largest ``phi`` that lets the
    budget hold ``n_req`` trials per method."""

    def __init__(self, budget: Budget, methods: list[MethodInput], bounds: Fidelity, speeds: SpeedBook,
                 data: DataCounts, **options: Any) -> None:
        self.budget, self.methods, self.bounds, self.speeds, self.data = budget, methods, bounds, speeds, data
        self.category: str | None = options["category"]
        self.devices_per_trial: float = options["devices_per_trial"]
        self.concurrency: int = options["concurrency"]
        self.workers = workers = int(options["workers"])
        overhead_s: float | None = options["overhead_s"]
        self.rounds = int(bounds.max_epochs)
        self.eta = int(bounds.reduction_factor)
        self.rungs = asha_rungs(self.rounds, int(bounds.grace_period), self.eta)
        self.promotions = len(self.rungs) - 1
        self.n_req = max(math.ceil(bounds.min_trials / len(methods)), round(self.eta ** self.promotions), 1)
        self.total_s = trial_seconds(budget, self.devices_per_trial, self.concurrency)
        self.cap = math.inf if self.total_s is None else self.total_s / self.n_req
        self.overhead = (OVERHEAD_S[(speeds.device_kind, bool(options["use_train"]))] if overhead_s is None
                         else overhead_s)
        # without a gradient phase a trial skips the TorchTrainer (trainable.runs_direct)
        self.direct_overhead = (DIRECT_OVERHEAD_S[speeds.device_kind] if overhead_s is None and options["use_train"]
                                else self.overhead)
        self.batch = {m.name: int(bounds.batch_size or m.recipe.batch_size) for m in methods}
        self.paper_steps = {m.name: (math.ceil(m.recipe.epochs_for(self.category) * data.fit
                                               / (self.batch[m.name] * workers)) if m.trainable else 0)
                            for m in methods}
        self._speeds: dict[Probe, Speed] = {}

    def steps_at(self, m: MethodInput, phi: float) -> int:
        bounds = self.bounds
        if not m.trainable:
            return 0
        if bounds.steps_per_epoch:
            return self.rounds * int(bounds.steps_per_epoch)
        target = min(phi, 1.0) * self.paper_steps[m.name]
        target = max(target, bounds.min_steps)
        if bounds.max_steps:
            target = min(target, bounds.max_steps)
        return self.rounds * max(1, round(target / self.rounds))

    def speed(self, m: MethodInput, size: int, backbone: str | None) -> Speed:
        probe = Probe(m.name, size, self.batch[m.name], backbone)
        if probe not in self._speeds:
            self._speeds[probe] = self.speeds.lookup(probe, Probe(m.name, size, self.batch[m.name], m.measured_backbone))
        return self._speeds[probe]

    def costs(self, m: MethodInput, size: int, steps: int) -> dict[str, dict[str, float]]:
        out = {}
        for backbone in m.backbones:
            s = self.speed(m, size, backbone)
            per_image = s.infer_s + s.metrics_s
            scale = m.learned
            out[backbone or "-"] = {
                "fixed": scale * (self.start_up(m) + s.build_s + s.setup_s(self.data.fit)),
                "round": scale * (steps / self.rounds) * s.step_s if m.trainable else 0.0,
                "val": scale * m.val_images * per_image,
                "test": scale * self.data.test * per_image,
            }
        return out

    def start_up(self, m: MethodInput) -> float:
        return self.overhead if m.trainable else self.direct_overhead

    def overhead_of(self, m: MethodInput) -> float:
        """The start-up in an entry's fixed cost (as the costs carry it: learnt factor included)."""
        return m.learned * self.start_up(m)

    def mean_expected(self, m: MethodInput, size: int, steps: int) -> float:
        parts = self.costs(m, size, steps).values()
        return sum(expected_cost(c, self.rungs, self.eta, m.trainable) for c in parts) / len(parts)

    def load(self, chosen: Mapping[str, list[int]], phi: float) -> float:
        total = 0.0
        for m in self.methods:
            sizes = chosen[m.name]
            steps = self.steps_at(m, phi)
            total += sum(self.mean_expected(m, s, steps) for s in sizes) / len(sizes)
        return total

    def solve(self, chosen: Mapping[str, list[int]]) -> tuple[float, bool]:
        """(largest phi whose load fits the cap, whether the floor itself fits)."""
        if self.load(chosen, 0.0) > self.cap:
            return 0.0, False
        if self.bounds.steps_per_epoch or self.load(chosen, PHI_MAX) <= self.cap:
            return PHI_MAX, True
        low, high = 0.0, 1.0
        while self.load(chosen, high) <= self.cap:
            low, high = high, high * 2
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if self.load(chosen, mid) <= self.cap else (low, mid)
        return low, True

    def choose_sizes(self) -> tuple[dict[str, list[int]], float, list[dict[str, Any]]]:
        """Each method's image sizes, the schedule share they leave, and the sizes left out
        (with why): every method starts at its smallest size; a larger one joins when the
        budget still holds its trials without cutting everyone's schedule too far."""
        chosen = {m.name: [min(m.sizes)] for m in self.methods}
        self.phi0, self.feasible0 = phi0, feasible0 = self.solve(chosen)
        dropped: list[dict[str, Any]] = []
        candidates = []
        for m in self.methods:
            base = self.mean_expected(m, min(m.sizes), self.steps_at(m, phi0))
            paper_size = min(m.sizes, key=lambda size: (abs(size - m.recipe.image_size), size))
            for size in sorted(m.sizes)[1:]:
                # the size nearest the paper's (where the recipe is known to work) is offered first
                extra = self.mean_expected(m, size, self.steps_at(m, phi0)) - base
                candidates.append((size != paper_size, extra, size, m.name))
        by_name = {m.name: m for m in self.methods}
        phi = phi0
        for _, _, size, name in sorted(candidates):
            trial = {k: sorted(v + [size]) if k == name else v for k, v in chosen.items()}
            phi_new, feasible = self.solve(trial)
            reason = self._why_not(by_name[name], phi, phi_new, feasible)
            if reason is None:
                chosen, phi = trial, phi_new
            else:
                dropped.append({"method": name, "image_size": size, "reason": reason})
        return chosen, phi, dropped

    def _why_not(self, m: MethodInput, phi: float, phi_new: float, feasible: bool) -> str | None:
        """Why a larger size of ``m`` that leaves schedule share ``phi_new`` cannot join."""
        if not self.feasible0:
            return "the budget is too small even for the smallest sizes"
        if not feasible:
            return f"the budget cannot hold {self.n_req} trials per method with it"
        if self.bounds.steps_per_epoch:
            return None
        # A size of a method that trains nothing may take schedule from the others
        # down to the joining share: its larger images are what the budget buys.
        keeps = (phi_new >= 1.0 or phi_new >= KEEP_SCHEDULE * self.phi0
                 or (not m.trainable and phi_new >= MIN_SCHEDULE_TO_JOIN))
        if not keeps:
            return (f"it would cut every method's schedule from {100 * min(phi, 1):.3g} % to "
                    f"{100 * min(phi_new, 1):.3g} % of the paper's")
        if m.trainable and phi_new < SIZE_MIN_SCHEDULE:
            return (f"methods reach only {100 * min(phi_new, 1):.3g} % of their paper schedule; larger "
                    f"images need {100 * SIZE_MIN_SCHEDULE:.0f} %")
        return None

    def entry(self, m: MethodInput, size: int, steps: int) -> Entry:
        rounds = self.rounds
        sources = sorted({self.speed(m, size, b).source for b in m.backbones})
        entry = Entry(
            method=m.name, image_size=size, batch_size=self.batch[m.name], steps=steps,
            steps_per_epoch=max(1, steps // rounds) if m.trainable else 1,
            paper_steps=self.paper_steps[m.name], paper_epochs=m.recipe.epochs_for(self.category),
            epochs=steps * self.batch[m.name] * self.workers / max(1, self.data.fit),
            rungs=[r * (steps // rounds) for r in self.rungs] if m.trainable else [],
            costs=self.costs(m, size, steps), source="/".join(sources), trainable=m.trainable,
            overhead_s=self.overhead_of(m), learned_factor=m.learned, sampled_factor=m.sampled_factor(size),
        )
        mean = entry.mean_costs()
        entry.expected_s = self.mean_expected(m, size, steps)
        entry.full_s = trial_cost(mean, rounds, rounds, m.trainable)
        entry.first_rung_s = trial_cost(mean, self.rungs[0], rounds, m.trainable)
        return entry

    def plan(self, chosen: Mapping[str, list[int]], phi: float, dropped: list[dict[str, Any]]) -> Plan:
        entries = [self.entry(m, size, self.steps_at(m, phi)) for m in self.methods for size in chosen[m.name]]
        # expected counts: the warm starts first (search.warm_start_points), then
        # configurations sampled uniformly over methods, then sizes
        share = {e.key: 1.0 / (len(self.methods) * len(chosen[e.method])) for e in entries}
        mean_trial = sum(share[e.key] * sampled_seconds(e) for e in entries)
        warm = self.warm_starts(chosen, {e.key: e for e in entries})
        counts = {e.key: 0.0 for e in entries}
        if self.total_s is None:
            rest = self.budget.amount
        else:
            left = self.total_s
            for key, seconds in warm:
                if left <= 0:
                    break
                counts[key] += min(1.0, left / max(seconds, 1e-9))
                left -= seconds
            rest = max(0.0, left) / mean_trial
        reach_full = self.eta ** -self.promotions
        for e in entries:
            e.expected_trials = counts[e.key] + rest * share[e.key]
            e.expected_full = e.expected_trials * (reach_full if e.trainable else 1.0)
        bounds, speeds = self.bounds, self.speeds
        return Plan(
            budget=self.budget.text, budget_kind=self.budget.kind, device_kind=speeds.device_kind,
            device_label=speeds.device_label, devices_per_trial=self.devices_per_trial,
            concurrency=int(self.concurrency), trial_seconds=self.total_s, rounds=self.rounds,
            grace_period=int(bounds.grace_period), reduction_factor=self.eta, rung_rounds=self.rungs,
            trials_per_method=self.n_req, phi=min(phi, PHI_MAX), fixed_steps=bool(bounds.steps_per_epoch),
            data=asdict(self.data), entries=entries, dropped=dropped,
            expected_trials=sum(e.expected_trials for e in entries),
            expected_full=sum(e.expected_full for e in entries), notes=self.notes(), overhead_s=self.overhead,
            heavy_limit_s=None if self.total_s is None else self.total_s / max(1, bounds.min_trials),
        )

    def warm_starts(self, chosen: Mapping[str, list[int]], entries: Mapping[str, Entry]) -> list[tuple[str, float]]:
        """(entry key, expected seconds) of the warm-start trials a TPE search runs first:
        a method without training at its largest size once per backbone, a method that
        trains at its size nearest the paper's (search.warm_start_points)."""
        out = []
        limit = None if self.total_s is None else self.total_s / max(1, self.bounds.min_trials)
        for m in sorted(self.methods, key=lambda m: (m.trainable, m.name)):
            sizes = chosen[m.name]
            if m.trainable and limit is not None and min(entries[schedule_key(m.name, size)].full_s
                                                         for size in sizes) > limit:
                continue  # no warm start for a method that costly (search.warm_start_points)
            if not m.trainable:
                entry = entries[schedule_key(m.name, max(sizes))]
                for b in m.backbones:
                    seconds = trial_cost(entry.costs.get(b or "-") or entry.mean_costs(), 1, 1, False)
                    factor = config_cost_factor(m.name, {"backbone": b} if b else {}, entry.image_size,
                                                asdict(self.data))
                    out.append((entry.key, _scale_work(seconds, factor, entry.overhead_s or 0.0)))
            else:
                size = min(sizes, key=lambda size: (abs(size - m.recipe.image_size), size))
                out.append((schedule_key(m.name, size), entries[schedule_key(m.name, size)].expected_s))
        return out

    def notes(self) -> list[str]:
        notes = []
        if not self.feasible0:
            notes.append(f"the budget is too small for {self.n_req} trials per method even at fidelity.min_steps: "
                         "every method trains at the floor")
        if self.speeds.device is None:
            notes.append("speeds are the project's prior" + (" (GPU: an estimate scaled from CPU, see "
                         "automl_ad/tuning/calibration.py)" if self.speeds.device_kind == "gpu" else ""))
        learned = {m.name: (m.learned, m.learned_trials) for m in self.methods if m.learned_trials}
        if learned:
            parts = ", ".join(f"{name} x{f:.2f} ({n} trials)" for name, (f, n) in sorted(learned.items()))
            notes.append(f"costs scaled by what earlier searches' trials cost on this machine: {parts}")
        sampled = [(m.name, min(f for _, f in m.sampled_cost), max(f for _, f in m.sampled_cost))
                   for m in sorted(self.methods, key=lambda m: m.name) if m.sampled_cost]
        spans = [f"{name} x{low:.1f}" + (f"-{high:.1f}" if high - low >= 0.05 else "")
                 for name, low, high in sampled if high > 1.05 or low < 0.95]
        notes.append("s/full trial is each method's default configuration; the expected trials count a sampled one "
                     "at its mean cost over the space" + (f" ({', '.join(spans)} by size)" if spans else ""))
        return notes


_FACTORS: dict[tuple[str, int, str, int, int], float] = {}
_WORK: dict[tuple[str, int, str, int, int], float] = {}


def config_cost_factor(method: str, params: Mapping[str, Any], image_size: int,
                       data: Mapping[str, int] | None = None) -> float:
    """How much costlier a sampled configuration is than the method's default Config (the
    one calibrated), both built on the meta device (nothing allocated, no weights read):
    the ratio of the method's own ``estimated_work`` on the plan's image counts (``data``:
    fit, val_good) where it has one (PatchCore: strides, coreset ratio), else of their
    parameter counts; 1.0 when that cannot be told."""
    import warnings

    import torch

    counts = dict(data or {})
    fit = int(counts.get("fit", 200))
    evaluated = val_images(None, int(counts.get("val_good", 50)))
    key = (method, int(image_size), repr(sorted(params.items())), fit, evaluated)
    if key not in _FACTORS:
        def cost(values: Mapping[str, Any]) -> float:
            work_key = (method, int(image_size), repr(sorted(values.items())), fit, evaluated)
            if work_key not in _WORK:  # the default is costed once per method and size
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    built = create_method(method, dict(values), image_size, "plan")
                    work = built.estimated_work(fit, evaluated)
                    _WORK[work_key] = (float(work) if work is not None
                                       else float(sum(p.numel() for p in built.parameters())))
            return _WORK[work_key]

        try:
            default, sampled = cost({}), cost(params)
            _FACTORS[key] = sampled / default if default > 0 and sampled > 0 else 1.0
        except Exception:  # a method that cannot be built on the meta device
            _FACTORS[key] = 1.0
    return _FACTORS[key]


def probes_of(plan: Plan, methods: Iterable[MethodInput]) -> list[Probe]:
    """The (method, size, batch, backbone) speeds a plan's entries rest on."""
    by_name = {m.name: m for m in methods}
    return [Probe(e.method, e.image_size, e.batch_size, by_name[e.method].measured_backbone) for e in plan.entries]


def plan_with_calibration(budget: Budget, methods: list[MethodInput], bounds: Fidelity, speeds: SpeedBook,
                          data: DataCounts, *, calibrate: bool = True, log=None, **kwargs: Any) -> Plan:
    """Plan from what is known, measure the speeds the plan rests on that this machine
    has not measured yet, and plan again (at most three times: a size that measured
    faster than its prior may join the plan, then it is measured too)."""
    plan = make_plan(budget, methods, bounds, speeds, data, **kwargs)
    # every method at its smallest size too: whether a method joins rests on its speed
    smallest = [Probe(m.name, min(m.sizes), int(bounds.batch_size or m.recipe.batch_size), m.measured_backbone)
                for m in methods]
    for _ in range(3):
        if not calibrate:
            break
        if not speeds.calibrate(smallest + probes_of(plan, methods), log=log):
            break
        plan = make_plan(budget, methods, bounds, speeds, data, **kwargs)
    return plan
