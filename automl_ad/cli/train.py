"""``automl-ad train``: one method, one configuration, no search."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from automl_ad.cli.params import method_params, split_pairs, yaml_scalars
from automl_ad.data.images import image_files_in
from automl_ad.errors import UserError


def _check_device(device: str) -> None:
    """``--device``: cpu, cuda or cuda:N of a GPU this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count or count == 0:
            raise UserError(f"--device {device!r}: this machine has {count} CUDA device(s)")


def _checked_synthesis(method: str, synthesis: str | None, pairs: tuple[str, ...], category: str) -> dict:
    """``--synth-param`` values, checked against the family the run will train with."""
    from automl_ad.methods.base import get_method_class
    from automl_ad.synthesis import build_synthesizer
    from automl_ad.training.loop import TrainConfig, synthesis_family

    params = yaml_scalars(split_pairs(pairs, "--synth-param"), "--synth-param")
    family = synthesis_family(TrainConfig(method=method, synthesis=synthesis), get_method_class(method))
    if family is None:
        if params:
            raise UserError(f"--synth-param: {method} trains without synthesis here, so it takes no synthesis parameters")
        return params
    try:
        build_synthesizer(family, params, category=category)
    except UserError as error:
        raise UserError(f"--synthesis/--synth-param: {error}") from None
    return params


@click.command("train")
@click.option("--method", "-m", required=True, help="Method name: draem, nsa, ssae, cfa, ast, patchcore.")
@click.option("--category", "-c", required=True, help="Product (category) folder name.")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset root in MVTec AD layout. Default: built-in products.")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(16, 2048))
@click.option("--geometry", type=click.Choice(["auto", "square", "keep_aspect", "tiled"]), default="auto", show_default=True,
              help="Input shape for --image-size (a pixel budget): as search --geometry (README \"Data\").")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1), help="Epochs (each ends with a validation).")
@click.option("--steps", type=click.IntRange(1), help="Total optimizer steps, spread evenly over --epochs (default: one pass over the fit images per epoch).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--synthesis", help="Synthetic-anomaly family (perlin, nsa, cutpaste, cutpaste_scar, corruption, none). Default: the method's.")
@click.option("--param", "-p", "params", multiple=True, help="Method parameter key=value (repeatable), e.g. -p lr=1e-4.")
@click.option("--synth-param", "synth_params", multiple=True, help="Synthesis parameter key=value (repeatable).")
@click.option("--texture-dir", type=click.Path(path_type=Path),
              help="Folder of texture images (e.g. DTD) perlin synthesis (DRAEM) pastes as anomaly sources. "
                   "Default: a procedural texture bank.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Training-step precision. auto: on CUDA the method's switch (the precision entry of its "
                   "space.yaml), fp32 on a CPU; fp32, bf16 or fp16 (with loss scaling) on any device. "
                   "Validation always runs in fp32.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder. Default: runs/<category>-<method>.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out (same options).")
@click.option("--time-limit", type=click.FloatRange(0, min_open=True), help="Minutes: stop after the first epoch that ends past this (test metrics are still reported).")
def command(method, category, data, image_size, geometry, epochs, steps, batch_size, seed, synthesis, params, synth_params, texture_dir, device, precision, out, resume, time_limit):
    """Train one method on one category, validate every epoch, report test metrics.

    Validation uses held-out good images and frozen synthetic anomalies from the
    families the method does NOT train with; the test split is only reported.

    \b
    Writes to --out: checkpoint.pt (loadable with torch.load(weights_only=True)),
    metrics.json (val per epoch, final val and test metrics), val_anomalies.safetensors.

    \b
    Examples:
      automl-ad train --method draem --category screw --epochs 5
      automl-ad train -m nsa -c fabric --data /data/mvtec --image-size 256 -p lr=5e-4
      automl-ad train -m draem -c screw --out runs/x --resume
      automl-ad train -m draem -c screw --device cuda --precision fp16
    """
    from automl_ad.data.dataset import load_category, resolve_data_root
    from automl_ad.data.geometry import check_memory, resolve as resolve_geometry, shape_text
    from automl_ad.data.layout import discover_category
    from automl_ad.data.minimum import check_product
    from automl_ad.experiment import checkpoint_file, has_checkpoint, read_checkpoint
    from automl_ad.methods.base import get_method_class
    from automl_ad.training.loop import TrainConfig, fit, synthesis_family
    from automl_ad.evaluation.validation import build_val_anomalies, load_image_set, save_image_set, val_set_for

    # Every option is checked before any data is read or folder made.
    typed_params = method_params(method, params)
    typed_synth = _checked_synthesis(method, synthesis, synth_params, category)
    _check_device(device)
    out = out or Path("runs") / f"{category}-{method}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    if resume and not has_checkpoint(out):
        raise UserError(f"--resume: no checkpoint.pt in {out}")
    if resume:
        read_checkpoint(out)  # a damaged checkpoint: one line now, before anything is written
    if not resume and has_checkpoint(out):
        raise UserError(f"{out} already holds a run: pass --resume to continue it or --out for a new folder")
    root = resolve_data_root(data, category)
    check_product(root, category, needed_for="training")  # before any folder is made
    found = discover_category(root, category)
    chosen = resolve_geometry(geometry, found.train, image_size)
    check_memory(chosen, image_size, len(found.train), len(found.test))
    shape, tiling = chosen.shape(image_size), chosen.tiling(image_size)
    loaded = load_category(root, category, image_size, shape=shape, seed=seed)
    steps_per_epoch = math.ceil(steps / epochs) if steps else None
    cfg = TrainConfig(
        method=method,
        method_params=typed_params,
        synthesis=synthesis,
        synthesis_params=typed_synth,
        image_size=image_size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        seed=seed,
        device=device,
        precision=precision,
        texture_dir=_texture_folder(texture_dir),
        tiling=None if tiling is None else tiling.to_dict(),
    )
    out.mkdir(parents=True, exist_ok=True)

    val_path = out / "val_anomalies.safetensors"
    if val_path.exists():
        anomalies = load_image_set(val_path)
    else:
        anomalies = build_val_anomalies(loaded, seed=seed)
        save_image_set(anomalies, val_path)
    family = synthesis_family(cfg, get_method_class(method))
    val_set = val_set_for(loaded.val_good, anomalies, family)
    click.echo(
        f"{method} on {category}: {len(loaded.fit)} fit, {len(val_set)} val "
        f"({int(val_set.labels.sum())} synthetic anomalies, not from {family or 'any family'}), "
        f"{len(loaded.test)} test images at {shape_text(shape)}"
    )
    began = time.perf_counter()
    def out_of_time(report, _checkpoint_dir) -> bool:
        return time_limit is not None and time.perf_counter() - began > 60 * time_limit

    result = fit(
        cfg, loaded, val_set, checkpoint_dir=out, resume_from=out if resume else None, on_epoch=out_of_time, progress=True
    )
    summary = {
        "category": category,
        "method": method,
        "config": cfg.__dict__,
        "data_fingerprint": loaded.fingerprint,
        "val": result.val,
        "objective": result.objective,
        "test": result.test,
        "epochs": [r.__dict__ for r in result.reports],
        "wall_s": time.perf_counter() - began,
        "stopped_by_time_limit": result.stopped_early,
    }
    _write_json(out / "metrics.json", summary)
    click.echo(_format_summary(result.val, result.objective, result.test))
    click.echo(f"wrote {checkpoint_file(out)} and {out / 'metrics.json'}")


def _format_summary(val: dict, objective: float, test: dict) -> str:
    def fmt(value):
        return "missing" if value is None else f"{value:.4f}"

    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
    lines = [f"{'':12}" + "".join(f"{k:>13}" for k in keys)]
    lines.append(f"{'val':12}" + "".join(f"{fmt(val.get(k)):>13}" for k in keys) + f"   objective {objective:.4f}")
    lines.append(f"{'test':12}" + "".join(f"{fmt(test.get(k)):>13}" for k in keys) + "   (reported, never optimised)")
    return "\n".join(lines)


def _write_json(path: Path, payload: dict) -> None:
    import os

    from automl_ad.errors import writing

    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, "the run's metrics"):
        try:
            tmp.write_text(json.dumps(payload, indent=2, default=str))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _texture_folder(folder: Path | None) -> str | None:
    """``--texture-dir`` checked (a folder with images) and absolute, or None."""
    if folder is None:
        return None
    image_files_in(folder, "--texture-dir")
    return str(Path(folder).resolve())
