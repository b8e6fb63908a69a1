"""Searches in Python: ``plan`` a budget, ``search`` one product or ``search_many``.

Why this module: the command line used to hold the glue between the search driver
(``tuning.search``), the store (``results``) and the deploy steps (``deploy``); a notebook
user had to assemble ``SearchOptions``, start Ray, then call ``ship`` with five
positional arguments. Here a search is one call returning a :class:`SearchResult`
(``result.py``), and the ``search`` command only parses options, calls it, and prints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from automl_ad.api.result import DEFAULT_STORAGE, PathLike, SearchResult
from automl_ad.errors import UserError

if TYPE_CHECKING:
    from automl_ad.tuning.schedule import Plan
    from automl_ad.tuning.search import SearchOptions, SearchSummary


def _result(summary: "SearchSummary", storage: PathLike) -> SearchResult:
    return SearchResult(summary.category, summary.experiment, summary.experiment_dir, str(storage), summary)


def search_options(category: str, budget: str, *, data: PathLike | None = None,
                   methods: Sequence[str] | None = None, seed: int = 0, storage: PathLike = DEFAULT_STORAGE,
                   live: bool = False, experiment: str | None = None, resume: bool = False,
                   image_size: int | None = None, space_file: PathLike | None = None,
                   val_defects: PathLike | None = None, searcher: str = "tpe", max_concurrent: int | None = None,
                   address: str | None = None, gpus_per_trial: float = 1.0, max_gpus: float | None = None,
                   wandb: bool = False, use_ray_train: bool = True, space_dir: PathLike | None = None,
                   calibrate: bool = True, plugins: Sequence[str] = (), geometry: str = "auto",
                   texture_dir: PathLike | None = None) -> "SearchOptions":
    """The driver's options of a search; the keyword arguments of :func:`search`."""
    from automl_ad.tuning.search import SearchOptions

    if methods is not None:
        methods = [m.strip() for m in ([methods] if isinstance(methods, str) else methods) if m.strip()]
        if not methods:
            raise UserError("methods: give method names, e.g. ['draem', 'nsa']")
    return SearchOptions(
        category=category, budget=budget or "", data=_path(data), methods=methods, space_file=_path(space_file),
        max_concurrent=max_concurrent, experiment=experiment, resume=resume, address=address,
        storage=storage if isinstance(storage, str) else Path(storage), wandb=wandb, seed=seed,
        image_size=image_size, val_defects=_path(val_defects), use_train=use_ray_train,
        gpus_per_trial=gpus_per_trial, max_gpus=max_gpus, live=live, space_dir=_path(space_dir),
        calibrate=calibrate, searcher=searcher, plugins=tuple(str(p) for p in plugins), geometry=geometry,
        texture_dir=_path(texture_dir))


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def search(category: str, budget: str, *, data: PathLike | None = None, methods: Sequence[str] | None = None,
           seed: int = 0, storage: PathLike = DEFAULT_STORAGE, live: bool = False, experiment: str | None = None,
           resume: bool = False, image_size: int | None = None, space_file: PathLike | None = None,
           val_defects: PathLike | None = None, searcher: str = "tpe", max_concurrent: int | None = None,
           address: str | None = None, gpus_per_trial: float = 1.0, max_gpus: float | None = None,
           wandb: bool = False, use_ray_train: bool = True, space_dir: PathLike | None = None,
           calibrate: bool = True, keep_ray: bool = False, plugins: Sequence[str] = (),
           geometry: str = "auto", texture_dir: PathLike | None = None) -> SearchResult:
    """Search methods, backbones and synthetic-anomaly parameters for one product until
    ``budget`` is spent ("10m", "2h" search time; "50gpu-h", "4cpu-h" device time;
    "30trials"); every trial is stored under ``storage`` (a folder or s3://, gs:// URI).

    ``data``: a dataset root in MVTec AD layout (default: the built-in products).
    ``methods``: restrict to these. ``seed``: seeds sampling, splits and synthesis.
    ``live``: print the plan and redraw the rich live table of trials (a terminal's
    view, as ``automl-ad search``); off, a notebook or a log gets one line per trial.
    ``resume``: continue the interrupted ``experiment``. ``image_size``: pin one size.
    ``use_ray_train``: each trial as a Ray Train TorchTrainer (False: a plain Tune
    function, faster to start on one small machine). ``space_dir``: a whole search-space
    folder instead of the shipped one. ``calibrate``: first time the speeds the plan
    needs that this machine has not measured. ``address``: a Ray cluster to join.
    ``plugins``: modules or .py files defining methods or synthesis families of your own
    (``@register`` / ``@register_family``), imported here and in every trial.
    ``geometry``: "auto" keeps the images' aspect when they are clearly not square
    (same pixel count per size), "square" squashes every image to a square,
    "keep_aspect" always keeps the aspect, "tiled" cuts each image, resized about twice
    as fine per side, into 2 x 2 overlapping tiles of keep_aspect's shape (about 4x the
    cost an image; ``automl_ad.data.geometry``, ``automl_ad.data.tiling``).
    ``texture_dir``: a folder of texture images (e.g. DTD) that perlin synthesis (DRAEM)
    pastes as anomaly sources; default: a procedural texture bank.

    A local Ray instance this call starts is shut down when it returns (``keep_ray``:
    leave it up for the next search), so a notebook kernel holds no Ray processes
    between searches. Nothing is chosen or exported: call ``ship`` or ``export`` on the
    result. SIGINT stops the search cleanly (resume with ``resume=True``)."""
    from automl_ad.tuning.search import run_search

    if not category:
        raise UserError("search: give a category (a product name)")
    if not budget:
        raise UserError(f"search {category}: a budget is required, e.g. '10m', '2h', '4cpu-h', '30trials'")
    options = search_options(category, budget, data=data, methods=methods, seed=seed, storage=storage, live=live,
                             experiment=experiment, resume=resume, image_size=image_size, space_file=space_file,
                             val_defects=val_defects, searcher=searcher, max_concurrent=max_concurrent,
                             address=address, gpus_per_trial=gpus_per_trial, max_gpus=max_gpus, wandb=wandb,
                             use_ray_train=use_ray_train, space_dir=space_dir, calibrate=calibrate,
                             plugins=plugins, geometry=geometry, texture_dir=texture_dir)
    with _own_ray(keep_ray), _signal_guard():
        return _result(run_search(options), storage)


def search_many(jobs: Mapping[str, str] | PathLike, *, on_done: Callable[[SearchResult], None] | None = None,
                keep_ray: bool = False, **options: Any) -> list[SearchResult]:
    """One search per product, one after the other on one Ray instance, each with its own
    budget, ledger and experiment (``<experiment>-<category>`` when ``experiment`` is given).
    ``jobs``: ``{"screw": "2h", "washer": "30trials"}``, or a YAML jobs file
    (``- {category: screw, budget: 8gpu-h}``); :func:`all_products` lists the products of a
    data folder. ``on_done`` sees each result as soon as it exists (to ship it, say).
    ``options``: the keyword arguments of :func:`search`."""
    from automl_ad.tuning.jobs import Job, run_jobs

    if isinstance(jobs, (str, os.PathLike)):
        jobs = read_jobs(jobs)
    if not isinstance(jobs, Mapping):
        raise UserError(f"search_many: jobs is a {{category: budget}} mapping or a jobs file, not {type(jobs).__name__}")
    listed = [Job(str(category), str(budget)) for category, budget in jobs.items()]
    base = search_options(listed[0].category if listed else "", "", **options)
    storage = options.get("storage", DEFAULT_STORAGE)
    done = None if on_done is None else (lambda summary: on_done(_result(summary, storage)))
    with _own_ray(keep_ray), _signal_guard():
        return [_result(summary, storage) for summary in run_jobs(base, listed, on_done=done)]


def read_jobs(path: PathLike) -> dict[str, str]:
    """A jobs file (YAML list of ``{category, budget}``) as ``{category: budget}`` in file
    order, every item checked before anything runs (the ``jobs`` of :func:`search_many`)."""
    from automl_ad.tuning.jobs import load_jobs

    return {job.category: job.budget for job in load_jobs(Path(path))}


def all_products(data: PathLike | None = None) -> list[str]:
    """Every category folder under ``data`` (one holding train/good/), else every built-in product."""
    from automl_ad.tuning.jobs import all_categories

    return all_categories(_path(data))


def plan(category: str, budget: str, *, data: PathLike | None = None, methods: Sequence[str] | None = None,
         seed: int = 0, image_size: int | None = None, space_file: PathLike | None = None,
         max_concurrent: int | None = None, gpus_per_trial: float = 1.0, max_gpus: float | None = None, storage: PathLike = DEFAULT_STORAGE,
         experiment: str | None = None, resume: bool = False, searcher: str = "tpe",
         use_ray_train: bool = True, space_dir: PathLike | None = None, calibrate: bool = False,
         plugins: Sequence[str] = (), geometry: str = "auto") -> "Plan":
    """The schedule a search with these options would run (per method and image size:
    steps, paper-epoch equivalent, ASHA rungs, seconds per trial, expected trials), without
    Ray and without training; ``.text()`` is what ``search --plan`` prints, ``.entries``
    the rows. A GPU budget on a machine without a GPU uses the GPU prior. ``calibrate``:
    first measure the speeds this machine has not measured (a few training steps per
    method and size, cached). With ``resume``: the plan the stored search runs."""
    from automl_ad.tuning.search import preview_plan

    if not budget:
        raise UserError(f"plan {category}: a budget is required, e.g. '10m', '2h', '50gpu-h'")
    options = search_options(category, budget, data=data, methods=methods, seed=seed, storage=storage,
                             experiment=experiment, resume=resume, image_size=image_size, space_file=space_file, searcher=searcher,
                             max_concurrent=max_concurrent, gpus_per_trial=gpus_per_trial, max_gpus=max_gpus,
                             use_ray_train=use_ray_train, space_dir=space_dir, calibrate=calibrate,
                             plugins=plugins, geometry=geometry)
    return preview_plan(options)


def _signal_guard() -> Any:
    """SIGINT (a notebook's "interrupt kernel", Ctrl-C) and SIGTERM stop the search the
    way ``automl-ad search`` does: running trials end, the experiment is saved, and
    ``Interrupted`` is raised; ``resume=True`` goes on. The command line's own guard,
    when it runs this, is used as is."""
    from contextlib import nullcontext

    from automl_ad.tuning import interrupt

    return nullcontext() if interrupt.active() is not None else interrupt.SignalGuard()


class _own_ray:
    """Around a search: shut down a Ray instance the search started in this process,
    unless ``keep``; one that was running before is left alone."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.running_before = False

    def __enter__(self) -> "_own_ray":
        ray = sys.modules.get("ray")
        self.running_before = ray is not None and ray.is_initialized()
        return self

    def __exit__(self, *exc: Any) -> None:
        ray = sys.modules.get("ray")
        if not self.keep and not self.running_before and ray is not None and ray.is_initialized():
            ray.shutdown()

