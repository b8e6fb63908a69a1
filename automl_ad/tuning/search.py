"""The search driver: Ray Tune + Optuna (TPE) + ASHA over methods, under a budget.

``run_search`` prepares the experiment folder (frozen val anomalies, budget ledger,
Optuna sqlite study), runs a ``Tuner`` whose trials are function trainables that each
run a Ray Train ``TorchTrainer`` (see ``trainable.py``), writes one Parquet row per
finished trial (test metrics included, never optimised), and resumes an interrupted
search with ``Tuner.restore`` when ``resume=True``.

Its parts, one job a module: ``options`` (what a user asks), ``devices`` (what the
cluster gives a trial), ``planning`` (the schedule and warm starts), ``searcher`` (Optuna
behind a budget gate), ``callbacks`` (ledger, clock, live view, store), ``finalize``
(trial rows and test metrics), ``jobs`` (many products), ``ray_session`` (starting Ray).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automl_ad import experiment as layout
from automl_ad.data.dataset import load_category, resolve_data_root
from automl_ad.data.geometry import Geometry
from automl_ad.data.geometry import check_memory
from automl_ad.data.geometry import resolve as resolve_geometry
from automl_ad.data.geometry import stored as stored_geometry
from automl_ad.data.images import image_files_in
from automl_ad.data.layout import category_folder, discover_category
from automl_ad.data.minimum import check_product
from automl_ad.errors import UserError
from automl_ad.plugins import load_plugins
from automl_ad.evaluation.validation import build_val_anomalies, load_val_defects, save_image_set
from automl_ad.results import store
from automl_ad.results.remote_storage import DRIVER_NOT_PULLED, Storage, parse_storage
from automl_ad.tuning import budget as budget_module
from automl_ad.tuning import interrupt
from automl_ad.tuning.budget import Budget, Ledger, parse_budget, shared_ledger
from automl_ad.tuning.callbacks import BudgetStopper, driver_callbacks, showing
from automl_ad.tuning.devices import DevicePlan, local_resources, plan_devices, trial_context
from automl_ad.tuning.finalize import evaluate_tests, store_missing
from automl_ad.tuning.lock import DriverLock
from automl_ad.tuning.lock import acquire as acquire_lock
from automl_ad.tuning.options import SEARCHERS, SearchOptions, SearchSummary, pick_experiment
from automl_ad.tuning.planning import learn_costs, plan_schedule, warm_start_points
from automl_ad.tuning.progress import SearchProgress
from automl_ad.tuning.ray_session import init_ray
from automl_ad.tuning.schedule import Plan
from automl_ad.tuning.scratch import remove_orphans
from automl_ad.tuning.searcher import BudgetedOptunaSearch
from automl_ad.tuning.space import SearchSpace, load_space
from automl_ad.tuning.trainable import TrialContext, TrialDevices, allocated_devices, make_trainable

# The search's names, importable from here as before the split: callers, and Tune's
# pickles of searches started before it (they name these classes in this module).
from automl_ad.tuning.callbacks import (  # noqa: E402,F401
    DeadlineClockCallback, LedgerCallback, LiveViewCallback, StoreCallback,
)
from automl_ad.tuning.devices import DRIVER_RESOURCE  # noqa: F401
from automl_ad.tuning.finalize import finalize_trial  # noqa: F401
from automl_ad.tuning.options import storage_folder  # noqa: F401
from automl_ad.tuning.planning import method_inputs, preview_plan  # noqa: F401

def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _trial_dirname(trial: Any) -> str:
    """Trial folders named by trial id, so results map back to ledger and store rows."""
    return trial.trial_id


def _prepare_val_sets(context: TrialContext, image_sizes: tuple[int, ...], data_root: Path) -> dict[int, str]:
    """Frozen val anomalies per image size, made once (seeded) and saved; fingerprints."""
    fingerprints = {}
    for size in image_sizes:
        data = load_category(data_root, context.category, size, shape=context.shape_of(size), seed=context.seed,
                             cache_dir=context.cache_dir)
        fingerprints[size] = data.fingerprint
        path = context.val_anomalies_path(size)
        if not path.exists():
            save_image_set(build_val_anomalies(data, seed=context.seed), path)
        if context.val_defects:
            load_val_defects(Path(context.val_defects), context.shape_of(size))  # bad folder: fail before the search
    return fingerprints


def _check_resume(folder: Path, opts: SearchOptions, record: dict[str, Any]) -> None:
    saved = layout.read_record(folder)
    for key in ("category", "budget", "seed", "searcher"):
        if saved.get(key, "tpe" if key == "searcher" else None) != record.get(key):
            raise UserError(
                f"--resume: {key} {record.get(key)!r} differs from {saved.get(key)!r} in {layout.record_path(folder)}"
            )


def _with_texture_dir(opts: SearchOptions, saved: dict[str, Any] | None) -> SearchOptions:
    """``opts`` with its texture folder checked and absolute; a resume keeps the one its
    trials so far used and refuses another."""
    kept = (saved or {}).get("texture_dir")
    asked = str(Path(opts.texture_dir).resolve()) if opts.texture_dir else None
    if saved is not None and asked is not None and asked != kept:
        raise UserError(f"--resume: --texture-dir {asked} differs from {kept} in the search record")
    chosen = asked or kept
    if chosen is not None:
        image_files_in(chosen, "--texture-dir")
    return dataclasses.replace(opts, texture_dir=Path(chosen) if chosen else None)


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
    geometry: Geometry  # the shape images get at each size (the stored one on a resume)

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
        started_ray = init_ray(opts)
        interrupt.watch(prep.experiment, prep.folder)  # SIGINT/SIGTERM: stop cleanly, say how to resume
        devices = _plan_devices(prep)
        schedule, space = _plan(prep, devices)
        context = trial_context(opts, devices, space, schedule=schedule, experiment=prep.experiment,
                                folder=prep.folder, data_root=prep.data_root, remote=prep.remote,
                                geometry=prep.geometry)
        fingerprints = _prepare_val_sets(context, space.all_image_sizes(), prep.data_root)
        if prep.remote is not None:
            prep.remote.push(prep.experiment)  # the search record and val sets: a resume can start from them
        _forget_cached_ledger(prep.folder)
        ledger = shared_ledger(prep.folder, prep.budget)
        device_kind = "gpu" if devices.use_gpu else "cpu"
        results = _tune(prep, context, schedule, space, ledger, devices, fingerprints)
        interrupt.raise_if_stopped(prep.folder)  # a stopped search is resumed, never collected as done
        warm = warm_start_points(space, schedule) if opts.searcher == "tpe" else []
        return _collect(prep, context, results, ledger, device_kind, fingerprints, warm)
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
    load_plugins(opts.plugins)  # the user's own methods and families join the registries first
    space: SearchSpace = load_space(
        opts.methods, opts.space_file, **({"space_dir": opts.space_dir} if opts.space_dir else {}),
        image_size=opts.image_size,
    )
    data_root = resolve_data_root(opts.data, opts.category)
    category_folder(data_root, opts.category)  # a missing product is refused before Ray starts
    check_product(data_root, opts.category)  # so is one too small to split into fit and val
    if not opts.address:  # the local Ray instance will see this machine: refuse what it cannot run first
        plan_devices(budget, local_resources(), max_gpus=opts.max_gpus, gpus_per_trial=opts.gpus_per_trial,
                     cpus_per_trial=opts.cpus_per_trial, use_train=opts.use_train, max_concurrent=opts.max_concurrent)
    if opts.val_defects is not None and not Path(opts.val_defects).is_dir():
        raise UserError(f"--val-defects folder not found: {opts.val_defects}")
    spec = parse_storage(opts.storage)
    experiment = pick_experiment(opts, spec)
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
        geometry = stored_geometry(layout.read_record(folder), opts.geometry)
    elif layout.has_record(folder):
        raise UserError(f"experiment {experiment!r} exists in {spec.local}; pass --resume or a new --experiment")
    else:
        found = discover_category(data_root, opts.category)
        geometry = resolve_geometry(opts.geometry, found.train, max(space.all_image_sizes()))
        check_memory(geometry, max(space.all_image_sizes()), len(found.train), len(found.test))
    record["geometry"] = geometry.to_dict()
    opts = _with_texture_dir(opts, layout.read_record(folder) if opts.resume else None)
    record["texture_dir"] = str(opts.texture_dir) if opts.texture_dir else None
    return _Prepared(opts, budget, space, data_root, experiment, folder, remote, record, geometry)


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
                                 log=_log if opts.live else None, geometry=prep.geometry)
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


def _tune(prep: _Prepared, context: TrialContext, schedule: Plan, space: SearchSpace, ledger: Ledger,
          devices: DevicePlan, fingerprints: dict[int, str]) -> Any:
    """Run the tuner (a new one, or the interrupted one restored) until the budget is
    spent, with the live view up meanwhile; Tune's results."""
    from ray import tune

    folder = prep.folder
    progress = SearchProgress(ledger=ledger, max_epochs=context.max_epochs, used_at_start=ledger.used())
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
            # stored and is stored again from its checkpoint (store_missing) or re-run.
            store.check_tables(folder)
        if prep.opts.resume and tune.Tuner.can_restore(tune_path):
            tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
            known = {Path(r.path).name for r in tuner.get_results()} | store.stored_trial_ids(folder)
            ledger.mark_lost(set(ledger.trials()) - known)
        else:
            tuner = _new_tuner(prep, context, schedule, space, ledger, devices, fingerprints, trainable)
        with showing(progress):
            return tuner.fit()
    finally:
        ledger.end_session()
        remove_orphans()  # the folders of trials Tune killed on this node (tuning/scratch.py)
        if live is not None:
            live.stop()


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
             fingerprints: dict[int, str], warm_starts: list[dict[str, Any]] | None = None) -> SearchSummary:
    """Store what no callback stored, push to the bucket, and sum the search up
    (``warm_starts``: the TPE search's warm-start configurations)."""
    folder = prep.folder
    store_missing(folder, context, prep.opts.category, results, ledger, device_kind, fingerprints, prep.remote)
    learn_costs(folder, prep.opts, device_kind == "gpu", warm_starts=warm_starts or ())
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
