"""Starting (or joining) Ray for a search, and the environment every worker of it gets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from automl_ad.tuning.options import SearchOptions
from automl_ad.tuning.ray_setup import HOOK

def init_ray(opts: SearchOptions) -> bool:
    """Start (or join) Ray unless this process already has it; True when it started here."""
    import ray

    # A trial the budget deadline stops inside its first epoch reports nothing, which
    # Tune accepts, except that its final result carries the flattened config and so
    # fails Tune's "objective missing" check (tune_controller._validate_result_metrics).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if ray.is_initialized():
        return False

    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": worker_env(opts), "worker_process_setup_hook": HOOK},
                              "log_to_driver": False}
    if opts.address:
        ray.init(address=opts.address, **kwargs)
    else:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kwargs)
    return True


STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def worker_env(opts: SearchOptions) -> dict[str, str]:
    """Environment variables every Ray worker of the search gets."""
    env = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    env.update(train_env(local=not opts.address))
    # Where the bucket is (an S3-compatible endpoint, a region) must reach trials on other
    # nodes; credentials never travel this way: nodes use their own role or service account.
    env.update({key: os.environ[key] for key in STORAGE_ENV if key in os.environ})
    # Workers must import automl_ad even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")] if p
    )
    return env


def train_env(local: bool) -> dict[str, str]:
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
