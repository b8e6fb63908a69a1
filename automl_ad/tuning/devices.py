"""What a search asks the cluster for (``plan_devices``), decided once at its start, and
what every one of its trials is told (``trial_context``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from automl_ad.errors import UserError
from automl_ad.plugins import load_plugins
from automl_ad.results.remote_storage import Storage
from automl_ad.tuning.budget import Budget
from automl_ad.tuning.options import SearchOptions
from automl_ad.tuning.schedule import Plan
from automl_ad.tuning.space import SearchSpace
from automl_ad.data.geometry import Geometry
from automl_ad.tuning.trainable import TrialContext

DRIVER_RESOURCE = "TRAIN_DRIVER"  # declared by the on-demand node types in cluster/


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


def local_resources() -> dict[str, float]:
    """What a local Ray instance started here would offer."""
    import torch

    return {"CPU": float(os.cpu_count() or 1),
            "GPU": float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0}


def trial_shape(opts: SearchOptions, devices: DevicePlan) -> dict[str, Any]:
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


def trial_context(opts: SearchOptions, devices: DevicePlan, space: SearchSpace, *, schedule: Plan | None = None,
                  experiment: str = "", folder: Path | None = None, data_root: Path | None = None,
                  remote: Storage | None = None, geometry: Geometry | None = None) -> TrialContext:
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
        **trial_shape(opts, devices),
        wandb=opts.wandb,
        storage_uri=remote.experiment_uri(experiment) if remote is not None else None,
        train_retries=1 if opts.address else 0,
        schedule=schedule.schedule() if schedule is not None else None,
        plugins=load_plugins(opts.plugins),
        geometry=(geometry or Geometry()).to_dict(),
        texture_dir=str(Path(opts.texture_dir).resolve()) if opts.texture_dir else None,
    )
