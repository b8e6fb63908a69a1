"""The planner: from a budget, the methods and their speeds to a ``Plan`` (the rule is
in ``schedule.py``'s docstring, which also holds what a plan is made of)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Iterable, Mapping

from automl_ad.tuning.budget import Budget
from automl_ad.tuning.calibration import Probe, Speed, SpeedBook
from automl_ad.tuning.sampled_costs import config_cost_factor
from automl_ad.tuning.schedule import (
    DIRECT_OVERHEAD_S, KEEP_SCHEDULE, MIN_SCHEDULE_TO_JOIN, OVERHEAD_S, PACE, PHI_MAX, SIZE_MIN_SCHEDULE, DataCounts,
    Entry, Fidelity, MethodInput, Plan, _scale_work, asha_rungs, expected_cost, sampled_seconds,
    schedule_key, trial_cost, trial_seconds,
)


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
    heavy = {m.name: planner.too_heavy(m, min(m.sizes)) for m in methods}
    left_out = [{"method": name, "image_size": "any", "reason": reason} for name, reason in heavy.items() if reason]
    if left_out and len(left_out) < len(methods):  # the searcher would refuse every draw of these
        methods = [m for m in methods if not heavy[m.name]]
        planner = _Planner(budget, methods, bounds, speeds, data, **options)
    else:
        left_out = []
    chosen, phi, dropped = planner.choose_sizes()
    return planner.plan(chosen, phi, left_out + dropped)


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
        # what one trial may block (Plan.heavy_limit_s; the searcher refuses the rest)
        self.heavy_limit = None if self.total_s is None else self.total_s / max(1, bounds.min_trials)
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
                "fixed": self.overhead_of(m) + scale * (s.build_s + s.setup_s(self.data.fit)),
                "round": scale * (steps / self.rounds) * s.step_s if m.trainable else 0.0,
                "val": scale * m.val_images * per_image,
                "test": scale * self.data.test * per_image,
            }
        return out

    def start_up(self, m: MethodInput) -> float:
        return self.overhead if m.trainable else self.direct_overhead

    def overhead_of(self, m: MethodInput) -> float:
        """The start-up in an entry's fixed cost (as the costs carry it: the learnt one, or
        the plan's times the learnt factor)."""
        if m.learned_start_up is not None:
            planned = m.learned_start_up_planned or self.start_up(m)
            return m.learned_start_up * self.start_up(m) / max(planned, 1e-9)
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
                # a method without training first: its larger sizes join whenever the
                # trials fit (_why_not), so the trained methods' sizes see the schedule left
                candidates.append((m.trainable, size != paper_size, extra, size, m.name))
        by_name = {m.name: m for m in self.methods}
        phi = phi0
        for *_, size, name in sorted(candidates):
            trial = {k: sorted(v + [size]) if k == name else v for k, v in chosen.items()}
            phi_new, feasible = self.solve(trial)
            reason = self._why_not(by_name[name], size, phi, phi_new, feasible)
            if reason is None:
                chosen, phi = trial, phi_new
            else:
                dropped.append({"method": name, "image_size": size, "reason": reason})
        return chosen, phi, dropped

    def blocking_s(self, m: MethodInput, size: int) -> float:
        """Setup + one validation of ``m``'s default configuration at ``size`` (its
        cheapest backbone): what the budget deadline cannot interrupt (Plan.too_heavy)."""
        return min(c["fixed"] + c["val"] for c in self.costs(m, size, 0).values()) - self.overhead_of(m)

    def too_heavy(self, m: MethodInput, size: int) -> str | None:
        """Why the searcher would refuse even ``m``'s default at ``size``, or None."""
        if self.heavy_limit is None:
            return None
        blocking = self.blocking_s(m, size)
        if blocking <= self.heavy_limit:
            return None
        return (f"its default's setup + one validation, about {blocking:.0f} s, is more than the "
                f"{self.heavy_limit:.0f} s one trial may block (budget / min_trials)")

    def _why_not(self, m: MethodInput, size: int, phi: float, phi_new: float, feasible: bool) -> str | None:
        """Why a larger size of ``m`` that leaves schedule share ``phi_new`` cannot join."""
        heavy = self.too_heavy(m, size)
        if heavy is not None:
            # counted, it would be planned trials the searcher never runs (stop 35: a tiled
            # KolektorSDD plan counted 3.3 trials at 256 px; every draw there was refused)
            return heavy
        if not self.feasible0:
            return "the budget is too small even for the smallest sizes"
        if not feasible:
            return f"the budget cannot hold {self.n_req} trials per method with it"
        if self.bounds.steps_per_epoch or not m.trainable:
            # A size of a method that trains nothing joins whenever its trials fit: at a
            # small budget its larger images buy more than the trained methods' share
            # (stop 32: marble's plan dropped PatchCore at 256 px to keep 10.2 % of a
            # schedule and exported 0.862; stop 29's, with 256 px, 0.892). Trained methods it
            # leaves under MIN_SCHEDULE_TO_JOIN leave the search (make_plan, step 0).
            return None
        keeps = phi_new >= 1.0 or phi_new >= KEEP_SCHEDULE * self.phi0
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
            draw_ratio=m.draw_ratio if int(size) in dict(m.sampled_cost) else 1.0, start_up_s=self.start_up(m),
        )
        mean = entry.mean_costs()
        entry.expected_s = self.mean_expected(m, size, steps)
        entry.full_s = trial_cost(mean, rounds, rounds, m.trainable)
        entry.first_rung_s = trial_cost(mean, self.rungs[0], rounds, m.trainable)
        return entry

    def plan(self, chosen: Mapping[str, list[int]], phi: float, dropped: list[dict[str, Any]]) -> Plan:
        entries = [self.entry(m, size, self.steps_at(m, phi)) for m in self.methods for size in chosen[m.name]]
        self.count_trials(chosen, entries)
        if self.total_s is not None:
            # The searcher passes over draws dearer than PACE x its pace while it runs
            # behind the plan (searcher._behind_pace): count the draws it runs, at the pace
            # the count itself sets (a few rounds settle it).
            by_name = {m.name: m for m in self.methods}
            for _ in range(3):
                pace = self.total_s / max(1.0, sum(e.expected_trials for e in entries))
                for e in entries:
                    m = by_name[e.method]
                    limit = self._factor_at(e, PACE * pace)
                    if self.heavy_limit is not None:  # draws the searcher refuses at any pace
                        limit = min(limit, self.heavy_limit / max(self.blocking_s(m, e.image_size), 1e-9))
                    e.sampled_factor = m.sampled_factor(e.image_size, limit)
                self.count_trials(chosen, entries)
        bounds, speeds = self.bounds, self.speeds
        return Plan(
            budget=self.budget.text, budget_kind=self.budget.kind, device_kind=speeds.device_kind,
            device_label=speeds.device_label, devices_per_trial=self.devices_per_trial,
            concurrency=int(self.concurrency), trial_seconds=self.total_s, rounds=self.rounds,
            grace_period=int(bounds.grace_period), reduction_factor=self.eta, rung_rounds=self.rungs,
            trials_per_method=self.n_req, phi=min(phi, PHI_MAX), fixed_steps=bool(bounds.steps_per_epoch),
            data=asdict(self.data), entries=entries, dropped=dropped,
            expected_trials=sum(e.expected_trials for e in entries),
            expected_full=sum(e.expected_full for e in entries), notes=self.notes(entries), overhead_s=self.overhead,
            heavy_limit_s=None if self.total_s is None else self.total_s / max(1, bounds.min_trials),
        )

    def count_trials(self, chosen: Mapping[str, list[int]], entries: list[Entry]) -> None:
        """Each entry's expected trials (and full-fidelity ones): the warm starts first
        (search.warm_start_points), then configurations sampled uniformly over methods,
        then sizes, each at its entry's sampled cost."""
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

    @staticmethod
    def _factor_at(entry: Entry, seconds: float) -> float:
        """The cost factor at which a drawn configuration of ``entry`` costs ``seconds``."""
        overhead = entry.overhead_s or 0.0
        work = entry.expected_s - overhead
        return math.inf if work <= 0 else max(0.0, seconds - overhead) / work

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
                overhead = entry.overhead_s or 0.0
                for b in m.backbones:
                    seconds = trial_cost(entry.costs.get(b or "-") or entry.mean_costs(), 1, 1, False)
                    factor = config_cost_factor(m.name, {"backbone": b} if b else {}, entry.image_size,
                                                asdict(self.data))
                    if limit is not None and factor * (seconds - overhead) > limit:
                        continue  # the searcher refuses it (Plan.too_heavy)
                    out.append((entry.key, _scale_work(seconds, factor, overhead)))
            else:
                size = min(sizes, key=lambda size: (abs(size - m.recipe.image_size), size))
                out.append((schedule_key(m.name, size), entries[schedule_key(m.name, size)].expected_s))
        return out

    def notes(self, entries: list[Entry]) -> list[str]:
        by_name = {m.name: m for m in self.methods}
        notes = []
        if not self.feasible0:
            notes.append(f"the budget is too small for {self.n_req} trials per method even at fidelity.min_steps: "
                         "every method trains at the floor")
        if self.speeds.device is None:
            notes.append(self.speeds.prior_note())
        learned = {m.name: m for m in self.methods if m.learned_trials}
        if learned:
            parts = ", ".join((f"{name} {m.learned_start_up:.1f} s start-up + " if m.learned_start_up is not None
                               else f"{name} ") + f"x{m.learned:.2f} ({m.learned_trials} trials)"
                              for name, m in sorted(learned.items()))
            notes.append(f"costs scaled by what earlier searches' trials cost on this machine: {parts}")
        drawn = {m.name: m.draw_ratio for m in self.methods if m.draw_ratio != 1.0 and m.sampled_cost}
        if drawn:
            parts = ", ".join(f"{name} x{ratio:.2f}" for name, ratio in sorted(drawn.items()))
            notes.append(f"drawn trials counted at what earlier searches' draws cost against the mean the plan "
                         f"counted: {parts}")
        factors: dict[str, list[float]] = {}
        for e in entries:
            if by_name[e.method].sampled_cost:
                factors.setdefault(e.method, []).append(e.sampled_factor)
        sampled = [(name, min(f), max(f)) for name, f in sorted(factors.items())]
        spans = [f"{name} x{low:.1f}" + (f"-{high:.1f}" if high - low >= 0.05 else "")
                 for name, low, high in sampled if high > 1.05 or low < 0.95]
        notes.append("s/full trial is each method's default configuration; the expected trials count a sampled one "
                     "at its mean cost over the space" + (f" ({', '.join(spans)} by size)" if spans else "")
                     + (f", leaving out draws over {PACE:g}x the pace, which the search passes over while it runs "
                        "behind the plan" if self.total_s is not None else ""))
        return notes


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
