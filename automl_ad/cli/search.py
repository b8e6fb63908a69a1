"""``automl-ad search`` (the AutoML run) and ``automl-ad results`` (the leaderboard)."""

from __future__ import annotations

from pathlib import Path

import click

from automl_ad.errors import Interrupted, UserError, as_out_of_space, out_of_space

DEFAULT_STORAGE = "results"


def _methods_option(value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise UserError(f"--methods {value!r}: give names separated by commas, e.g. draem,nsa")
    return names


@click.command("search")
@click.option("--category", "-c",
              help="Product (category) to search for; 'all': every category folder under --data "
                   "(or every built-in product), one search each with the same --budget.")
@click.option("--budget", "-b",
              help="50gpu-h, 90gpu-m, 4cpu-h (devices x trial time), 20m, 2h (search time) or 30trials "
                   "(per category with --category all).")
@click.option("--jobs", "jobs_file", type=click.Path(path_type=Path),
              help="YAML list of {category: screw, budget: 8gpu-h}: one search per item, one after the other.")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset root in MVTec AD layout. Default: built-in products.")
@click.option("--methods", help="Restrict to these methods, comma separated (default: every method with a search space).")
@click.option("--space", "space_file", type=click.Path(path_type=Path), help="YAML adding to or overriding search_spaces/.")
@click.option("--max-concurrent", type=click.IntRange(1), help="Trials running at once (default: as many as the cluster holds).")
@click.option("--experiment", help="Experiment name (default: <category>-<date>-<time>; with --resume: the latest).")
@click.option("--resume", is_flag=True, help="Continue an interrupted search (same category, budget and seed).")
@click.option("--address", help="Ray cluster address to join (default: start Ray on this machine).")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True,
              help="Results folder, file:// URI, or s3://bucket/prefix / gs://bucket/prefix (credentials from the "
                   "environment; a local mirror under ~/.cache/automl_ad/storage). On a cluster: a bucket or a shared mount.")
@click.option("--wandb", is_flag=True, help="Log every trial to Weights & Biases (offline unless WANDB_MODE says otherwise).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--image-size", type=click.IntRange(16, 2048), help="Pin one image size (default: the choices in common.yaml).")
@click.option("--geometry", type=click.Choice(["auto", "square", "keep_aspect", "tiled"]), default="auto", show_default=True,
              help="How images become the model's input. auto: keep the images' aspect when they are clearly not "
                   "square (e.g. 500x1260 px parts become 416x160 at the 256 px pixel budget), else square; "
                   "square: squash every image to a square; keep_aspect: always keep the median aspect; "
                   "tiled: 2x2 overlapping tiles of keep_aspect's shape cut from the image at about twice the "
                   "resolution per side (thin defects on large images; ~4x the cost per image).")
@click.option("--texture-dir", type=click.Path(path_type=Path),
              help="Folder of texture images (e.g. DTD) that DRAEM-style (perlin) synthesis pastes as anomaly "
                   "sources, as the DRAEM paper does. Default: a procedural texture bank.")
@click.option("--val-defects", type=click.Path(path_type=Path), help="Real defects for validation: <dir>/<defect-type>/*.png.")
@click.option("--ensemble-k", default=3, show_default=True, type=click.IntRange(1),
              help="Most members of the ensemble built from the best trials at the end (1: best single model).")
@click.option("--models", "models_dir", default="models", show_default=True, type=click.Path(path_type=Path),
              help="Where the deployable bundle goes: <models>/<category>.")
@click.option("--no-export", is_flag=True, help="Stop after the leaderboard: no ensemble, bundle or report.")
@click.option("--gpus-per-trial", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="GPUs per trial on a GPU budget: a fraction shares a GPU; 2 or more runs one Train worker per GPU (data parallel).")
@click.option("--max-gpus", type=click.FloatRange(0), default=None,
              help="GPUs the search may hold at once (default: those in the cluster at start). On a cluster "
                   "that starts GPU nodes from zero: the most its autoscaler provides; trials then ask for them.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the schedule the search would run (per method and image size: steps, paper-epoch "
                   "equivalent, rungs, seconds per trial, expected trials) and exit; no training, no Ray. A GPU "
                   "budget on a machine without one uses the GPU prior. With --resume: the stored plan.")
@click.option("--searcher", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True,
              help="tpe: Optuna TPE + ASHA early stopping, started from each method's defaults; random: random "
                   "sampling, no early stopping, no warm start (a reference to compare against).")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE|FILE.py",
              help="A module or .py file with methods or synthesis families of your own (@register, "
                   "@register_family); imported here and in every trial. Repeatable; AUTOML_AD_PLUGINS too.")
@click.option("--calibrate", is_flag=True,
              help="With --plan: first time the speeds this machine has not measured yet (a few training steps "
                   "per method and size; cached in ~/.cache/automl_ad/calibration.json).")
def search_command(category, budget, jobs_file, data, methods, space_file, max_concurrent, experiment, resume,
                   address, storage, wandb, seed, image_size, geometry, texture_dir, val_defects, ensemble_k, models_dir, no_export,
                   gpus_per_trial, max_gpus, searcher, plan_only, calibrate, plugins):
    """Search methods, backbones and synthetic-anomaly parameters for a product
    (or for several, one after the other: --category all, --jobs FILE).

    Trials are chosen by Optuna (TPE) and stopped early by ASHA on the validation
    objective (held-out good images + synthetic anomalies of other families); test
    metrics are stored for every trial but never used for selection.

    \b
    Examples:
      automl-ad search --category screw --budget 10m
      automl-ad search -c screw --data /data/mvtec --budget 50gpu-h --methods draem,nsa
      automl-ad search -c screw --budget 10m --resume        # after an interruption
      automl-ad search -c all --data /data/mvtec --budget 4gpu-h --max-gpus 8
      automl-ad search --jobs jobs.yaml --address auto --storage /mnt/shared/automl_ad
      automl-ad search -c screw --budget 50gpu-h --plan      # the schedule only, from any machine

    At the end: test metrics of every trial (not charged to the budget), the leaderboard
    (val objective ± its noise, trials tied with the best), then the trials the val set
    cannot tell from the best are ensembled (or the best alone, when it is clearly
    better), exported to <models>/<category> (ONNX + TorchScript + manifest.json) and
    report.html is written next to it.
    """
    from automl_ad import api
    from automl_ad.tuning.interrupt import SignalGuard

    jobs = _jobs_of(category, budget, jobs_file, data)
    if calibrate and not plan_only:
        raise UserError("--calibrate goes with --plan (a search measures what it needs by itself)")
    chosen = _methods_option(methods)
    if plan_only:
        targets = jobs or {category: budget}
        for product, product_budget in targets.items():
            schedule = api.plan(product, product_budget, data=data, methods=chosen, seed=seed, image_size=image_size,
                                space_file=space_file, max_concurrent=max_concurrent, gpus_per_trial=gpus_per_trial,
                                max_gpus=max_gpus, storage=storage, experiment=experiment, resume=resume,
                                searcher=searcher, calibrate=calibrate, plugins=plugins, geometry=geometry)
            if len(targets) > 1:
                click.echo(f"\n[{product}]")
            click.echo(schedule.text())
        return

    options = dict(data=data, methods=chosen, seed=seed, storage=storage, live=True, experiment=experiment,
                   resume=resume, image_size=image_size, space_file=space_file, val_defects=val_defects,
                   searcher=searcher, max_concurrent=max_concurrent, address=address, gpus_per_trial=gpus_per_trial,
                   max_gpus=max_gpus, wandb=wandb, plugins=plugins, geometry=geometry, texture_dir=texture_dir)

    def finish(result: api.SearchResult) -> None:
        summary = result.summary
        click.echo(f"\n[{result.category}] experiment {result.experiment}: {summary.trials} trials stored in "
                   f"{result.location}; budget used {summary.budget.describe(summary.budget_used)}")
        click.echo(result.leaderboard_text())
        if not no_export:
            finish_with_bundle(result, models_dir / result.category, ensemble_k)

    # SIGINT/SIGTERM stop the search cleanly, and a full disk stops it in one line; both
    # end with the command that resumes this very search (tuning/interrupt.py).
    with SignalGuard() as guard:
        try:
            if jobs:
                results = api.search_many(jobs, on_done=finish, **options)
                click.echo("\n" + "\n".join(f"{r.category}: {r.summary.trials} trials, best "
                                              f"{'-' if not r.summary.best else format(r.summary.best['objective'], '.4f')} "
                                              f"({r.folder})" for r in results))
            else:
                finish(api.search(category, budget, **options))
        except Interrupted as stop:
            raise stop.explained(_stopped_text(stop, guard, bool(jobs))) from None
        except Exception as error:
            if not out_of_space(error):
                raise
            raise as_out_of_space(error).with_hint(_after_full_disk(guard, bool(jobs))) from None


def _saved(guard) -> bool:
    """Whether the interrupted search left anything to resume (its record is the mark)."""
    from automl_ad import experiment as layout

    return guard.folder is not None and layout.has_record(guard.folder)


def resume_command(experiment: str | None) -> str:
    """This ``search`` command as the user gave it (every option set on the command line,
    in canonical form), naming ``experiment`` and ending with ``--resume``."""
    import shlex

    from click.core import ParameterSource

    ctx = click.get_current_context()
    left_out = {"resume", "experiment", "plan_only", "calibrate"}
    words = ["automl-ad", ctx.info_name or "search"]
    for param in ctx.command.params:
        if param.name in left_out or not isinstance(param, click.Option):
            continue
        if ctx.get_parameter_source(param.name) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        name = max((opt for opt in param.opts if opt.startswith("--")), key=len)
        value = ctx.params[param.name]
        if param.is_flag:
            words += [name] if value else []
        else:
            words += [name, shlex.quote(str(value))]
    if experiment:
        words += ["--experiment", shlex.quote(experiment)]
    return " ".join(words + ["--resume"])


def _resume_target(guard, many: bool) -> str | None:
    """The experiment the resume command names: this search's, or for many products
    (--category all, --jobs) the one the user named (each product's own is found)."""
    if many:
        return click.get_current_context().params.get("experiment")
    return guard.experiment


def _stopped_text(stop: Interrupted, guard, many: bool) -> str:
    from automl_ad.results import store

    if not many and not _saved(guard):
        return f"search stopped by {stop.name} before anything was stored; run the same command again to start it"
    command = resume_command(_resume_target(guard, many))
    if guard.folder is not None and _saved(guard):
        stored = len(store.stored_trial_ids(guard.folder))
        kept = (f"experiment {guard.experiment} is saved in {guard.folder} "
                f"({stored} trial{'' if stored == 1 else 's'} stored)")
    else:
        kept = "the products searched so far are saved"
    return f"search stopped by {stop.name}; {kept}; resume it with: {command}"


def _after_full_disk(guard, many: bool) -> str:
    if many or _saved(guard):
        return f"free space there, then resume with: {resume_command(_resume_target(guard, many))}"
    return "free space there, then run the same command again"


def _jobs_of(category: str | None, budget: str | None, jobs_file: Path | None, data: Path | None) -> dict[str, str]:
    """The searches asked for, {category: budget}: {} for a single --category, else one per product."""
    from automl_ad import api

    if jobs_file is not None:
        if category or budget:
            raise UserError("--jobs gives each category its budget: leave out --category and --budget")
        return api.read_jobs(jobs_file)
    if not category:
        raise UserError("give --category (a product, or 'all') or --jobs FILE")
    if not budget:
        raise UserError(f"--category {category}: --budget is required")
    if category == "all":
        return {name: budget for name in api.all_products(data)}
    return {}


def finish_with_bundle(result, bundle_dir: Path, k: int) -> None:
    """Ensemble, choose, export and report (``SearchResult.ship``), and say what was made."""
    from automl_ad.cli.export import print_choice
    from automl_ad.deploy.progress import DeployProgress

    # Always shown: this runs right after a search the user is watching.
    shipped = result.ship(bundle_dir, k=k, progress=DeployProgress())
    print_choice(shipped.choice)
    point = shipped.manifest["operating_point"]
    click.echo(f"deployable bundle: {bundle_dir} (threshold {point['threshold']:.4f}, {point['rule']})")
    click.echo(f"report: {shipped.report}")
    click.echo(f"next: automl-ad predict {bundle_dir} <images...> --out overlays/")
    if shipped.pushed_to:
        click.echo(f"copied to {shipped.pushed_to}/ (ensembles/, bundle/)")


@click.command("results")
@click.option("--category", "-c", required=True)
@click.option("--experiment", help="Experiment name (default: the latest of this category).")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True,
              help="Results folder, file:// URI, or s3:// / gs:// URI the search wrote to.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(1))
def results_command(category, experiment, storage, top):
    """Leaderboard of a search, and how well val objective ranks trials on test."""
    from automl_ad import api

    result = api.open_search(category, experiment=experiment, storage=storage)
    click.echo(f"experiment {result.experiment} ({result.folder})")
    click.echo(result.leaderboard_text(top))


commands = [search_command, results_command]
