"""One search trial: a Ray Tune function trainable that runs a Ray Train TorchTrainer.

Ray 2.60 (Train V2) no longer accepts ``Tuner(trainer)``. Each Tune trial is a Train
*driver*: ``run_trial`` builds a ``TorchTrainer`` named ``train-<tune trial id>`` (the
name is what lets a restarted trial resume from its last Train checkpoint) whose
per-worker loop, ``train_worker_loop``, calls ``training.loop.fit`` and reports val metrics
plus a checkpoint every epoch; ``TuneReportCallback`` forwards them to Tune, where ASHA
and the budget stopper read them.

``TrialContext.use_train=False`` runs the same worker loop in the Tune function itself,
reporting with ``tune.report`` (about 15 s faster per trial on 2 CPUs: no Train
controller, worker and helper actors to start; used by tests). The methods and
``training.loop.fit`` import nothing from Ray.

Every trial watches the search's budget deadline (``budget.DeadlineWatch``) and stops at
the next optimizer step once it has passed.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from automl_ad.plugins import load_plugins
from automl_ad import experiment as layout
from automl_ad.data.dataset import load_category
from automl_ad.training.distributed import DataParallel
from automl_ad.errors import DamagedCheckpoint
from automl_ad.methods.base import get_method_class
from automl_ad.results.remote_storage import ensure_file
from automl_ad.runtime import tune_cpu_allocator
from automl_ad.training.loop import EpochReport, TrainConfig, fit, synthesis_family
from automl_ad.tuning.budget import DeadlineWatch
from automl_ad.tuning.scratch import new_trial_folder
from automl_ad.param_keys import split_config
from automl_ad.evaluation.uncertainty import auroc_standard_error
from automl_ad.data.geometry import Geometry
from automl_ad.evaluation.validation import load_image_set, load_val_defects, val_set_for


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (picklable, passed to each trial)."""

    experiment: str
    experiment_dir: str
    category: str
    data_root: str
    seed: int
    default_image_size: int
    max_epochs: int
    steps_per_epoch: int | None
    batch_size: int
    val_defects: str | None = None
    use_train: bool = True
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # A custom resource of on-demand nodes (cluster/*.yaml: TRAIN_DRIVER): when the
    # cluster has it, trial drivers go there, so losing a spot node never kills one.
    driver_resource: str | None = None
    wandb: bool = False
    # The experiment in the bucket (``--storage s3://…``): Train checkpoints go there and
    # a trial on another node fetches the frozen val anomalies from there.
    storage_uri: str | None = None
    # Worker-group restarts Ray Train may make per trial (a lost node on a cluster). 0 on
    # a single machine, where nothing is lost: there a retry only ever follows Tune
    # killing the trial (ASHA or budget stop), and a placement group the dying controller
    # asked for then stayed reserved, starving every later trial.
    train_retries: int = 1
    # The plan's schedule (``schedule.Plan.schedule()``): ``{"<method>@<size>":
    # {"steps_per_epoch", "batch_size"}}``; a method and size not in it (or None) trains
    # ``steps_per_epoch`` x ``batch_size`` above.
    schedule: dict[str, dict[str, int]] | None = None
    # Modules or .py files with the search's own methods and families (automl_ad.plugins):
    # every trial process imports them before it looks a method up.
    plugins: tuple[str, ...] = ()
    # How images become the model's input (``data.geometry``): one per search, so every
    # trial and the export see the same shape for a size.
    # (``Geometry.to_dict()``: the context travels to trials as plain data; None: square)
    geometry: dict[str, Any] | None = None
    # Anomaly-source textures for perlin synthesis (``SearchOptions.texture_dir``), absolute.
    texture_dir: str | None = None

    def shape_of(self, image_size: int) -> tuple[int, int]:
        """(height, width) of the images at the pixel budget ``image_size``."""
        return Geometry.from_dict(self.geometry).shape(image_size)

    def tiling_of(self, image_size: int) -> dict[str, Any] | None:
        """The tiling of a tiled geometry at ``image_size`` (``Tiling.to_dict``), else None."""
        tiling = Geometry.from_dict(self.geometry).tiling(image_size)
        return None if tiling is None else tiling.to_dict()

    def schedule_of(self, method: str, image_size: int) -> tuple[int | None, int]:
        """(steps per round, batch size) of ``method`` at ``image_size``."""
        planned = (self.schedule or {}).get(f"{method}@{int(image_size)}")
        if planned is None:
            return self.steps_per_epoch, self.batch_size
        return int(planned["steps_per_epoch"]), int(planned["batch_size"])

    def val_anomalies_path(self, image_size: int) -> Path:
        return layout.val_anomalies_path(self.experiment_dir, image_size)

    @property
    def cache_dir(self) -> Path:
        return layout.cache_dir(self.experiment_dir)


def train_config(context: TrialContext, flat: Mapping[str, Any], device: str = "cpu"):
    """The ``training.TrainConfig`` of a sampled flat config."""
    split = split_config(flat, context.default_image_size)
    steps_per_epoch, batch_size = context.schedule_of(split.method, split.image_size)
    return TrainConfig(
        method=split.method,
        method_params=dict(split.method_params),
        synthesis=split.synthesis,
        synthesis_params=dict(split.synthesis_params),
        image_size=split.image_size,
        epochs=context.max_epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        seed=context.seed,
        device=device,
        texture_dir=context.texture_dir,
        tiling=context.tiling_of(split.image_size),
    )


def load_trial_data(context: TrialContext, image_size: int):
    """(CategoryData, frozen val anomalies, user val defects or None) at ``image_size``."""
    data = load_category(Path(context.data_root), context.category, image_size, shape=context.shape_of(image_size),
                         seed=context.seed, cache_dir=context.cache_dir)
    val_path = context.val_anomalies_path(image_size)
    if context.storage_uri is not None:
        relative = val_path.relative_to(context.experiment_dir).as_posix()
        for name in (relative, relative + ".json"):  # tensors, then their list sidecar
            ensure_file(context.storage_uri, context.experiment_dir, name)
    anomalies = load_image_set(val_path)
    extra = load_val_defects(Path(context.val_defects), context.shape_of(image_size)) if context.val_defects else None
    return data, anomalies, extra


def epoch_metrics(report: Any) -> dict[str, Any]:
    """Flat Tune metrics of one ``EpochReport`` (None metrics are left out)."""
    metrics = {
        "epoch": report.epoch,
        "phase": report.phase,
        "step": report.step,
        "train_loss": report.train_loss,
        "objective": report.objective,
        "elapsed_s": report.elapsed_s,
    }
    metrics.update({f"val_{k}": v for k, v in report.val.items() if v is not None})
    return metrics


class _Reporter:
    """Where the worker loop reports to: Ray Train (inside TorchTrainer) or Ray Tune."""

    def __init__(self, use_train: bool) -> None:
        self.use_train = use_train

    @property
    def rank(self) -> int:
        if not self.use_train:
            return 0
        import ray.train

        return ray.train.get_context().get_world_rank()

    @property
    def trial_id(self) -> str:
        if self.use_train:
            import ray.train

            name = ray.train.get_context().get_experiment_name()
            return name.removeprefix("train-")
        from ray import tune

        return tune.get_context().get_trial_id()

    def get_checkpoint(self):
        if self.use_train:
            import ray.train

            return ray.train.get_checkpoint()
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.use_train:
            import ray.train

            checkpoint = None
            if checkpoint_dir is not None and self.rank == 0:
                checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
            ray.train.report(metrics, checkpoint=checkpoint)
            return
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)


def train_worker_loop(loop_config: dict[str, Any]) -> None:
    """Per-worker loop: fit one sampled config, report every epoch, resume if restarted."""
    tune_cpu_allocator()  # a trial worker is a fresh process that never ran the CLI
    context = TrialContext(**loop_config["context"])
    load_plugins(context.plugins)
    flat = loop_config["config"]
    # Stop at the next step once the search's budget is spent, not at the epoch's end;
    # a single-worker trial that starts after that point does not even load its data
    # (several ranks must decide together, which fit does).
    budget_spent = DeadlineWatch(context.experiment_dir)
    if context.num_workers == 1 and budget_spent.active and budget_spent():
        return
    direct = bool(loop_config.get("direct"))
    reporter = _Reporter(context.use_train and not direct)
    device = "cpu"
    if context.use_gpu and direct:
        device = "cuda:0"  # Ray made the trial's one GPU the only visible one
    elif context.use_gpu:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    cfg = train_config(context, flat, device)
    data, anomalies, extra = load_trial_data(context, cfg.image_size)
    family = synthesis_family(cfg, get_method_class(cfg.method))
    val_set = val_set_for(data.val_good, anomalies, family, extra)

    work = new_trial_folder()
    resume_from = None
    checkpoint = reporter.get_checkpoint()
    if checkpoint is not None:
        resume_from = work / "resume"
        checkpoint.to_directory(str(resume_from))
    tracker = _WandbRun(context, flat, reporter) if context.wandb and reporter.rank == 0 else None

    def on_epoch(report: Any, checkpoint_dir: Path | None) -> bool:
        # Test metrics are not computed here: the driver evaluates every stored trial
        # after the search, so the budget buys trials, not test evaluations.
        metrics = {**epoch_metrics(report), **objective_noise(report.val, val_set)}
        if tracker is not None:
            tracker.log(metrics)
        reporter.report(metrics, checkpoint_dir)
        return False

    saved = _restored_state(resume_from, reporter.trial_id) if resume_from is not None else None
    if saved is None:
        resume_from = None  # no checkpoint, or a damaged one: the trial runs again from the start

    def train(resume: Path | None) -> None:
        if saved is not None and resume is not None and saved["epoch"] >= cfg.epochs:
            # Killed after its last checkpoint but before Tune saw the report: say it again,
            # in full, naming the checkpoint (Train's reports carry its path, not the files).

            last = EpochReport(**saved["reports"][-1])
            metrics = {**epoch_metrics(last), **objective_noise(last.val, val_set), "checkpoint_path": checkpoint.path}
            reporter.report(metrics, None)
            return
        data_parallel = None
        if context.num_workers > 1:  # TorchTrainer has set up the process group

            data_parallel = DataParallel()
        fit(cfg, data, val_set, checkpoint_dir=work / "checkpoint", resume_from=resume,
            on_epoch=on_epoch, evaluate_test=False, data_parallel=data_parallel,
            should_stop=budget_spent if budget_spent.active else None)

    try:
        try:
            train(resume_from)
        except DamagedCheckpoint as error:
            # The file read, but its weights do not fit the model (found only once the
            # model is built, before any step is taken): the same re-run from the start.
            if resume_from is None:
                raise
            _warn_rerun(reporter.trial_id, error)
            train(None)
    finally:
        if tracker is not None:
            tracker.finish()
        shutil.rmtree(work, ignore_errors=True)


def _restored_state(folder: Path, trial_id: str) -> dict[str, Any] | None:
    """The training state of the checkpoint Tune restored, or None (with one warning
    line) when that checkpoint is damaged, so the trial is re-run instead of failing."""
    try:
        return layout.read_checkpoint(Path(folder))
    except DamagedCheckpoint as error:
        _warn_rerun(trial_id, error)
        return None


def _warn_rerun(trial_id: str, error: DamagedCheckpoint) -> None:
    print(f"warning: trial {trial_id}: {error}; running it again from the start", file=sys.stderr)


class _WandbRun:
    """One W&B run per trial, on rank 0 only, offline unless WANDB_MODE says otherwise."""

    def __init__(self, context: TrialContext, flat: Mapping[str, Any], reporter: _Reporter) -> None:
        import wandb

        trial_id = reporter.trial_id
        self._run = wandb.init(
            project="automl_ad",
            group=context.experiment,
            name=trial_id,
            id=f"{context.experiment}-{trial_id}".replace("/", "_")[:64],
            config={**flat, "category": context.category, "seed": context.seed},
            dir=str(Path(context.experiment_dir)),
            mode=os.environ.get("WANDB_MODE", "offline"),
            resume="allow",
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: Mapping[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._run.log(numbers, step=int(metrics.get("epoch", 0)))

    def finish(self) -> None:
        self._run.finish()


def runs_direct(context: TrialContext, config: Mapping[str, Any] | None) -> bool:
    """Whether a trial runs its loop in the Tune function itself, without a TorchTrainer:
    always when the search says so (``use_train=False``), and for a method without a
    gradient phase (a memory bank), which has no training loop for Ray Train to wrap and
    would only pay its start-up (controller, worker and helper actors; ~15 s on 2 CPUs)."""
    if not context.use_train:
        return True
    if not config or "method" not in config:
        return False
    return not tuple(get_method_class(split_config(config, context.default_image_size).method).phases)


def trial_resources(context: TrialContext, direct: bool | None = None) -> dict[str, float]:
    """Resources of the Tune function itself: the Train driver, or the whole trial when
    it runs ``direct`` (default: the search's ``use_train``)."""
    direct = (not context.use_train) if direct is None else direct
    if not direct:
        if context.driver_resource:
            return {"CPU": 0.0, context.driver_resource: 1.0}
        return {"CPU": 1.0}
    gpus = context.gpus_per_worker if context.use_gpu else 0.0
    return {"CPU": context.cpus_per_worker, "GPU": min(gpus, 1.0) if gpus else 0.0}


def allocated_devices(context: TrialContext, device_kind: str, direct: bool | None = None) -> float:
    """Devices a trial holds for budget accounting (allocation, not utilisation); a
    ``direct`` trial holds one worker's and no driver's."""
    direct = (not context.use_train) if direct is None else direct
    workers = 1 if direct else context.num_workers
    if device_kind == "gpu":
        return workers * context.gpus_per_worker if context.use_gpu else 0.0
    return workers * context.cpus_per_worker + (0.0 if direct or context.driver_resource else 1.0)


@dataclass(frozen=True)
class TrialDevices:
    """Devices a trial of a given configuration holds (``allocated_devices``); a small
    picklable callable, since Tune saves the searcher and callbacks that hold it."""

    context: TrialContext
    device_kind: str

    def __call__(self, config: Mapping[str, Any] | None) -> float:
        return allocated_devices(self.context, self.device_kind, runs_direct(self.context, config))


def objective_noise(val: Mapping[str, Any], val_set: Any) -> dict[str, float]:
    """``objective_se``: the standard error of the val image AUROC, so the leaderboard and
    the choice can tell which trials the val set cannot rank: DeLong's from the val scores
    (``training.loop.evaluate``), else Hanley & McNeil's from the AUROC and the counts."""
    auroc = val.get("image_auroc")
    if auroc is None:
        return {}
    if val.get("image_auroc_se") is not None:
        return {"objective_se": float(val["image_auroc_se"])}
    anomalous = int(val_set.labels.sum())
    return {"objective_se": auroc_standard_error(float(auroc), anomalous, len(val_set.labels) - anomalous)}


def make_trainable(context: TrialContext) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable of a search (same object for fit and restore)."""
    from ray import tune

    def run_trial(config: dict[str, Any]) -> None:
        load_plugins(context.plugins)
        direct = runs_direct(context, config)
        loop_config = {"context": asdict(context), "config": dict(config), "direct": direct}
        if direct:
            train_worker_loop(loop_config)
            return
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        trial_id = tune.get_context().get_trial_id()
        trainer = TorchTrainer(
            train_worker_loop,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=context.num_workers,
                use_gpu=context.use_gpu,
                resources_per_worker={"CPU": context.cpus_per_worker,
                                      **({"GPU": context.gpus_per_worker} if context.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=f"train-{trial_id}",
                # On a bucket, so the trial resumes on any node when its node is lost.
                storage_path=layout.train_path(context.storage_uri or str(Path(context.experiment_dir))),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=context.train_retries),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()

    return tune.with_resources(run_trial, lambda config: trial_resources(context, runs_direct(context, config)))
