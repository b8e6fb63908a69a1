"""The result of a search: its leaderboard, verdict, and the steps that ship a model.

Why an object: after a search the user asks the store questions (which trial is best,
can val be trusted) and then runs the deploy steps on it (ensemble, export, report);
the ``results``, ``ensemble``, ``export`` and ``report`` commands do the same through
:func:`open_search`. Reading is from a folder or a bucket's local mirror.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from automl_ad.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from automl_ad.api.detector import Detector
    from automl_ad.deploy.choice import Choice
    from automl_ad.deploy.pipeline import Shipped
    from automl_ad.deploy.progress import DeployProgress
    from automl_ad.tuning.search import SearchSummary

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
    _checkpoints_pulled: bool = field(default=False, repr=False, init=False)

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
    def ensemble(self, k: int = 3, *, top: int = 10, fusion: str = "mean", max_latency_ms: float | None = None,
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

    def export(self, out: PathLike | None = None, *, choice: "Choice | None" = None, k: int = 3,
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

    def ship(self, bundle_dir: PathLike | None = None, *, k: int = 3,
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
