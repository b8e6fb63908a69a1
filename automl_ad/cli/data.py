"""``automl-ad data``: check a dataset folder, or write the built-in procedural products."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from automl_ad.errors import UserError
from automl_ad.data.builtin import DEFAULT_N_TEST, DEFAULT_N_TRAIN


@click.group("data")
def command() -> None:
    """Inspect datasets in the MVTec AD layout, or generate the built-in ones.

    \b
    Layout expected under ROOT:
      <category>/train/good/*.png                          normal images (required)
      <category>/test/good/*.png                           normal test images
      <category>/test/<defect-type>/*.png                  defective test images
      <category>/ground_truth/<defect-type>/<stem>_mask.png  optional masks (0 = normal)
    Images may be PNG, JPEG, BMP or TIFF; grayscale, RGBA and 16-bit are converted.
    """


@command.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--category", "-c", required=True, help="Category folder under ROOT, e.g. screw.")
def check(root: Path, category: str) -> None:
    """Decode every file of ROOT/CATEGORY and report counts, sizes, masks and problems.

    Exits 0 when the category can be trained on, 2 when it has errors (unreadable or
    truncated files, masks of the wrong size, no training images). Warnings (masks
    without images, unknown folders, an empty test split) do not change the exit code.

    \b
    Examples:
      automl-ad data check /data/mvtec --category screw
      automl-ad data check ~/datasets/my_line --category bracket
    """
    from automl_ad.data.check import check_category, format_report

    report = check_category(root, category)
    click.echo(format_report(report))
    if not report.usable:
        sys.exit(2)


def _parse_categories(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--categories {text!r}: give comma-separated names, e.g. screw,fabric")
    return names


@command.command("synth")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write the dataset root into.")
@click.option("--categories", default=None, metavar="A,B",
              help="Comma-separated built-in products (default: all: fabric, marble, screw, washer).")
@click.option("--n-train", default=DEFAULT_N_TRAIN, show_default=True, type=int, help="Good training images per category.")
@click.option("--n-test", default=DEFAULT_N_TEST, show_default=True, type=int, help="Test images per category (good + defects).")
@click.option("--image-size", default=256, show_default=True, type=int, help="Side of the square images, pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same files.")
def synth(out: Path, categories: str | None, n_train: int, n_test: int, image_size: int, seed: int) -> None:
    """Write the built-in procedural products to OUT in the MVTec AD layout.

    Useful to try the whole pipeline offline, or to benchmark at a chosen size. An
    existing category folder under OUT is replaced as a whole.

    \b
    Examples:
      automl-ad data synth --out /tmp/builtin
      automl-ad data synth --out /tmp/small --categories screw,fabric --n-train 40 --n-test 20 --image-size 64
      automl-ad search --data /tmp/small --category screw --budget 1cpu-h
    """
    from automl_ad.data.builtin import BUILTIN_CATEGORIES, generate_builtin

    names = _parse_categories(categories)
    started = time.perf_counter()
    root = generate_builtin(out, names, n_train=n_train, n_test=n_test, image_size=image_size, seed=seed)
    elapsed = time.perf_counter() - started
    for name in names if names is not None else list(BUILTIN_CATEGORIES):
        folder = Path(root) / name
        n_train_written = sum(1 for _ in (folder / "train" / "good").glob("*.png"))
        n_test_written = sum(1 for _ in (folder / "test").glob("*/*.png"))
        n_masks = sum(1 for _ in (folder / "ground_truth").glob("*/*.png"))
        click.echo(f"wrote {folder}: {n_train_written} train, {n_test_written} test images, "
                   f"{n_masks} masks ({image_size}x{image_size})")
    click.echo(f"done in {elapsed:.1f} s")
