"""``automl-ad synth``: look at synthetic anomalies before training with them."""

from __future__ import annotations

from pathlib import Path

import click

from automl_ad.cli.params import split_pairs, yaml_scalars


@click.group("synth")
def command() -> None:
    """Synthetic-anomaly families: perlin (DRAEM), nsa, cutpaste, cutpaste_scar, corruption (SSAE)."""


@command.command("preview")
@click.option("--family", "-f", required=True, help="perlin, nsa, cutpaste, cutpaste_scar or corruption.")
@click.option("--category", "-c", required=True, help="Product (category) name; selects NSA's per-category defaults.")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset root in MVTec AD layout. Default: built-in products.")
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(16, 2048))
@click.option("--n", "count", default=8, show_default=True, type=click.IntRange(1, 64), help="Examples in the grid.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--param", "-p", "params", multiple=True, help="Family parameter key=value (repeatable), e.g. -p label=binary.")
@click.option("--texture-dir", type=click.Path(path_type=Path), help="Anomaly-source images for perlin (e.g. DTD).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
def preview(family, category, data, image_size, count, seed, params, texture_dir, out):
    """Draw a grid: normal images, the same with synthetic anomalies (outlined), label maps.

    \b
    Examples:
      automl-ad synth preview --family nsa --category screw --out nsa.png
      automl-ad synth preview -f perlin -c fabric --data /data/mvtec -p beta_high=0.5 --out p.png
    """
    import torch

    from automl_ad.data.dataset import load_category, resolve_data_root
    from automl_ad.data.types import to_float
    from automl_ad.synthesis import build_synthesizer
    from automl_ad.synthesis.preview import preview_grid

    parsed = yaml_scalars(split_pairs(params, "--param"), "--param")
    build_synthesizer(family, parsed, category=category)  # bad family/params: fail before loading data
    root = resolve_data_root(data, category)
    loaded = load_category(root, category, image_size)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(loaded.fit), generator=generator)[:count]
    images = to_float(loaded.fit[pick])
    others = to_float(loaded.fit)
    written = preview_grid(family, parsed, images, generator, out, category=category, texture_dir=texture_dir, sources=others if len(others) > 1 else None)
    click.echo(f"wrote {written}")
