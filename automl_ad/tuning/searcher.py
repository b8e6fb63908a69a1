"""The searcher: an Optuna study behind a budget gate, so no trial starts that the
budget left cannot hold.

It owns its study through Optuna's public API (``enqueue_trial`` for the warm starts,
``ask`` / ``tell``), and speaks Ray Tune's ``Searcher`` protocol to the Tuner. Module
level, like every Ray piece of the search, so ``Tuner.restore`` can unpickle it by
reference.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Mapping, Sequence

from ray.tune.search import Searcher

from automl_ad.tuning.budget import Ledger
from automl_ad.tuning.sampled_costs import config_cost_factor
from automl_ad.tuning.schedule import PACE, PACE_MIN_FACTOR, Plan
from automl_ad.param_keys import split_config


class BudgetedOptunaSearch(Searcher):
    """Optuna (define-by-run ``space``, the given ``sampler``) that reserves budget before
    a trial starts and records ASHA-stopped trials as PRUNED.

    With a ``plan``, a configuration is sampled first and reserves what the plan says it
    costs up to its first rung (the least it costs and still reports), scaled by its
    cost factor over the default Config's, times the ratio of used to planned cost
    over the trials that finished. A configuration whose setup and one validation alone
    would block more than the budget / min_trials (``Plan.too_heavy``: the paper-width
    DRAEM on a 10-minute CPU budget) is told FAIL and the next one sampled; so is one
    that would cost more than ``PACE`` x the pace while the search runs behind the plan's
    trial count (``_behind_pace``; at most ``PACE_TRIES`` such draws per suggestion). While other trials run, a sampled
    configuration the rest cannot hold waits (the next suggestion offers it again, so the
    sequence stays the seed's); when none runs it starts as long as any budget is left
    (the budget deadline stops it). A configuration still waiting when the budget is
    spent is told to Optuna as FAIL.
    """

    def __init__(self, space: Callable[[Any], Mapping[str, Any] | None], *, ledger: Ledger, max_epochs: int,
                 metric: str = "objective", mode: str = "max", sampler: Any = None,
                 points_to_evaluate: Sequence[Mapping[str, Any]] | None = None, storage: Any = None,
                 study_name: str | None = None, plan: Plan | None = None, devices_per_trial: float = 1.0,
                 default_image_size: int = 128) -> None:
        import optuna

        super().__init__(metric=metric, mode=mode)
        self.space = space
        # No Optuna pruner: ASHA stops trials; Optuna sees their reports and their end.
        self.study = optuna.create_study(storage=storage, sampler=sampler, pruner=optuna.pruners.NopPruner(),
                                         study_name=study_name, load_if_exists=True,
                                         direction="maximize" if mode == "max" else "minimize")
        for point in points_to_evaluate or ():  # the warm starts, asked first, in order
            self.study.enqueue_trial(dict(point))
        self.asked: dict[str, Any] = {}  # Tune trial id -> the Optuna trial it runs
        self.ledger = ledger
        self.max_epochs = max_epochs
        self.plan = plan
        self.devices_per_trial = devices_per_trial
        self.default_image_size = default_image_size
        self._live: set[str] = set()
        self._pending: tuple[str, dict] | None = None
        self._planned: dict[str, tuple[str, int, str | None, float]] = {}
        self._rounds: dict[str, int] = {}

    # --- the study -----------------------------------------------------------------------
    def _ask(self, trial_id: str) -> dict[str, Any]:
        """A configuration for ``trial_id``: the space run on its Optuna trial."""
        if trial_id not in self.asked:
            self.asked[trial_id] = self.study.ask()
        trial = self.asked[trial_id]
        extra = self.space(trial) or {}
        return {**trial.params, **extra}

    def _tell(self, trial_id: str, value: float | None, state: Any, reason: str | None = None) -> None:
        trial = self.asked.pop(trial_id, None)
        if trial is None:
            return
        try:
            if reason is not None:
                trial.set_user_attr("not_run", reason)
            self.study.tell(trial, value, state=state)
        except Exception:  # already closed in optuna.db (a restore), or a NaN value
            pass

    def _config_key(self, config: Mapping[str, Any]) -> tuple[str, int, str | None, float]:
        split = split_config(config, self.default_image_size)
        backbone = split.method_params.get("backbone")
        plan = getattr(self, "plan", None)
        factor = config_cost_factor(split.method, split.method_params, split.image_size,
                                    plan.data if plan is not None else None)
        return split.method, split.image_size, str(backbone) if backbone else None, factor

    def _devices(self, config: Mapping[str, Any] | None) -> float:
        devices = getattr(self, "devices_of", None)
        return devices(config) if devices is not None and config is not None else self.devices_per_trial

    def _correction(self, method: str | None = None) -> float:
        """Used / planned cost over the finished trials of ``method`` (of every method while
        it has none; 1 before any), within [0.2, 5]: a speed measured on other images, a
        start-up the plan did not know, learnt from what the trials really cost."""
        totals: dict[str | None, list[float]] = {}
        for trial_id, rounds in getattr(self, "_rounds", {}).items():
            entry = self.ledger.trial(trial_id)
            key = self._planned.get(trial_id)
            if not entry or entry.get("state") != "finished" or key is None:
                continue
            name, size, backbone, factor = (tuple(key) + (1.0,))[:4]
            seconds = self.plan.seconds_at(name, size, backbone, rounds, factor)
            if seconds:
                planned = self.ledger.trial_cost(float(entry.get("devices") or self.devices_per_trial), seconds)
                for group in (name, None):
                    pair = totals.setdefault(group, [0.0, 0.0])
                    pair[0] += planned
                    pair[1] += float(entry.get("used", 0.0))
        planned, used = totals.get(method) or totals.get(None) or (0.0, 0.0)
        return 1.0 if planned <= 0 else min(5.0, max(0.2, used / planned))

    def _full_estimate(self, config: Mapping[str, Any]) -> float | None:
        """Budget a trial of ``config`` costs if it runs every round (corrected)."""
        plan = getattr(self, "plan", None)
        if plan is None or self.ledger.budget.kind == "trials":
            return None
        key = self._config_key(config)
        seconds = plan.seconds_at(*key[:3], plan.rounds, key[3])
        if seconds is None:
            return None
        return self.ledger.trial_cost(self._devices(config), seconds) * self._correction(key[0])

    def _estimate(self, config: Mapping[str, Any] | None = None) -> float:
        if self.ledger.budget.kind == "trials":
            return 1.0
        plan = getattr(self, "plan", None)
        if plan is not None and config is not None:
            key = self._config_key(config)
            seconds = plan.first_rung_seconds(*key)
            if seconds is not None:
                return self.ledger.trial_cost(self._devices(config), seconds) * self._correction(key[0])
        done = [e["used"] for e in self.ledger.trials().values() if e.get("state") == "finished"]
        if done:
            return sum(done) / len(done)
        return min(self.ledger.budget.amount * 0.1, self.ledger.remaining())

    MAX_SKIPS = 64  # configurations passed over as too heavy in one suggestion at most

    def _too_heavy(self, config: Mapping[str, Any]) -> str | None:
        plan = getattr(self, "plan", None)
        if plan is None or self.ledger.budget.kind == "trials":
            return None
        reason = plan.too_heavy(*self._config_key(config))
        if reason is not None:
            return reason
        # Alone, a trial that cannot reach its first report before the budget ends buys
        # nothing: the deadline would stop it half-way (seen: a 333 s PatchCore started
        # with 170 s left). With others running it waits instead (suggest).
        first = self._estimate(config)
        if not self._live and first > self.ledger.remaining():
            return (f"its first report needs about {first:.0f} of the budget's units, "
                    f"{self.ledger.remaining():.0f} are left")
        return None

    PACE_TRIES = 16  # draws one suggestion may pass over for the pace before it runs one anyway

    def _behind_pace(self, config: Mapping[str, Any]) -> str | None:
        """Why ``config`` waits for a cheaper draw, or None: the search runs behind its plan
        and this configuration is expected to cost more than ``PACE`` times the pace (the
        budget left over the trials the plan still expects; schedule.PACE)."""
        plan = getattr(self, "plan", None)
        if plan is None or self.ledger.budget.kind == "trials" or not plan.expected_trials:
            return None
        method, size, backbone, factor = self._config_key(config)
        seconds = plan.expected_seconds(method, size, backbone, factor)
        if factor <= PACE_MIN_FACTOR or seconds is None:
            return None
        cost = self.ledger.trial_cost(self._devices(config), seconds) * self._correction(method)
        left_trials = max(1.0, plan.expected_trials - len(self._planned))
        remaining = self.ledger.remaining()
        if self.ledger.budget.kind == "wall" and plan.trial_seconds:
            remaining *= plan.trial_seconds / self.ledger.budget.amount  # concurrency, scheduling gaps
        pace = remaining / left_trials
        if cost <= PACE * pace:
            return None
        return (f"behind the plan's pace: about {cost:.0f} of the budget's units ({factor:.2g} x the default) "
                f"where {PACE:g} x the pace allows {PACE * pace:.0f} (what is left over the {left_trials:.1f} trials "
                "the plan still expects)")

    def _tell_not_run(self, trial_id: str, reason: str) -> None:
        """Close a sampled configuration that never runs as FAIL in the study."""
        import optuna

        self._tell(trial_id, None, optuna.trial.TrialState.FAIL, reason)

    def _cheapest(self) -> float:
        """The least budget any planned configuration needs to reach its first report."""
        plan = getattr(self, "plan", None)
        if plan is None:
            return 0.0
        costs = [self.ledger.trial_cost(self.devices_per_trial, e.first_rung_s) * self._correction(e.method)
                 for e in plan.entries]
        return min(costs) if costs else 0.0

    def _drop_pending(self) -> None:
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            self._tell_not_run(pending[0], "not run: the budget was spent while it waited")

    def suggest(self, trial_id: str):
        if self.ledger.budget.kind != "trials" and self.ledger.exhausted():
            self._drop_pending()
            return Searcher.FINISHED
        pending = getattr(self, "_pending", None)
        if pending is None:
            for tries in range(self.MAX_SKIPS):
                config = self._ask(trial_id)
                reason = self._too_heavy(config)
                if reason is None and tries < self.PACE_TRIES:
                    reason = self._behind_pace(config)
                if reason is None:
                    break
                self._tell_not_run(trial_id, f"not run: {reason}")
                if not self._live and self.ledger.remaining() < self._cheapest():
                    return Searcher.FINISHED  # not even the cheapest planned trial fits what is left
            else:
                return None if self._live else Searcher.FINISHED
        else:
            old_id, config = pending
            if old_id != trial_id and old_id in self.asked:
                self.asked[trial_id] = self.asked.pop(old_id)
        self._pending = (trial_id, config)
        estimate = self._estimate(config)
        if not self._live and self.ledger.budget.kind != "trials":
            estimate = min(estimate, self.ledger.remaining())  # alone: it fits (_too_heavy), the deadline bounds it
        if not self.ledger.try_reserve(trial_id, estimate):
            if self._live:
                return None
            self._drop_pending()
            return Searcher.FINISHED
        self._pending = None
        self._live.add(trial_id)
        self._planned[trial_id] = self._config_key(config)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Each round's objective as the trial's intermediate value: TPE ranks the trials
        ASHA stopped (PRUNED) by them."""
        trial, value = self.asked.get(trial_id), result.get(self.metric)
        if trial is None or value is None:
            return
        try:
            trial.report(float(value), int(result.get("training_iteration", 0) or 0))
        except Exception:  # after a restore the study may already have closed it
            pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        self._live.discard(trial_id)
        self._rounds[trial_id] = int((result or {}).get("epoch", 0) or 0)
        if trial_id not in self.asked:
            return  # a trial restored from before a restart that Optuna already closed
        if result and not error and int(result.get("epoch", 0) or 0) < self.max_epochs:
            result = None  # stopped early (ASHA, the budget): no value, no error
        value = (result or {}).get(self.metric)
        if value is not None:
            self._tell(trial_id, float(value), optuna.trial.TrialState.COMPLETE)
        else:
            self._tell(trial_id, None, optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_live"] = set()
        return state

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)  # Tune's own searcher state, written by save() above
        # A search started before the searcher owned its study (Ray's OptunaSearch) named them so.
        for old, new in (("_ot_study", "study"), ("_ot_trials", "asked")):
            if old in state:
                state[new] = state.pop(old)
        self.__dict__.update(state)
