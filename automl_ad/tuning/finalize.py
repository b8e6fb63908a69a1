"""A trial's outcome into the store: its row when it ends (``finalize_trial``), rows no
callback could write (``store_missing``), and test metrics after the search
(``evaluate_tests``: reported, never used, never charged to the budget)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any, Callable

from automl_ad import experiment as layout
from automl_ad.methods.base import get_method_class
from automl_ad.results import leaderboard, store
from automl_ad.results.remote_storage import Storage
from automl_ad.training.loop import evaluate, load_trained_method
from automl_ad.tuning.budget import Ledger
from automl_ad.param_keys import split_config
from automl_ad.tuning.trainable import TrialContext, TrialDevices, load_trial_data

def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def checkpoint_location(reported: str | None, checkpoint: Any, storage: Storage | None) -> str | None:
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
        backbone=split.method_params.get("backbone") or default_backbone(split.method),
        synthesis=split.synthesis, image_size=split.image_size, params=config, status=status, result=result,
        max_epochs=context.max_epochs, wall_s=float(wall_s if wall_s is not None else entry.get("wall_s", 0.0)),
        devices=TrialDevices(context, device_kind)(config), device_kind=device_kind,
        budget_used=float(entry.get("used", 0.0)), seed=context.seed,
        # Inside the experiment: relative, so any copy or mirror of it finds the file.
        checkpoint=storage.relative_to_experiment(checkpoint, context.experiment) if storage else checkpoint,
        data_fingerprint=fingerprints.get(split.image_size), started=started, ended=utc_now(), error=error,
    )
    store.store_trial(experiment_dir, outcome, _saved_reports(checkpoint))


def default_backbone(method: str) -> str | None:
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


def store_missing(folder: Path, context: TrialContext, category: str, results: Any, ledger: Ledger,
                   device_kind: str, fingerprints: dict[int, str], storage: Storage | None = None) -> None:
    """Rows for trials that ended while no callback could store them (driver killed)."""
    stored = store.stored_trial_ids(folder)
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if trial_id in stored or not result.config:
            continue
        checkpoint = checkpoint_location(metrics.get("checkpoint_path"), result.checkpoint, storage)
        status = "error" if result.error else (
            "finished" if int(metrics.get("epoch", 0) or 0) >= context.max_epochs else "stopped")
        entry = ledger.trial(trial_id)
        if entry is not None and entry.get("state") != "finished":
            ledger.record(trial_id, entry.get("devices", 0.0), entry.get("wall_s", 0.0), finished=True)
        finalize_trial(folder, context, category, trial_id, dict(result.config), metrics, checkpoint,
                       status, None, ledger, device_kind, fingerprints, storage=storage)
