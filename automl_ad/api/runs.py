"""Searches in Python: ``plan`` a budget, ``search`` a product, ``open_search`` a stored one.

Why this module: the command line used to hold the glue between the search driver
(``tuning.search``), the store (``results``) and the deploy steps (``deploy``); a notebook
user had to assemble ``SearchOptions``, start Ray, then call ``ship`` with five
positional arguments. Here that glue is one object, :class:`SearchResult`, and the
``search``/``results``/``ensemble``/``export``/``report`` commands only parse options,
call it, and print what it returns.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from automl_ad.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from automl_ad.api.detector import Detector
    from automl_ad.deploy.choice import Choice
    from automl_ad.deploy.pipeline import Shipped
    from automl_ad.deploy.progress import DeployProgress
    from automl_ad.tuning.schedule import Plan
    from automl_ad.tuning.search import SearchOptions, SearchSummary

PathLike = str | os.PathLike
DEFAULT_STORAGE = "results"
DEFAULT_MODELS = "models"
EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class SpearmanVerdict:
    """Does the val objective rank trials as the test set does? ``rho`` is Spearman's rank
    correlation of val objective and test image AUROC over ``trials`` trials (None with
    fewer than 3 or a constant side); ``text`` is the line the leaderboard prints."""

    rho: float | None
    trials: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class SearchResult:
    """One stored search (experiment) of one product, finished or read back.

    ``leaderboard()`` and ``spearman`` read the Parquet store; ``ensemble``, ``export``,
    ``report`` and ``ship`` are the steps after a search (``automl-ad search`` runs
    ``ship``); the model they chose is kept in ``chosen``.
    """

    category: str
    experiment: str
    folder: Path  # the experiment folder on this machine (the local mirror of a bucket)
    storage: str  # as given: a folder, file://, s3:// or gs:// URI
    summary: "SearchSummary | None" = None  # set when this process ran the search
    chosen: "Choice | None" = None  # the model the last ensemble/export/ship chose
    _checkpoints_pulled: bool = field(default=False, repr=False)

    # --- what the search stored ------------------------------------------------------
    @property
    def location(self) -> str:
        """Where the results live: the bucket URI of the experiment, else its folder."""
        remote = self._remote()
        return remote.experiment_uri(self.experiment) if remote is not None else str(self.folder)

    @property
    def record(self) -> dict[str, Any]:
        """The search record (search.json): budget, seed, data root, methods, plan."""
        from automl_ad.experiment import read_record

        return read_record(self.folder)

    @property
    def data_root(self) -> Path:
        """The dataset root the search trained on (the built-in products' cache without --data)."""
        return Path(self.record["data"])

    def rows(self) -> list[dict[str, Any]]:
        """Every stored trial row (store.read_table), unordered; UserError when none."""
        from automl_ad.results import store

        rows = store.read_table(self.folder).to_pylist()
        if not rows:
            raise UserError(f"no trials stored in {self.folder}")
        return rows

    def leaderboard(self, top: int | None = None) -> "pd.DataFrame":
        """Trials ranked by val objective (best first; failed and unscored ones last), one
        row each with every stored column, ``params`` as a dict, plus ``rank``,
        ``objective_ci95`` (± of the objective's 95 % interval) and ``tied_with_best``
        (the val set cannot tell it from the best; None when unknown)."""
        import json

        import pandas as pd

        from automl_ad.results import leaderboard as board

        order = board.ranked(self.rows())
        best = next((r for r in order if r.get("status") != "error" and board.number(r.get("objective")) is not None),
                    None)
        records = []
        for rank, row in enumerate(order[:top] if top else order, 1):
            se = board.number(row.get("objective_se"))
            params = row.get("params")
            records.append({"rank": rank, **row,
                            "params": json.loads(params) if isinstance(params, str) else dict(params or {}),
                            "objective_ci95": None if se is None else board.Z_TWO_SIDED * se,
                            "tied_with_best": board.tied_with_best(row, best)})
        return pd.DataFrame.from_records(records).set_index("rank")

    def leaderboard_text(self, top: int = 20) -> str:
        """The leaderboard as ``automl-ad results`` prints it, verdict and ties included."""
        from automl_ad.results.leaderboard import leaderboard_text

        return leaderboard_text(self.folder, top)

    @property
    def spearman(self) -> SpearmanVerdict:
        """Whether choosing by val objective can be trusted on this product (see the class)."""
        from automl_ad.results.leaderboard import spearman_val_test, verdict

        rows = self.rows()
        rho, pairs = spearman_val_test(rows)
        return SpearmanVerdict(rho, pairs, verdict(rows))

    @property
    def best(self) -> dict[str, Any] | None:
        """The best trial's stored row (by val objective), None when no trial scored."""
        from automl_ad.results import leaderboard as board

        return next((dict(r) for r in board.ranked(self.rows())
                     if r.get("status") != "error" and board.number(r.get("objective")) is not None), None)

    # --- after the search: choose, export, report -------------------------------------
    def ensemble(self, k: int = 5, *, top: int = 10, fusion: str = "mean", max_latency_ms: float | None = None,
                 progress: "DeployProgress | None" = None) -> "Choice":
        """Choose the model to ship among the ``top`` trials: the equal-weight ensemble (at
        most ``k`` members) of those the val set cannot tell from the best, or the best
        alone when it is significantly better (deploy/choice.py). The choice is stored in
        the experiment's ``ensembles`` table and kept in ``chosen``."""
        from automl_ad.deploy.choice import choose_model, store_choice
        from automl_ad.deploy.progress import call_with_progress

        if k < 1 or top < 1:
            raise UserError(f"ensemble: k and top must be >= 1, got k={k}, top={top}")
        if fusion not in ("mean", "max"):
            raise UserError(f"ensemble: fusion {fusion!r}: choose mean or max")
        self._pull_checkpoints()
        progress = _progress(progress)
        with progress.step(f"ensemble: choose among the best {top} trials (k={k})"):
            choice = call_with_progress(choose_model, self.folder, k=k, top=top, fusion=fusion,
                                        max_latency_ms=max_latency_ms, progress=progress)
            store_choice(self.folder, choice, k)
        self._push()
        self.chosen = choice
        return choice

    def export(self, out: PathLike | None = None, *, choice: "Choice | None" = None, k: int = 5,
               formats: Sequence[str] | str = EXPORT_FORMATS, fpr: float | None = None,
               max_latency_ms: float | None = None, progress: "DeployProgress | None" = None) -> "Detector":
        """Write the deployable bundle (model.onnx, optionally model.torchscript, and
        manifest.json) to ``out`` (default ``models/<category>``) and return it loaded.
        ``choice``: a model from :meth:`ensemble` (default: choose now, with ``k`` and
        ``max_latency_ms``). ``fpr``: set the threshold to this false-alarm rate on
        val-good (default: F1-max on val). Options are checked before any work."""
        from automl_ad.api.detector import load
        from automl_ad.deploy.choice import export_choice
        from automl_ad.deploy.progress import call_with_progress

        chosen_formats = check_formats(formats)
        check_fpr(fpr)
        out = Path(out) if out is not None else Path(DEFAULT_MODELS) / self.category
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file, not a bundle folder")
        progress = _progress(progress)
        if choice is None:
            choice = self.ensemble(k, max_latency_ms=max_latency_ms, progress=progress)
        with progress.step(f"export: bundle to {out}"):
            call_with_progress(export_choice, self.folder, choice, out, formats=chosen_formats, fpr=fpr,
                               progress=progress)
        self.chosen = choice
        return load(out)

    def report(self, out: PathLike | None = None, *, bundle: PathLike | None = None,
               progress: "DeployProgress | None" = None) -> Path:
        """Write the self-contained HTML report (leaderboard, progress, val-vs-test,
        importances, and the bundle's ROC curves and heat maps) and return its path.
        ``bundle``: the exported model to show (a named one must exist; default
        ``models/<category>`` when it does). ``out``: default ``report.html`` in that
        bundle folder when it exists, else in the experiment folder."""
        from automl_ad.deploy.report import build_report

        bundle_dir = Path(bundle) if bundle is not None else Path(DEFAULT_MODELS) / self.category
        if out is None:
            out = (bundle_dir if (bundle_dir / "manifest.json").is_file() else self.folder) / "report.html"
        self._pull_checkpoints()
        return build_report(self.folder, Path(out), bundle_dir=bundle_dir, bundle_required=bundle is not None,
                            progress=progress)

    def ship(self, bundle_dir: PathLike | None = None, *, k: int = 5,
             progress: "DeployProgress | None" = None) -> "Shipped":
        """Ensemble, export and report in one go, as ``automl-ad search`` ends: the bundle
        goes to ``bundle_dir`` (default ``models/<category>``) with its ``report.html``;
        on a bucket, the choice and the bundle are pushed back to it."""
        from automl_ad.deploy.pipeline import ship

        bundle_dir = Path(bundle_dir) if bundle_dir is not None else Path(DEFAULT_MODELS) / self.category
        shipped = ship(self.folder, self.experiment, self.category, bundle_dir, k, self.storage,
                       progress=_progress(progress))
        self._checkpoints_pulled = True
        self.chosen = shipped.choice
        return shipped

    # --- helpers ----------------------------------------------------------------------
    def _remote(self):
        from automl_ad.results.remote_storage import parse_storage

        spec = parse_storage(self.storage)
        return spec if spec.is_remote else None

    def _pull_checkpoints(self) -> None:
        """On a bucket: bring the val sets and the checkpoints the trials name into the
        mirror once (what ensembling, export and the report load)."""
        if self._checkpoints_pulled or self._remote() is None:
            return
        from automl_ad.results.remote_storage import reading_view

        reading_view(self.storage, self.category, self.experiment, checkpoints=True)
        self._checkpoints_pulled = True

    def _push(self) -> None:
        remote = self._remote()
        if remote is not None:  # the new ensembles row goes back to the bucket
            remote.push(self.experiment)


def _progress(progress: "DeployProgress | None") -> "DeployProgress":
    """Steps and bars on a terminal; quiet in a notebook, a pipe or a log (the steps'
    warnings and errors still reach the caller)."""
    if progress is not None:
        return progress
    from automl_ad.deploy.progress import DeployProgress

    return DeployProgress(quiet=not sys.stderr.isatty())


def check_formats(formats: Sequence[str] | str) -> list[str]:
    """Bundle formats, checked before any work (nothing is stored for a bad one)."""
    from automl_ad.deploy.export import FORMATS

    text = formats if isinstance(formats, str) else ",".join(formats)
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or "onnx" not in names:
        raise UserError(f"--format {text!r}: give onnx, optionally with torchscript (e.g. onnx,torchscript)")
    return names


def check_fpr(fpr: float | None) -> None:
    if fpr is not None and not 0.0 <= fpr < 1.0:
        raise UserError(f"--fpr {fpr}: give a false-alarm rate in [0, 1), e.g. 0.01")


def open_search(category: str, *, experiment: str | None = None, storage: PathLike = DEFAULT_STORAGE) -> SearchResult:
    """A stored search of ``category``: ``experiment``, else the newest one in ``storage``
    (UserError when there is none, or it stored no trial yet). A bucket's tables are
    pulled into the local mirror first (its checkpoints when a step needs them)."""
    from automl_ad.experiment import has_record
    from automl_ad.results import store
    from automl_ad.results.remote_storage import reading_view

    view, name = reading_view(storage, category, experiment)
    where = view.uri if view.is_remote else view.local
    if name is None:
        found = store.list_experiments(view.local, category)
        if not found:
            raise UserError(f"no stored search for category {category!r} under {where}")
        name = found[0]
    folder = store.experiment_dir(view.local, name)
    if not has_record(folder):
        raise UserError(f"no search named {name!r} in {where}")
    if not store.stored_trial_ids(folder):
        raise UserError(f"no trials stored in {folder}")
    return SearchResult(category, name, folder, str(storage))


def _result(summary: "SearchSummary", storage: PathLike) -> SearchResult:
    return SearchResult(summary.category, summary.experiment, summary.experiment_dir, str(storage), summary)


def search_options(category: str, budget: str, *, data: PathLike | None = None,
                   methods: Sequence[str] | None = None, seed: int = 0, storage: PathLike = DEFAULT_STORAGE,
                   live: bool = False, experiment: str | None = None, resume: bool = False,
                   image_size: int | None = None, space_file: PathLike | None = None,
                   val_defects: PathLike | None = None, searcher: str = "tpe", max_concurrent: int | None = None,
                   address: str | None = None, gpus_per_trial: float = 1.0, max_gpus: float | None = None,
                   wandb: bool = False, use_ray_train: bool = True, space_dir: PathLike | None = None,
                   calibrate: bool = True) -> "SearchOptions":
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
        calibrate=calibrate, searcher=searcher)


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def search(category: str, budget: str, *, data: PathLike | None = None, methods: Sequence[str] | None = None,
           seed: int = 0, storage: PathLike = DEFAULT_STORAGE, live: bool = False, experiment: str | None = None,
           resume: bool = False, image_size: int | None = None, space_file: PathLike | None = None,
           val_defects: PathLike | None = None, searcher: str = "tpe", max_concurrent: int | None = None,
           address: str | None = None, gpus_per_trial: float = 1.0, max_gpus: float | None = None,
           wandb: bool = False, use_ray_train: bool = True, space_dir: PathLike | None = None,
           calibrate: bool = True, keep_ray: bool = False) -> SearchResult:
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
                             use_ray_train=use_ray_train, space_dir=space_dir, calibrate=calibrate)
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
    from automl_ad.tuning.search import Job, run_jobs

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
    from automl_ad.tuning.search import load_jobs

    return {job.category: job.budget for job in load_jobs(Path(path))}


def all_products(data: PathLike | None = None) -> list[str]:
    """Every category folder under ``data`` (one holding train/good/), else every built-in product."""
    from automl_ad.tuning.search import all_categories

    return all_categories(_path(data))


def plan(category: str, budget: str, *, data: PathLike | None = None, methods: Sequence[str] | None = None,
         seed: int = 0, image_size: int | None = None, space_file: PathLike | None = None,
         max_concurrent: int | None = None, gpus_per_trial: float = 1.0, max_gpus: float | None = None, storage: PathLike = DEFAULT_STORAGE,
         experiment: str | None = None, resume: bool = False, searcher: str = "tpe",
         use_ray_train: bool = True, space_dir: PathLike | None = None, calibrate: bool = False) -> "Plan":
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
                             use_ray_train=use_ray_train, space_dir=space_dir, calibrate=calibrate)
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

