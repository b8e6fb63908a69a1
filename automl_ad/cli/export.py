"""``ensemble``, ``export`` and ``predict``: from a finished search to decisions on images."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click


if TYPE_CHECKING:
    from automl_ad.deploy.progress import DeployProgress

_STORAGE = click.option("--storage", default="results", show_default=True,
                        help="Results folder, file:// URI, or s3:// / gs:// URI the search wrote to.")
_EXPERIMENT = click.option("--experiment", "-e", help="Search name (default: the newest of the category).")


def _progress() -> DeployProgress:
    """Steps and bars on a terminal. In a pipe or a log, stderr stays what scripts read
    from these commands: warnings and, for a refusal, its one ``error:`` line (``search``,
    which runs the same steps unattended, always shows them: ``pipeline.ship``)."""
    from automl_ad.deploy.progress import DeployProgress

    return DeployProgress(quiet=not sys.stderr.isatty())


@click.command("ensemble")
@click.option("--category", "-c", required=True)
@_EXPERIMENT
@_STORAGE
@click.option("--k", default=3, show_default=True, type=click.IntRange(1),
              help="Most members: the best on val, then of the trials tied with it the best of each other backbone "
                   "(its method first), then those whose val scores agree least with those in.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1), help="Candidates: the best trials by val objective.")
@click.option("--fusion", type=click.Choice(["mean", "max"]), default="mean", show_default=True)
@click.option("--max-latency-ms", type=click.FloatRange(0, min_open=True), help="Only models whose measured CPU latency (batch 1) fits.")
def ensemble_command(category, experiment, storage, k, top, fusion, max_latency_ms):
    """Ensemble the best trials of a search and choose single model vs ensemble on val.

    The choice is stored in the `ensembles` Parquet table of the experiment.

    \b
    Example:
      automl-ad ensemble --category screw --k 3
    """
    from automl_ad import api

    result = api.open_search(category, experiment=experiment, storage=storage)
    print_choice(result.ensemble(k, top=top, fusion=fusion, max_latency_ms=max_latency_ms, progress=_progress()))


def print_choice(choice) -> None:
    def fmt(v):
        return "missing" if v is None else f"{v:.4f}"

    members = ", ".join(f"{c.method}:{c.trial_id}x{choice.weights[c.trial_id]}" for c in choice.candidates)
    click.echo(f"chosen: {choice.kind} [{members}]  val objective {choice.objective:.4f}  latency {choice.latency_ms:.1f} ms")
    click.echo(f"  val  image AUROC {fmt(choice.val.get('image_auroc'))}  AUPRO {fmt(choice.val.get('aupro'))}  (anomaly families: {', '.join(choice.val_families)})")
    click.echo(f"  test image AUROC {fmt(choice.test.get('image_auroc'))}  pixel AUROC {fmt(choice.test.get('pixel_auroc'))}  AUPRO {fmt(choice.test.get('aupro'))}  (reported, never optimised)")


@click.command("export")
@click.option("--category", "-c", required=True)
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Bundle folder. Default: models/<category>.")
@_EXPERIMENT
@_STORAGE
@click.option("--format", "formats", default="onnx,torchscript", show_default=True, help="Comma-separated: onnx (required), torchscript.")
@click.option("--k", default=3, show_default=True, type=click.IntRange(1), help="Most ensemble members (see ensemble --help).")
@click.option("--fpr", type=float, help="Calibrate the threshold to this false-alarm rate on val-good (default: F1-max on val).")
@click.option("--max-latency-ms", type=click.FloatRange(0, min_open=True), help="Only models whose measured CPU latency (batch 1) fits.")
def export_command(category, out, experiment, storage, formats, k, fpr, max_latency_ms):
    """Write the deployable bundle of a category: model.onnx (+ TorchScript) and manifest.json.

    \b
    Examples:
      automl-ad export --category screw --out models/screw
      automl-ad export -c screw --fpr 0.01 --format onnx
    """
    from automl_ad import api

    result = api.open_search(category, experiment=experiment, storage=storage)
    detector = result.export(out, k=k, formats=formats, fpr=fpr, max_latency_ms=max_latency_ms,
                             progress=_progress())
    print_choice(result.chosen)
    point = detector.manifest["operating_point"]
    click.echo(f"threshold {point['threshold']:.4f} ({point['rule']}; val false alarms {point['val_false_alarm_rate']:.3f}, recall {point['val_recall']:.3f})")
    click.echo(f"wrote {detector.folder} ({', '.join(detector.manifest['files'].values())}, manifest.json)")


@click.command("predict")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Folder for heat-map overlay PNGs.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
def predict_command(bundle, images, out, fmt, batch_size):
    """Score image files (or folders) with a bundle: score, decision, overlays.

    Needs only the bundle folder (ONNX Runtime): no Ray, no training code. Unreadable
    files get an error line and the rest are scored; exit code 1 if any file failed.

    \b
    Example:
      automl-ad predict models/screw images/*.png --out overlays
    """
    from automl_ad import api

    detector = api.load(bundle)
    results = detector.predict_files(images, out_dir=out, batch_size=batch_size)
    rows = [{"path": r.path, "score": r.score, "anomalous": r.anomalous, "error": r.error, "overlay": r.overlay} for r in results]
    if fmt == "json":
        click.echo(json.dumps({"threshold": detector.threshold, "predictions": rows}, indent=1))
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        click.echo(buffer.getvalue().rstrip())
    failed = [r for r in results if r.error]
    for r in failed:
        click.echo(f"error: {r.error}", err=True)
    if failed:
        sys.exit(1)


commands = [ensemble_command, export_command, predict_command]
