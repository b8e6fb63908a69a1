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
    from automl_ad import api

    result = api.open_search(category, experiment=experiment, storage=storage)
    click.echo(f"wrote {result.report(out, bundle=bundle)}")
