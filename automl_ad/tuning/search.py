"""The search driver: Ray Tune + Optuna (TPE) + ASHA over methods, under a budget.

``run_search`` prepares the experiment folder (frozen val anomalies, budget ledger,
Optuna sqlite study), runs a ``Tuner`` whose trials are function trainables that each
run a Ray Train ``TorchTrainer`` (see ``trainable.py``), writes one Parquet row per
finished trial (test metrics included, never optimised), and resumes an interrupted
search with ``Tuner.restore`` when ``resume=True``.
"""

from __future__ import annotations

import dataclasses
import json
import datetime as dt
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ray.tune import Callback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from automl_ad import experiment as layout
from automl_ad.results import leaderboard, store
from automl_ad.data.builtin import BUILTIN_CATEGORIES
from automl_ad.data.dataset import load_category, resolve_data_root
from automl_ad.data.layout import category_folder, list_categories
from automl_ad.data.minimum import check_product
from automl_ad.errors import UserError
from automl_ad.methods.base import get_method_class
from automl_ad.results.remote_storage import DRIVER_NOT_PULLED, Storage, parse_storage
from automl_ad.training.loop import evaluate, load_trained_method
from automl_ad.tuning import budget as budget_module
from automl_ad.tuning import interrupt, learned_costs
from automl_ad.tuning.budget import Budget, Ledger, parse_budget, shared_ledger, start_clock
from automl_ad.tuning.calibration import SpeedBook
from automl_ad.tuning.lock import DriverLock
from automl_ad.tuning.lock import acquire as acquire_lock
from automl_ad.tuning.progress import SearchProgress
from automl_ad.tuning.sampled_costs import sampled_cost_factors
from automl_ad.tuning.ray_setup import HOOK
from automl_ad.tuning.schedule import (
    Bounds,
    MethodInput,
    Plan,
    config_cost_factor,
    data_counts,
    make_plan,
    plan_with_calibration,
    recipe_for,
    val_images,
)
from automl_ad.tuning.space import SearchSpace, load_space, split_config
from automl_ad.tuning.trainable import (TrialContext, TrialDevices, allocated_devices, load_trial_data,
                                       make_trainable)
from automl_ad.evaluation.validation import build_val_anomalies, load_val_defects, save_image_set

DRIVER_RESOURCE = "TRAIN_DRIVER"  # declared by the on-demand node types in cluster/
_ACTIVE: dict[str, SearchProgress] = {}  # driver-process live views, by experiment dir


@dataclass
class SearchOptions:
    category: str
    budget: str
    data: Path | None = None
    methods: list[str] | None = None
    space_file: Path | None = None
    max_concurrent: int | None = None
    experiment: str | None = None
    resume: bool = False
    address: str | None = None
    storage: Path | str = "results"
    wandb: bool = False
    seed: int = 0
    image_size: int | None = None
    val_defects: Path | None = None
    use_train: bool = True
    gpus_per_trial: float = 1.0
    cpus_per_trial: float = 1.0
    # GPUs the search may hold at once; None: the GPUs in the cluster when it starts. On a
    # cluster whose autoscaler starts GPU nodes from zero, the most it can provide.
    max_gpus: float | None = None
    live: bool = True
    space_dir: Path | None = None
    # Measure the speeds the schedule rests on that this machine has not measured yet
    # (calibration.py); False: cached measurements and the prior only.
    calibrate: bool = True
    # "tpe": TPE + ASHA, started from each method's defaults; "random": Optuna's random
    # sampler, no early stopping and no warm start (a reference for benchmarks).
    searcher: str = "tpe"


SEARCHERS = ("tpe", "random")


@dataclass
class SearchSummary:
    experiment: str
    experiment_dir: Path
    trials: int
    best: dict[str, Any] | None
    budget_used: float
    budget: Budget
    category: str = ""


@dataclass(frozen=True)
class DevicePlan:
    """What a search asks the cluster for, decided once at its start."""

    use_gpu: bool
    gpus: float  # GPUs the search may hold at once
    autoscale_gpus: bool  # trials ask for GPUs the cluster does not have yet
    driver_resource: str | None  # custom resource the trial drivers ask for, if any
    max_concurrent: int


def plan_devices(budget: Budget, resources: Mapping[str, float], *, max_gpus: float | None = None,
                 gpus_per_trial: float = 1.0, cpus_per_trial: float = 1.0, use_train: bool = True,
                 max_concurrent: int | None = None) -> DevicePlan:
    """Devices, driver placement and concurrency of a search on a cluster with ``resources``
    (``ray.cluster_resources()``).

    ``max_gpus`` above the GPUs present means the autoscaler will add GPU nodes: trials
    then request GPUs that do not exist yet (the autoscaler's cue) and the CPUs present now
    do not bound concurrency, since the GPU nodes bring their own.
    """
    present_gpus = float(resources.get("GPU", 0.0))
    if max_gpus is not None and max_gpus < 0:
        raise UserError(f"--max-gpus {max_gpus:g}: must be 0 or more")
    gpus = present_gpus if max_gpus is None else float(max_gpus)
    if budget.kind == "device" and budget.device == "gpu" and gpus <= 0:
        cpu_text = budget.text.replace("gpu", "cpu")
        raise UserError(
            f"--budget {budget.text}: the Ray cluster has no GPU; use a CPU budget such as {cpu_text}, "
            "or pass --max-gpus N if its autoscaler starts GPU nodes"
        )
    use_gpu = gpus > 0 and budget.device != "cpu"
    if use_gpu and gpus_per_trial > gpus:
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g}: more than the {gpus:g} GPUs the search may use")
    autoscale_gpus = use_gpu and gpus > present_gpus
    driver_resource = DRIVER_RESOURCE if use_train and resources.get(DRIVER_RESOURCE, 0.0) >= 1 else None
    limits: list[float] = []
    if use_gpu:
        limits.append(gpus // gpus_per_trial)
    if not autoscale_gpus:
        per_trial_cpus = (1.0 if use_train and not driver_resource else 0.0) + cpus_per_trial
        limits.append(float(resources.get("CPU", 1.0)) // per_trial_cpus)
    if driver_resource:
        limits.append(float(resources[driver_resource]))
    fits = max(1, int(min(limits)))
    return DevicePlan(use_gpu=use_gpu, gpus=gpus if use_gpu else 0.0, autoscale_gpus=autoscale_gpus,
                      driver_resource=driver_resource, max_concurrent=max(1, min(max_concurrent or fits, fits)))


def storage_folder(storage: Path | str) -> Path:
    """The folder the results are read and written in: ``--storage`` itself (a path or a
    ``file://`` URI, local or a shared mount), or the local mirror of an ``s3://`` /
    ``gs://`` store (see ``automl_ad.results.remote_storage``). Other schemes: UserError."""
    return parse_storage(storage).local


@dataclass(frozen=True)
class Job:
    """One product's search in a many-product run."""

    category: str
    budget: str


def load_jobs(path: Path) -> list[Job]:
    """``--jobs FILE``: a YAML list of ``{category, budget}``, checked before anything runs."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--jobs file not found: {path}")
    try:
        items = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--jobs {path}: not valid YAML ({first})") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"--jobs {path}: expected a non-empty list of {{category, budget}} items")
    jobs: list[Job] = []
    for index, item in enumerate(items):
        where = f"--jobs {path}: item {index + 1}"
        if not isinstance(item, dict) or set(item) != {"category", "budget"}:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise UserError(f"{where}: expected exactly the keys category and budget, got {keys}")
        category, budget = str(item["category"]).strip(), str(item["budget"]).strip()
        if not category:
            raise UserError(f"{where}: empty category")
        try:
            parse_budget(budget)
        except UserError as exc:
            raise UserError(f"{where} ({category}): {exc}") from None
        if any(job.category == category for job in jobs):
            raise UserError(f"{where}: category {category!r} appears twice")
        jobs.append(Job(category, budget))
    return jobs


def all_categories(data: Path | None) -> list[str]:
    """``--category all``: every category folder under ``data``, else every built-in product."""
    if data is None:
        return list(BUILTIN_CATEGORIES)

    root = Path(data).expanduser()
    if not root.is_dir():
        raise UserError(f"--data folder not found: {root}")
    found = sorted(list_categories(root))
    if not found:
        raise UserError(f"--data {root}: no category folders (a category folder holds train/good/)")
    return found


def run_jobs(base: SearchOptions, jobs: Sequence[Job],
             on_done: Callable[[SearchSummary], None] | None = None) -> list[SearchSummary]:
    """One search per job, one after the other on the same Ray instance, each with its
    own budget, ledger and experiment folder (``<experiment>-<category>`` when
    ``base.experiment`` is set). ``on_done`` sees each summary as soon as it exists."""
    if not jobs:
        raise UserError("no categories to search")
    storage = parse_storage(base.storage)
    for job in jobs:  # every budget is checked before the first search starts
        parse_budget(job.budget)
    summaries = []
    for job in jobs:
        experiment = f"{base.experiment}-{job.category}" if base.experiment else None
        # A run stopped before this product's search began: start it instead of failing.
        resume = base.resume and _has_search(storage, job.category, experiment)
        summary = run_search(dataclasses.replace(base, category=job.category, budget=job.budget,
                                                 experiment=experiment, resume=resume))
        summaries.append(summary)
        if on_done is not None:
            on_done(summary)
    return summaries


def _has_search(storage: Storage, category: str, experiment: str | None) -> bool:
    if storage.is_remote:
        return storage.has_search(experiment) if experiment is not None else bool(storage.searches(category))
    if experiment is not None:
        return layout.has_record(storage.local / experiment)
    return any(layout.has_record(p) for p in storage.local.glob(f"{category}-*"))


def _trial_dirname(trial: Any) -> str:
    """Trial folders named by trial id, so results map back to ledger and store rows."""
    return trial.trial_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pick_experiment(opts: SearchOptions, spec: Storage) -> str:
    if opts.experiment:
        return opts.experiment
    storage = spec.local
    if opts.resume and spec.is_remote:
        found = spec.searches(opts.category)
        if not found:
            raise UserError(f"--resume: no search of category {opts.category!r} under {spec.uri}")
        return found[0]
    if opts.resume:
        candidates = sorted(
            (p for p in storage.glob(f"{opts.category}-*") if layout.has_record(p)),
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise UserError(f"--resume: no search of category {opts.category!r} under {storage}")
        return candidates[-1].name
    return f"{opts.category}-{time.strftime('%Y%m%d-%H%M%S')}"


# --- Ray pieces (module level so Tuner.restore can unpickle them by reference) ---------

class BudgetedOptunaSearch(OptunaSearch):
    """OptunaSearch that reserves budget before a trial starts and records
    ASHA-stopped trials as PRUNED (Ray records them as COMPLETE).

    With a ``plan``, a configuration is sampled first and reserves what the plan says it
    costs up to its first rung (the least it costs and still reports), scaled by its
    parameter count over the default Config's, times the ratio of used to planned cost
    over the trials that finished. A configuration whose setup and one validation alone
    would block more than the budget / min_trials (``Plan.too_heavy``: the paper-width
    DRAEM on a 10-minute CPU budget) is told FAIL and the next one sampled. While other trials run, a sampled
    configuration the rest cannot hold waits (the next suggestion offers it again, so the
    sequence stays the seed's); when none runs it starts as long as any budget is left
    (the budget deadline stops it). A configuration still waiting when the budget is
    spent is told to Optuna as FAIL.
    """

    def __init__(self, *args: Any, ledger: Ledger, max_epochs: int, plan: Plan | None = None,
                 devices_per_trial: float = 1.0, default_image_size: int = 128, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger
        self.max_epochs = max_epochs
        self.plan = plan
        self.devices_per_trial = devices_per_trial
        self.default_image_size = default_image_size
        self._live: set[str] = set()
        self._pending: tuple[str, dict] | None = None
        self._planned: dict[str, tuple[str, int, str | None]] = {}
        self._rounds: dict[str, int] = {}

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

    def _tell_not_run(self, trial_id: str, reason: str) -> None:
        """Close a sampled configuration that never runs as FAIL in the study."""
        ot_trial = self._ot_trials.pop(trial_id, None)
        if ot_trial is None:
            return
        import optuna

        try:
            ot_trial.set_user_attr("not_run", reason)
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        except Exception:  # already closed in optuna.db (a restore): nothing to undo
            pass

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
            for _ in range(self.MAX_SKIPS):
                config = super().suggest(trial_id)
                if not isinstance(config, dict):
                    return config  # None (wait) or FINISHED
                reason = self._too_heavy(config)
                if reason is None:
                    break
                self._tell_not_run(trial_id, f"not run: {reason}")
                if not self._live and self.ledger.remaining() < self._cheapest():
                    return Searcher.FINISHED  # not even the cheapest planned trial fits what is left
            else:
                return None if self._live else Searcher.FINISHED
        else:
            old_id, config = pending
            if old_id != trial_id and old_id in self._ot_trials:
                self._ot_trials[trial_id] = self._ot_trials.pop(old_id)
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
        if not hasattr(self, "_planned"):
            self._planned, self._rounds = {}, {}
        self._planned[trial_id] = self._config_key(config)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        try:
            super().on_trial_result(trial_id, result)
        except (KeyError, optuna.exceptions.UpdateFinishedTrialError):
            # After a restore the searcher's snapshot can be older than the study in
            # optuna.db: a trial it thinks is running may already be closed there.
            pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._live.discard(trial_id)
        if hasattr(self, "_rounds"):
            self._rounds[trial_id] = int((result or {}).get("epoch", 0) or 0)
        if trial_id not in self._ot_trials:
            return  # a trial restored from before a restart that Optuna already closed
        if result and not error and int(result.get("epoch", 0) or 0) < self.max_epochs:
            result = None  # no value and no error -> Optuna marks it PRUNED
        super().on_trial_complete(trial_id, result, error)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_live"] = set()
        return state


class BudgetStopper(Stopper):
    """Stops a running trial at its next report once a device/wall budget is spent."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.ledger.budget.kind != "trials" and self.ledger.exhausted()

    def stop_all(self) -> bool:
        return False


class _DriverCallback(Callback):
    """A driver-side callback whose ``_``-prefixed state lives in this process only: it is
    left out when Tune pickles the experiment and rebuilt by ``_reset`` on a restore."""

    def _reset(self) -> None:
        pass

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()


def _running(trials: Sequence[Any]) -> list[Any]:
    return [trial for trial in trials if trial.status == "RUNNING"]


class LedgerCallback(_DriverCallback):
    """Charges each trial's allocated devices x wall time to the ledger, only while this
    driver runs it: at its start, every report, every second while it runs, and its end."""

    def __init__(self, ledger: Ledger, devices_of: Callable[[Mapping[str, Any] | None], float]) -> None:
        self.ledger = ledger
        self.devices_of = devices_of
        self._reset()

    def _reset(self) -> None:
        self._started: dict[str, float] = {}
        self._base: dict[str, float] = {}
        self._last_tick = 0.0

    def _begin(self, tid: str) -> None:
        entry = self.ledger.trial(tid) or {}
        self._base[tid] = float(entry.get("wall_s", 0.0))
        self._started[tid] = time.monotonic()

    def _charge(self, trial: Any, finished: bool = False) -> None:
        tid = trial.trial_id
        if tid not in self._started:
            self._begin(tid)
        wall = self._base[tid] + time.monotonic() - self._started[tid]
        self.ledger.record(tid, self.devices_of(trial.config), wall, finished=finished)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._begin(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._charge(trial)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last_tick >= 1.0:
            self._last_tick = now
            self.ledger.tick()
            # Charge running trials as time passes, not only at their reports: Tune asks
            # the stopper before it calls on_trial_result, so the stopper must already
            # see the time spent up to this report.
            for trial in _running(trials):
                self._charge(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._charge(trial, finished=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._charge(trial, finished=True)


class DeadlineClockCallback(_DriverCallback):
    """Device and wall budgets: the BudgetClock actor that tells every trial when the
    budget runs out if the trials running now go on (``budget.DeadlineWatch`` reads it)."""

    def __init__(self, experiment_dir: Path, ledger: Ledger,
                 devices_of: Callable[[Mapping[str, Any] | None], float]) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.ledger = ledger
        self.devices_of = devices_of
        self._reset()

    def _reset(self) -> None:
        self._clock = None
        self._last_tick = 0.0

    def setup(self, **info):
        # Before any trial starts, so each trial's DeadlineWatch finds the clock.
        self._clock = start_clock(self.experiment_dir)
        self._publish([])

    def on_experiment_end(self, trials, **info):
        if self._clock is not None:  # one idle process per search otherwise (--category all)
            import ray

            ray.kill(self._clock)
            self._clock = None

    def _publish(self, running: Sequence[Any]) -> None:
        if self._clock is not None:
            self._clock.set.remote(self.ledger.projected_end(sum(self.devices_of(t.config) for t in running)))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._publish([t for t in trials if t.status == "RUNNING" or t is trial])

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last_tick >= 1.0:
            self._last_tick = now
            self._publish(_running(trials))


def _status(trial: Any, max_epochs: int) -> str:
    """How an ended trial ended: finished (all rounds) or stopped (ASHA, the budget)."""
    return "finished" if int((trial.last_result or {}).get("epoch", 0) or 0) >= max_epochs else "stopped"


class LiveViewCallback(_DriverCallback):
    """Feeds the driver's live table (``SearchProgress``) with every trial's state."""

    def __init__(self, experiment_dir: Path, max_epochs: int) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.max_epochs = max_epochs

    def _update(self, trial: Any, status: str, result: Mapping[str, Any] | None) -> None:
        progress = _ACTIVE.get(str(self.experiment_dir))
        if progress is not None:
            progress.update(trial.trial_id, trial.config, status, result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "RUNNING", None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trial, _status(trial, self.max_epochs), dict(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "error", dict(trial.last_result or {}))


class StoreCallback(_DriverCallback):
    """Hands each ended trial to the store (``finalize_trial``), then pushes the experiment
    to its bucket. After LedgerCallback, which has charged the trial's last seconds."""

    def __init__(self, experiment_dir: Path, ledger: Ledger, context: TrialContext, device_kind: str,
                 fingerprints: dict[int, str], storage: Storage | None = None) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.storage = storage  # an object store the experiment folder mirrors, else None
        self.ledger = ledger
        self.context = context
        self.device_kind = device_kind
        self.fingerprints = fingerprints
        self._reset()

    def _reset(self) -> None:
        self._first_start: dict[str, dt.datetime] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._first_start.setdefault(trial.trial_id, _now())

    def _end(self, trial: Any, status: str) -> None:
        result = dict(trial.last_result or {})
        checkpoint = _checkpoint_location(result.get("checkpoint_path"), trial.checkpoint, self.storage)
        wall = (self.ledger.trial(trial.trial_id) or {}).get("wall_s")
        finalize_trial(self.experiment_dir, self.context, self.context.category, trial.trial_id,
                       dict(trial.config), result, checkpoint, status, wall, self.ledger, self.device_kind,
                       self.fingerprints, started=self._first_start.get(trial.trial_id), storage=self.storage)
        if self.storage is not None:
            self.storage.push_quietly(self.context.experiment)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, _status(trial, self.context.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "error")


def driver_callbacks(folder: Path, ledger: Ledger, context: TrialContext, device_kind: str,
                     fingerprints: dict[int, str], storage: Storage | None) -> list[Callback]:
    """The search driver's callbacks, in the order Tune must call them: the ledger first
    (the store reads the time it charged), the clock (device and wall budgets only)."""
    devices = TrialDevices(context, device_kind)
    # A trial that found the disk full ends the search first, before the ledger and store write.
    callbacks: list[Callback] = [interrupt.StopOnFullDisk(folder), LedgerCallback(ledger, devices)]
    if ledger.budget.kind != "trials":
        callbacks.append(DeadlineClockCallback(folder, ledger, devices))
    return callbacks + [LiveViewCallback(folder, context.max_epochs),
                        StoreCallback(folder, ledger, context, device_kind, fingerprints, storage)]


# --- finishing trials ----------------------------------------------------------------

def _checkpoint_location(reported: str | None, checkpoint: Any, storage: Storage | None) -> str | None:
    """Where a trial's last checkpoint is, as a local path or a ``s3://``/``gs://`` URI
    (Ray gives object-store paths without their scheme)."""
    if reported:
        return storage.as_uri(reported) if storage is not None else reported
    if checkpoint is None:
        return None
    from pyarrow.fs import LocalFileSystem

    filesystem = getattr(checkpoint, "filesystem", None)
    if filesystem is None or isinstance(filesystem, LocalFileSystem):
        return checkpoint.path
    return f"{filesystem.type_name.replace('gcs', 'gs')}://{checkpoint.path}"


def evaluate_tests(folder: Path, context: TrialContext, log: Callable[[str], None] | None = None) -> int:
    """Test metrics of every stored trial that has none yet, from its checkpoint, written
    into its row (``store.set_test_metrics``). Run by the driver after the search: the
    budget buys trials, and a test evaluation is neither charged nor delays the next
    trial. Reported, never used for selection. Returns the trials evaluated."""
    import tempfile

    import torch
    from ray.train import Checkpoint

    pending = store.needs_test_metrics(folder)
    rows = {str(r["trial_id"]): r for r in store.read_table(folder).to_pylist()}
    # The trials the val set cannot tell from the best are the ones the model choice may
    # ship: their test predictions are kept so it need not score the test set again.
    ranked = [r for r in leaderboard.ranked(list(rows.values())) if r.get("status") != "error"]
    shippable = {str(r["trial_id"]) for r in ranked if ranked and leaderboard.tied_with_best(r, ranked[0])}
    data_by_size: dict[int, Any] = {}
    for index, trial_id in enumerate(pending, 1):
        row = rows[trial_id]
        size = int(row["image_size"])
        if size not in data_by_size:
            data_by_size[size] = load_trial_data(context, size)[0]
        data = data_by_size[size]
        if not len(data.test):
            return 0  # a product without a test split: nothing to report, for any trial
        began = time.monotonic()
        try:
            with tempfile.TemporaryDirectory() as scratch:
                Checkpoint(str(row["checkpoint"])).to_directory(scratch)
                method, _ = load_trained_method(Path(scratch), context.category, "cpu")
                kept: dict[str, Any] = {}
                metrics = evaluate(method, data.test, torch.device("cpu"), kept=kept)
            store.set_test_metrics(folder, trial_id, metrics)
            if trial_id in shippable:
                layout.write_test_predictions(folder, trial_id, kept["scores"], kept["maps"])
        except Exception as exc:  # a broken checkpoint must not stop the others
            store.set_test_metrics(folder, trial_id, {}, error=f"test evaluation failed: {type(exc).__name__}: {exc}")
        if log is not None:
            log(f"test metrics (reported, never used): trial {trial_id} [{index}/{len(pending)}] "
                f"{row['method']} at {size} px, {len(data.test)} images, {time.monotonic() - began:.1f} s")
    return len(pending)


def finalize_trial(experiment_dir: Path, context: TrialContext, category: str, trial_id: str,
                   config: dict[str, Any], result: dict[str, Any], checkpoint: str | None, status: str,
                   wall_s: float | None, ledger: Ledger, device_kind: str, fingerprints: dict[int, str],
                   started: dt.datetime | None = None, storage: Storage | None = None) -> None:
    """Hand a trial's outcome (and its epoch reports) to the store; its test metrics come
    after the search (``evaluate_tests``). Idempotent: a rewrite replaces the same file."""
    if "method" not in config:
        return
    split = split_config(config, context.default_image_size)
    error = None
    entry = ledger.trial(trial_id) or {}
    outcome = store.TrialOutcome(
        experiment=context.experiment, category=category, trial_id=trial_id, method=split.method,
        backbone=split.method_params.get("backbone") or _default_backbone(split.method),
        synthesis=split.synthesis, image_size=split.image_size, params=config, status=status, result=result,
        max_epochs=context.max_epochs, wall_s=float(wall_s if wall_s is not None else entry.get("wall_s", 0.0)),
        devices=TrialDevices(context, device_kind)(config), device_kind=device_kind,
        budget_used=float(entry.get("used", 0.0)), seed=context.seed,
        # Inside the experiment: relative, so any copy or mirror of it finds the file.
        checkpoint=storage.relative_to_experiment(checkpoint, context.experiment) if storage else checkpoint,
        data_fingerprint=fingerprints.get(split.image_size), started=started, ended=_now(), error=error,
    )
    store.store_trial(experiment_dir, outcome, _saved_reports(checkpoint))


def _default_backbone(method: str) -> str | None:
    """The backbone a method uses when the search does not choose one."""
    for config_field in dataclasses.fields(get_method_class(method).Config):
        if config_field.name == "backbone" and isinstance(config_field.default, str):
            return config_field.default
    return None


def _saved_reports(checkpoint: str | None) -> list[dict[str, Any]]:
    """The epoch reports saved inside the trial's checkpoint ([] without a readable one)."""
    if not checkpoint:
        return []
    import tempfile

    from ray.train import Checkpoint

    try:
        with tempfile.TemporaryDirectory() as folder:
            Checkpoint(checkpoint).to_directory(folder)
            return list(layout.read_checkpoint(Path(folder)).get("reports", []))
    except Exception:
        return []


# --- the schedule ----------------------------------------------------------------------

def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _trial_shape(opts: SearchOptions, devices: DevicePlan) -> dict[str, Any]:
    """The TrialContext fields that say what one trial holds."""
    use_gpu = devices.use_gpu
    return {
        # More than one GPU per trial: one Train worker per GPU, gradients averaged
        # each step (automl_ad.training.distributed); fractional GPUs share one worker.
        "num_workers": int(opts.gpus_per_trial) if use_gpu and opts.gpus_per_trial >= 2 else 1,
        "use_gpu": use_gpu,
        "cpus_per_worker": opts.cpus_per_trial,
        "gpus_per_worker": (1.0 if opts.gpus_per_trial >= 2 else opts.gpus_per_trial) if use_gpu else 0.0,
        "driver_resource": devices.driver_resource,
    }


def method_inputs(space: SearchSpace, val_good: int) -> list[Any]:
    """What the planner needs to know of each method of ``space``."""
    out = []
    for name, method_space in sorted(space.methods.items()):
        cls = get_method_class(name)
        searched = method_space.params.get("backbone")
        default = _default_backbone(name)
        if searched is not None and searched.type == "categorical":
            choices = [str(b) for b in searched.choices]
            # the Config's default first: the one a calibration times
            backbones: tuple[str | None, ...] = tuple(sorted(choices, key=lambda b: b != default))
        else:
            backbones = (default,)
        family = method_space.synthesis[0] if method_space.synthesis else None
        out.append(MethodInput(name=name, trainable=bool(tuple(cls.phases)), recipe=recipe_for(name),
                               sizes=tuple(space.method_sizes(name)), backbones=backbones,
                               val_images=val_images(family, val_good)))
    return out


def plan_schedule(opts: SearchOptions, budget: Budget, space: SearchSpace, data_root: Path, devices: DevicePlan,
                  *, calibrate: bool = True, log: Callable[[str], None] | None = None) -> Plan:
    """The search's schedule (``schedule.make_plan``) for ``devices``: speeds measured on
    this machine's device when it has it (``calibrate``: measure what is missing first),
    else the project's prior for the device kind."""
    kind = "gpu" if devices.use_gpu else "cpu"
    if kind == "gpu":
        import torch

        device, threads = ("cuda:0" if torch.cuda.is_available() else None), 1
    else:
        device, threads = "cpu", max(1, int(opts.cpus_per_trial))
    counts = data_counts(data_root, opts.category)
    methods = _with_learned_costs(method_inputs(space, counts.val_good), device, threads)
    fidelity = space.fidelity
    bounds = Bounds(rounds=fidelity.max_epochs, grace_period=fidelity.grace_period,
                    reduction_factor=fidelity.reduction_factor, steps_per_epoch=fidelity.steps_per_epoch,
                    batch_size=fidelity.batch_size, min_steps=fidelity.min_steps, max_steps=fidelity.max_steps,
                    min_trials=fidelity.min_trials)
    speeds = SpeedBook(kind, device, threads, trainable={m.name: m.trainable for m in methods})
    # Speeds decide nothing when the steps are fixed and every method has one size.
    needed = not bounds.steps_per_epoch or any(len(m.sizes) > 1 for m in methods)
    probe = trial_context(opts, devices, space)  # what one trial holds, before there is a schedule
    options = dict(category=opts.category, devices_per_trial=allocated_devices(probe, kind),
                   concurrency=devices.max_concurrent, workers=probe.num_workers, use_train=opts.use_train,
                   keep_all=bool(opts.methods))  # methods the user named stay, however short their schedule
    plan = plan_with_calibration(budget, methods, bounds, speeds, counts, calibrate=calibrate and needed, log=log,
                                 **options)
    # What a drawn configuration costs changes the count of trials, not what joins the
    # plan: it is worked out for the methods that joined (costing one takes ~0.4 s).
    planned = {e.method for e in plan.entries}
    data = dataclasses.asdict(counts)
    methods = [dataclasses.replace(m, sampled_cost=sampled_cost_factors(space, m.name, data))
               if m.name in planned else m for m in methods]
    return make_plan(budget, methods, bounds, speeds, counts, **options)


def _with_learned_costs(methods: list[Any], device: str | None, threads: int) -> list[Any]:
    """``methods`` with what earlier searches' trials cost on this machine against their
    plans (learned_costs)."""
    learned = learned_costs.factors(learned_costs.machine_key(device, threads)) if device else {}
    return [dataclasses.replace(m, learned=learned.get(m.name, (1.0, 0))[0],
                                learned_trials=learned.get(m.name, (1.0, 0))[1]) for m in methods]


def _learn_costs(folder: Path, opts: SearchOptions, devices_gpu: bool) -> None:
    """Keep what this search's finished trials cost against their plan (learned_costs),
    for the next plan on this machine; a plan without a measured device learns nothing."""
    plan_dict = (layout.read_record(folder) if layout.has_record(folder) else {}).get("plan")
    if not plan_dict or plan_dict.get("budget_kind") == "trials":
        return
    if devices_gpu:
        import torch

        device, threads = ("cuda:0" if torch.cuda.is_available() else None), 1
    else:
        device, threads = "cpu", max(1, int(opts.cpus_per_trial))
    if device is None:
        return
    plan = Plan.from_dict(plan_dict)
    default_size = plan.all_sizes()[0] if plan.entries else 128
    seen = []
    for row in store.read_table(folder).to_pylist():
        if row.get("status") != "finished" or not row.get("wall_s") or not row.get("params"):
            continue
        split = split_config(json.loads(row["params"]), default_size)
        entry = plan.entry(split.method, split.image_size)
        if entry is None:
            continue
        backbone = split.method_params.get("backbone")
        factor = config_cost_factor(split.method, split.method_params, split.image_size, plan.data)
        seconds = plan.seconds_at(split.method, split.image_size, str(backbone) if backbone else None,
                                  int(row.get("epochs") or plan.rounds), factor)
        if seconds:
            seen.append((split.method, seconds / max(entry.learned_factor, 1e-9), float(row["wall_s"]),
                         f"{row.get('experiment')}/{row.get('trial_id')}"))
    try:
        learned_costs.record(learned_costs.machine_key(device, threads), seen)
    except OSError as error:  # a read-only home: the next plan keeps the calibrated costs
        print(f"notice: trial costs not kept for later plans ({error})", file=sys.stderr)


def preview_plan(opts: SearchOptions) -> Plan:
    """``search --plan``: the schedule a search with ``opts`` would run, without Ray and
    without training (unless ``opts.calibrate``). The devices are this machine's; a GPU
    budget on a machine without one is planned for ``--max-gpus`` GPUs (default 1) with
    the GPU prior."""
    budget = parse_budget(opts.budget)
    if opts.resume:  # the schedule the search runs is the one it stored
        spec = parse_storage(opts.storage)
        if spec.is_remote:
            raise UserError("--plan --resume reads the stored plan from a local --storage folder only")
        folder = store.experiment_dir(spec.local, _pick_experiment(opts, spec))
        saved = layout.read_record(folder) if layout.has_record(folder) else {}
        if not saved.get("plan"):
            raise UserError(f"--resume: no stored plan in {layout.record_path(folder)}")
        return Plan.from_dict(saved["plan"])
    space = load_space(opts.methods, opts.space_file, **({"space_dir": opts.space_dir} if opts.space_dir else {}),
                       image_size=opts.image_size)
    data_root = resolve_data_root(opts.data, opts.category)
    resources = _local_resources()
    max_gpus = opts.max_gpus
    if max_gpus is None and budget.device == "gpu" and resources["GPU"] == 0:
        max_gpus = max(1.0, opts.gpus_per_trial)
    devices = plan_devices(budget, resources, max_gpus=max_gpus, gpus_per_trial=opts.gpus_per_trial,
                           cpus_per_trial=opts.cpus_per_trial, use_train=opts.use_train,
                           max_concurrent=opts.max_concurrent)
    return plan_schedule(opts, budget, space, data_root, devices, calibrate=opts.calibrate, log=_log)


def _local_resources() -> dict[str, float]:
    """What a local Ray instance started here would offer."""
    import torch

    return {"CPU": float(os.cpu_count() or 1),
            "GPU": float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0}


# --- the driver ------------------------------------------------------------------------

def _init_ray(opts: SearchOptions) -> bool:
    """Start (or join) Ray unless this process already has it; True when it started here."""
    import ray

    # A trial the budget deadline stops inside its first epoch reports nothing, which
    # Tune accepts, except that its final result carries the flattened config and so
    # fails Tune's "objective missing" check (tune_controller._validate_result_metrics).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if ray.is_initialized():
        return False

    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": _worker_env(opts), "worker_process_setup_hook": HOOK},
                              "log_to_driver": False}
    if opts.address:
        ray.init(address=opts.address, **kwargs)
    else:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kwargs)
    return True


_STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def _worker_env(opts: SearchOptions) -> dict[str, str]:
    """Environment variables every Ray worker of the search gets."""
    env = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    env.update(_train_env(local=not opts.address))
    # Where the bucket is (an S3-compatible endpoint, a region) must reach trials on other
    # nodes; credentials never travel this way: nodes use their own role or service account.
    env.update({key: os.environ[key] for key in _STORAGE_ENV if key in os.environ})
    # Workers must import automl_ad even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")] if p
    )
    return env


def _train_env(local: bool) -> dict[str, str]:
    """Ray Train V2 settings that cut each trial's TorchTrainer start/stop latency
    (measured in docs/search.md, Overhead); a value the user exported wins.

    On a single machine only. The controller polls its workers every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default); reports reach Tune and a finished
    worker is noticed only at a poll, which cost about 4 s per trial. Polling fast also
    means a controller notices its worker die while Tune is killing the trial and asks
    for a new worker group before it dies itself; that placement group then stays
    reserved (Ray 2.60). Trials on a single machine therefore run with no Train retries
    (``TrialContext.train_retries``); on a cluster, where retries recover lost nodes,
    the default interval is kept. Nothing preempts a single machine either, so its
    per-trial PreemptionWatcher actor (one more process start per trial) is left off.
    """
    if not local:
        return {}
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


def _prepare_val_sets(context: TrialContext, image_sizes: tuple[int, ...], data_root: Path) -> dict[int, str]:
    """Frozen val anomalies per image size, made once (seeded) and saved; fingerprints."""
    fingerprints = {}
    for size in image_sizes:
        data = load_category(data_root, context.category, size, seed=context.seed, cache_dir=context.cache_dir)
        fingerprints[size] = data.fingerprint
        path = context.val_anomalies_path(size)
        if not path.exists():
            save_image_set(build_val_anomalies(data, seed=context.seed), path)
        if context.val_defects:
            load_val_defects(Path(context.val_defects), size)  # bad folder: fail before the search
    return fingerprints


def warm_start_points(space: SearchSpace, schedule: Plan) -> list[dict[str, Any]]:
    """The first configurations a TPE search runs: every planned method at its defaults
    (the papers' settings). A method that trains runs at its planned size nearest the
    paper's (the size its schedule was measured at); a method that trains nothing runs at
    its largest planned size, once per searchable backbone: a memory bank's only knobs that
    matter much are its features and their resolution (a finer patch grid resolves smaller
    defects), and the plan only keeps sizes the budget affords (docs/search.md, "Warm
    start", has the measurement). Methods that train nothing come first
    (cheap, strong), then the others, cheapest full trial first. No data is looked at:
    these are priors. A method whose cheapest full trial would take more than the share
    of the budget one trial may block (``Plan.heavy_limit_s``: budget / min_trials) gets no
    warm start: a prior that costs a quarter of a 15-minute budget (CFA on a CPU, which
    then tested 0.55 on KolektorSDD) is not where a small budget pays; TPE may still
    sample it."""
    def full_cost(method: str) -> float:
        return min(e.full_s for e in schedule.entries if e.method == method)

    def trains(method: str) -> bool:
        return recipe_for(method).epochs > 0

    limit = schedule.heavy_limit_s
    methods = sorted((m for m in space.methods if limit is None or not trains(m) or full_cost(m) <= limit),
                     key=lambda m: (trains(m), full_cost(m), m))
    points = []
    for method in methods:
        point = space.defaults(method)
        if space.sizes_searched(method):
            sizes, paper = space.method_sizes(method), recipe_for(method).image_size
            point[f"{method}.image_size"] = (min(sizes, key=lambda size: (abs(size - paper), size)) if trains(method)
                                             else max(sizes))
        backbone = space.methods[method].params.get("backbone")
        if not trains(method) and backbone is not None and backbone.type == "categorical":
            ordered = [backbone.default] + [b for b in backbone.choices if b != backbone.default]
            points.extend({**point, f"{method}.backbone": b} for b in ordered)
        else:
            points.append(point)
    return points


def _check_resume(folder: Path, opts: SearchOptions, record: dict[str, Any]) -> None:
    saved = layout.read_record(folder)
    for key in ("category", "budget", "seed", "searcher"):
        if saved.get(key, "tpe" if key == "searcher" else None) != record.get(key):
            raise UserError(
                f"--resume: {key} {record.get(key)!r} differs from {saved.get(key)!r} in {layout.record_path(folder)}"
            )


def _lock_experiment(folder: Path, experiment: str, resume: bool) -> DriverLock:
    """The experiment's driver lock (``automl_ad.tuning.lock``); for a new search, also
    checks that no other driver made the experiment in the meantime."""
    lock = acquire_lock(folder, experiment)
    if not resume and layout.has_record(folder):
        lock.release()
        raise UserError(f"experiment {experiment!r} was started by another driver just now; pass a new --experiment")
    return lock


@dataclass
class _Prepared:
    """A search checked and placed, before Ray starts (``_prepare``)."""

    opts: SearchOptions
    budget: Budget
    space: SearchSpace
    data_root: Path
    experiment: str
    folder: Path  # the experiment folder the driver reads and writes (the mirror, on a bucket)
    remote: Storage | None  # the object store the folder mirrors, if any
    record: dict[str, Any]  # the search record, completed by _plan

    @property
    def tune_root(self) -> str:
        """Where Tune keeps its state and trial checkpoints: on a bucket, the bucket itself,
        so a trial lost with its node resumes from there."""
        return self.remote.experiment_uri(self.experiment) if self.remote is not None else str(self.folder)


def run_search(opts: SearchOptions) -> SearchSummary:
    """Run (or resume) one search; returns a summary once the budget is spent."""
    prep = _prepare(opts)
    lock = _lock_experiment(prep.folder, prep.experiment, opts.resume)
    started_ray = False
    try:
        started_ray = _init_ray(opts)
        interrupt.watch(prep.experiment, prep.folder)  # SIGINT/SIGTERM: stop cleanly, say how to resume
        devices = _plan_devices(prep)
        schedule, space = _plan(prep, devices)
        context = trial_context(opts, devices, space, schedule=schedule, experiment=prep.experiment,
                                folder=prep.folder, data_root=prep.data_root, remote=prep.remote)
        fingerprints = _prepare_val_sets(context, space.all_image_sizes(), prep.data_root)
        if prep.remote is not None:
            prep.remote.push(prep.experiment)  # the search record and val sets: a resume can start from them
        _forget_cached_ledger(prep.folder)
        ledger = shared_ledger(prep.folder, prep.budget)
        device_kind = "gpu" if devices.use_gpu else "cpu"
        results = _tune(prep, context, schedule, space, ledger, devices, fingerprints)
        interrupt.raise_if_stopped(prep.folder)  # a stopped search is resumed, never collected as done
        return _collect(prep, context, results, ledger, device_kind, fingerprints)
    except BaseException:
        if started_ray:  # a refused or failed search leaves no Ray instance behind in the caller
            import ray

            ray.shutdown()
        raise
    finally:
        lock.release()


def _prepare(opts: SearchOptions) -> _Prepared:
    """Every check that needs no Ray, the experiment chosen, the bucket synced to its mirror."""
    budget = parse_budget(opts.budget)
    space: SearchSpace = load_space(
        opts.methods, opts.space_file, **({"space_dir": opts.space_dir} if opts.space_dir else {}),
        image_size=opts.image_size,
    )
    data_root = resolve_data_root(opts.data, opts.category)
    category_folder(data_root, opts.category)  # a missing product is refused before Ray starts
    check_product(data_root, opts.category)  # so is one too small to split into fit and val
    if not opts.address:  # the local Ray instance will see this machine: refuse what it cannot run first
        plan_devices(budget, _local_resources(), max_gpus=opts.max_gpus, gpus_per_trial=opts.gpus_per_trial,
                     cpus_per_trial=opts.cpus_per_trial, use_train=opts.use_train, max_concurrent=opts.max_concurrent)
    if opts.val_defects is not None and not Path(opts.val_defects).is_dir():
        raise UserError(f"--val-defects folder not found: {opts.val_defects}")
    spec = parse_storage(opts.storage)
    experiment = _pick_experiment(opts, spec)
    folder = store.experiment_dir(spec.local, experiment)
    remote = spec if spec.is_remote else None
    if remote is not None:
        # The bucket is the truth; the mirror is a cache of it on this machine.
        if opts.resume and remote.has_search(experiment):
            remote.pull(experiment, skip=DRIVER_NOT_PULLED)
        elif not opts.resume and remote.has_search(experiment):
            raise UserError(f"experiment {experiment!r} exists in {remote.uri}; pass --resume or a new --experiment")
        elif not opts.resume:
            remote.forget_mirror(experiment)
    if opts.searcher not in SEARCHERS:
        raise UserError(f"--searcher {opts.searcher!r}: choose from {', '.join(SEARCHERS)}")
    record = {"category": opts.category, "budget": budget.text, "seed": opts.seed, "searcher": opts.searcher,
              "methods": sorted(space.methods), "image_sizes": list(space.image_sizes),
              "data": str(data_root), "fidelity": dataclasses.asdict(space.fidelity)}
    if opts.resume:
        if not layout.has_record(folder):
            raise UserError(f"--resume: no search in {folder}")
        _check_resume(folder, opts, record)
    elif layout.has_record(folder):
        raise UserError(f"experiment {experiment!r} exists in {spec.local}; pass --resume or a new --experiment")
    return _Prepared(opts, budget, space, data_root, experiment, folder, remote, record)


def _plan_devices(prep: _Prepared) -> DevicePlan:
    """The devices of the search on the Ray cluster now running."""
    import ray

    opts = prep.opts
    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    devices = plan_devices(prep.budget, resources, max_gpus=opts.max_gpus, gpus_per_trial=opts.gpus_per_trial,
                           cpus_per_trial=opts.cpus_per_trial, use_train=opts.use_train,
                           max_concurrent=opts.max_concurrent)
    if devices.autoscale_gpus:
        print(f"notice: the cluster has {resources.get('GPU', 0.0):g} GPUs now; trials will ask for up to "
              f"{devices.gpus:g} and wait while the autoscaler starts GPU nodes", file=sys.stderr)
    return devices


def _plan(prep: _Prepared, devices: DevicePlan) -> tuple[Plan, SearchSpace]:
    """The schedule (the stored one on a resume) and the space it leaves to sample; the
    search record, completed with both, is written."""
    opts = prep.opts
    saved = layout.read_record(prep.folder) if opts.resume else {}
    if saved.get("plan"):
        schedule = Plan.from_dict(saved["plan"])  # never re-planned: the trials so far ran this
    else:
        schedule = plan_schedule(opts, prep.budget, prep.space, prep.data_root, devices, calibrate=opts.calibrate,
                                 log=_log if opts.live else None)
    if opts.live:
        print(schedule.text(), flush=True)
    # Methods the plan left out (too expensive to train usefully on this budget) are not sampled.
    space = dataclasses.replace(prep.space, methods={n: m for n, m in prep.space.methods.items()
                                                     if schedule.sizes(n)})
    space = space.with_sizes({name: schedule.sizes(name) for name in space.methods})
    prep.record.update(methods=sorted(space.methods), plan=schedule.to_dict(),
                       image_sizes=list(space.all_image_sizes()))
    layout.write_record(prep.folder, prep.record)
    return schedule, space


def trial_context(opts: SearchOptions, devices: DevicePlan, space: SearchSpace, *, schedule: Plan | None = None,
                  experiment: str = "", folder: Path | None = None, data_root: Path | None = None,
                  remote: Storage | None = None) -> TrialContext:
    """What every trial of a search with ``opts`` on ``devices`` is told: the one place
    SearchOptions becomes a TrialContext. Without a ``schedule`` (while planning one):
    the fidelity's rounds, and no experiment folder."""
    fidelity = space.fidelity
    return TrialContext(
        experiment=experiment,
        experiment_dir=str(folder) if folder is not None else "",
        category=opts.category,
        data_root=str(data_root) if data_root is not None else "",
        seed=opts.seed,
        default_image_size=space.image_sizes[0],
        max_epochs=schedule.rounds if schedule is not None else fidelity.max_epochs,
        steps_per_epoch=fidelity.steps_per_epoch,
        batch_size=fidelity.batch_size or 8,
        val_defects=str(Path(opts.val_defects).resolve()) if opts.val_defects else None,
        use_train=opts.use_train,
        **_trial_shape(opts, devices),
        wandb=opts.wandb,
        storage_uri=remote.experiment_uri(experiment) if remote is not None else None,
        train_retries=1 if opts.address else 0,
        schedule=schedule.schedule() if schedule is not None else None,
    )


def _tune(prep: _Prepared, context: TrialContext, schedule: Plan, space: SearchSpace, ledger: Ledger,
          devices: DevicePlan, fingerprints: dict[int, str]) -> Any:
    """Run the tuner (a new one, or the interrupted one restored) until the budget is
    spent, with the live view up meanwhile; Tune's results."""
    from ray import tune

    folder = prep.folder
    progress = SearchProgress(ledger=ledger, max_epochs=context.max_epochs, used_at_start=ledger.used())
    _ACTIVE[str(folder)] = progress
    trainable = make_trainable(context)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # resume close to where a kill hit
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ledger.start_session()
    live = _start_live(progress) if prep.opts.live else None
    try:
        tune_path = layout.tune_path(prep.tune_root)
        if prep.opts.resume:
            # A trial whose row file is damaged is set aside here, so it counts as not
            # stored and is stored again from its checkpoint (_store_missing) or re-run.
            store.check_tables(folder)
        if prep.opts.resume and tune.Tuner.can_restore(tune_path):
            tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
            known = {Path(r.path).name for r in tuner.get_results()} | store.stored_trial_ids(folder)
            ledger.mark_lost(set(ledger.trials()) - known)
        else:
            tuner = _new_tuner(prep, context, schedule, space, ledger, devices, fingerprints, trainable)
        return tuner.fit()
    finally:
        ledger.end_session()
        if live is not None:
            live.stop()
        _ACTIVE.pop(str(folder), None)


def _new_tuner(prep: _Prepared, context: TrialContext, schedule: Plan, space: SearchSpace, ledger: Ledger,
               devices: DevicePlan, fingerprints: dict[int, str], trainable: Any) -> Any:
    """A Tuner: Optuna (TPE from the warm-start points, or random) reserving budget per
    trial, ASHA (or FIFO for random), the budget stopper and the driver's callbacks."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    opts, budget = prep.opts, prep.budget
    device_kind = "gpu" if devices.use_gpu else "cpu"
    warm: list[dict[str, Any]] = []
    if opts.searcher == "tpe":
        warm = warm_start_points(space, schedule)
        warm = warm[: int(budget.amount)] if budget.kind == "trials" else warm
    searcher = BudgetedOptunaSearch(
        space.suggest,
        metric="objective",
        mode="max",
        # TPE models the objective from right after the warm starts (n_startup_trials:
        # as many as there are warm-start points, at least 2): its random start-up draws
        # were the same on every dataset and, on a 10-15 minute budget, were all the
        # search had time for. group=True: the space is conditional on the method.
        sampler=(optuna.samplers.RandomSampler(seed=opts.seed) if opts.searcher == "random" else
                 optuna.samplers.TPESampler(multivariate=True, group=True, seed=opts.seed,
                                            n_startup_trials=max(2, len(warm)))),
        # (Optuna keeps an enqueued point the search never reaches as WAITING:
        # a trial-count budget enqueues no more points than it runs.)
        points_to_evaluate=warm or None,
        storage=optuna.storages.RDBStorage(layout.optuna_url(prep.folder)),
        study_name=prep.experiment,
        ledger=ledger,
        max_epochs=context.max_epochs,
        plan=schedule,
        devices_per_trial=allocated_devices(context, device_kind),
        default_image_size=context.default_image_size,
    )
    searcher.devices_of = TrialDevices(context, device_kind)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=devices.max_concurrent),
            scheduler=(FIFOScheduler() if opts.searcher == "random" else
                       ASHAScheduler(time_attr="epoch", max_t=schedule.rounds,
                                     grace_period=schedule.grace_period,
                                     reduction_factor=schedule.reduction_factor)),
            num_samples=int(budget.amount) if budget.kind == "trials" else -1,
            trial_dirname_creator=_trial_dirname,
            # Skips a process start and the torch imports per trial (about 3 s
            # on 2 CPUs). Not with TorchTrainer: a trial ASHA stops is still inside
            # trainer.fit(), so Tune cannot reset its actor (reset_config waits
            # 2 s for the thread, then fails) and the search stalled; killing
            # the actor also ends the Train run it owns.
            reuse_actors=not opts.use_train,
        ),
        run_config=tune.RunConfig(
            name=layout.TUNE_DIR,
            storage_path=prep.tune_root,
            stop=BudgetStopper(ledger),
            callbacks=driver_callbacks(prep.folder, ledger, context, device_kind, fingerprints, prep.remote),
            failure_config=tune.FailureConfig(max_failures=1),
            # Keep every trial checkpoint (only the Tune-function path makes them):
            # after a SIGKILL the restored state may point at an older one.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            verbose=0,
        ),
    )


def _collect(prep: _Prepared, context: TrialContext, results: Any, ledger: Ledger, device_kind: str,
             fingerprints: dict[int, str]) -> SearchSummary:
    """Store what no callback stored, push to the bucket, and sum the search up."""
    folder = prep.folder
    _store_missing(folder, context, prep.opts.category, results, ledger, device_kind, fingerprints, prep.remote)
    _learn_costs(folder, prep.opts, device_kind == "gpu")
    evaluate_tests(folder, context, log=_log)
    if prep.remote is not None:
        prep.remote.push(prep.experiment)
    table = store.read_table(folder)
    rows = [r for r in table.to_pylist() if r.get("objective") is not None]
    best = max(rows, key=lambda r: r["objective"]) if rows else None
    return SearchSummary(prep.experiment, folder, table.num_rows, best, ledger.used(), prep.budget,
                         prep.opts.category)


def _forget_cached_ledger(folder: Path) -> None:
    """Forget a cached ledger so a new run re-reads the file (a resume in the same process)."""
    budget_module._SHARED.pop(str(Path(folder).resolve()), None)


def _store_missing(folder: Path, context: TrialContext, category: str, results: Any, ledger: Ledger,
                   device_kind: str, fingerprints: dict[int, str], storage: Storage | None = None) -> None:
    """Rows for trials that ended while no callback could store them (driver killed)."""
    stored = store.stored_trial_ids(folder)
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if trial_id in stored or not result.config:
            continue
        checkpoint = _checkpoint_location(metrics.get("checkpoint_path"), result.checkpoint, storage)
        status = "error" if result.error else (
            "finished" if int(metrics.get("epoch", 0) or 0) >= context.max_epochs else "stopped")
        entry = ledger.trial(trial_id)
        if entry is not None and entry.get("state") != "finished":
            ledger.record(trial_id, entry.get("devices", 0.0), entry.get("wall_s", 0.0), finished=True)
        finalize_trial(folder, context, category, trial_id, dict(result.config), metrics, checkpoint,
                       status, None, ledger, device_kind, fingerprints, storage=storage)


def _start_live(progress: SearchProgress):
    from rich.live import Live

    live = Live(progress.render(), refresh_per_second=1, transient=False)
    live.start()

    def refresh() -> None:
        while live.is_started:
            live.update(progress.render())
            time.sleep(1.0)

    threading.Thread(target=refresh, daemon=True).start()
    return live
