"""What a user asks of one search (``SearchOptions``), what it returns
(``SearchSummary``), and where its results live."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automl_ad import experiment as layout
from automl_ad.errors import UserError
from automl_ad.results.remote_storage import Storage, parse_storage
from automl_ad.tuning.budget import Budget

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
    # Modules or .py files with methods or synthesis families of the user's own
    # (automl_ad.plugins), imported by the driver and by every trial.
    plugins: tuple[str, ...] = ()
    # How images become the input (automl_ad.data.geometry): "auto" keeps the aspect of a
    # product whose images are clearly not square; "square" or "keep_aspect" force one;
    # "tiled" cuts larger images into tiles of keep_aspect's shape (automl_ad.data.tiling).
    geometry: str = "auto"
    # A folder of texture images (DTD-style) that perlin-family synthesis (DRAEM) pastes
    # as anomaly sources; None: its procedural texture bank. Must be readable by every
    # worker (a shared mount on a cluster).
    texture_dir: Path | None = None


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


def storage_folder(storage: Path | str) -> Path:
    """The folder the results are read and written in: ``--storage`` itself (a path or a
    ``file://`` URI, local or a shared mount), or the local mirror of an ``s3://`` /
    ``gs://`` store (see ``automl_ad.results.remote_storage``). Other schemes: UserError."""
    return parse_storage(storage).local


def pick_experiment(opts: SearchOptions, spec: Storage) -> str:
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
