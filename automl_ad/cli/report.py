"""``automl-ad report``: one self-contained HTML page about a finished search."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.option("--category", "-c", required=True, help="Product (category) the search was run for.")
@click.option("--experiment", "-e", help="Search name (default: the newest of the category).")
@click.option("--storage", default="results", show_default=True,
              help="Results folder, file:// URI, or s3:// / gs:// URI the search wrote to.")
@click.option("--bundle", type=click.Path(path_type=Path),
              help="Exported model to show. Default: models/<category> when it exists.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="HTML file to write.")
def command(category: str, experiment: str | None, storage: str, bundle: Path | None, out: Path) -> None:
    """Write an HTML report of a search: leaderboard, progress, val-vs-test agreement,
    methods, backbones, parameter importances, and the deployed model's ROC curves and
    heat maps. The file opens offline in any browser (no server, no scripts).

    \b
    Example:
      automl-ad report --category screw --out screw_report.html
    """
    from automl_ad.deploy.choice import find_experiment
    from automl_ad.results.remote_storage import reading_view
    from automl_ad.deploy.report import build_report

    view, experiment = reading_view(storage, category, experiment, checkpoints=True)
    folder = find_experiment(view.local, category, experiment)
    written = build_report(folder, out, bundle_dir=bundle or Path("models") / category, bundle_required=bundle is not None)
    click.echo(f"wrote {written}")
