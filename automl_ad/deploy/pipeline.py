"""After a search: ensemble → choice → bundle → report, the user's last step done for them.

``automl-ad search`` runs :func:`ship` on every finished experiment (unless
``--no-export``); the CLI only prints what it returns. On an object store the
checkpoints Tune wrote to the bucket are pulled first and the new ``ensembles`` rows and
the bundle are pushed back (``<experiment>/bundle/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automl_ad.deploy.choice import Choice, choose_model, export_choice, store_choice
from automl_ad.deploy.progress import DeployProgress, call_with_progress
from automl_ad.deploy.report import build_report
from automl_ad.experiment import BUNDLE_DIR
from automl_ad.results.remote_storage import parse_storage, reading_view

BUNDLE_FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class Shipped:
    """What :func:`ship` made."""

    choice: Choice
    manifest: dict[str, Any]
    bundle_dir: Path
    report: Path
    pushed_to: str | None  # the experiment's URI when the results live in a bucket


def ship(folder: Path, experiment: str, category: str, bundle_dir: Path, k: int,
         storage: Path | str | None = None, progress: DeployProgress | None = None) -> Shipped:
    """Choose the model of the experiment in ``folder`` (Caruana ensemble of up to ``k``
    of the best trials, or the best single one), store the choice, export the bundle to
    ``bundle_dir`` and write its report there. ``storage``: the search's ``--storage``
    (an ``s3://``/``gs://`` one is pulled from and pushed to). ``progress``: where the
    steps are shown and timed; by default on stderr, since this runs right after a search
    the user is watching (``DeployProgress(quiet=True)`` for none)."""
    progress = progress if progress is not None else DeployProgress()
    remote = parse_storage(storage) if storage is not None else None
    remote = remote if remote is not None and remote.is_remote else None
    if remote is not None:  # checkpoints Tune wrote straight to the bucket
        with progress.step("pull the checkpoints from the bucket"):
            reading_view(storage, category, experiment, checkpoints=True)
    with progress.step(f"ensemble: choose among the best trials (k={k})"):
        choice = call_with_progress(choose_model, folder, k=k, progress=progress)
        store_choice(folder, choice, k)
    with progress.step(f"export: bundle to {bundle_dir}"):
        manifest = call_with_progress(export_choice, folder, choice, bundle_dir, formats=BUNDLE_FORMATS,
                                      progress=progress)
    with progress.step("report"):
        # The val scores the threshold was calibrated on: the report need not run the
        # graph over the whole val set a second time.
        report = build_report(folder, bundle_dir / "report.html", bundle_dir=bundle_dir,
                              val_scores=choice.val_scores.detach().cpu().numpy(),
                              val_labels=choice.val_labels.detach().cpu().numpy(), progress=progress)
    pushed_to = None
    if remote is not None:
        with progress.step("push the results and the bundle to the bucket"):
            remote.push(experiment)
            remote.push(experiment, folder=bundle_dir, under=BUNDLE_DIR)
        pushed_to = remote.experiment_uri(experiment)
    return Shipped(choice, manifest, bundle_dir, report, pushed_to)
