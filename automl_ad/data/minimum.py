"""The smallest product a search (or one training run) can use, from its file list alone.

``train/good`` is split into *fit* images (what a method learns normal from) and
*val-good* images (held out: every trial is judged on them and on the synthetic
anomalies made from them). Both must hold at least one image, so the smallest usable
product has ``MIN_TRAIN_GOOD`` = 2 good images. That is also enough for every method a
plan can run: each learns from a single fit image (``tests/test_minimum_product.py``
trains every registered method on exactly this split), so no method asks for more.

``check_product`` refuses a smaller product in one line before anything is decoded,
written or started (the search calls it before Ray starts), and lists what a product
just above the minimum cannot give, so the search says so instead of failing later.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from automl_ad.data.layout import GOOD, discover_category
from automl_ad.errors import UserError

MIN_FIT_IMAGES = 1  # every method builds or trains its model from one normal image
MIN_VAL_GOOD = 1  # the val objective (image AUROC) needs one good image to rank against
MIN_TRAIN_GOOD = MIN_FIT_IMAGES + MIN_VAL_GOOD
DEFAULT_VAL_FRACTION = 0.2


def held_out(count: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> int:
    """How many of ``count`` train/good images the split holds out for validation:
    ``val_fraction`` of them rounded, at least one when there are two or more, and never
    all of them (``data.dataset.split_train`` draws which)."""
    if count < MIN_TRAIN_GOOD:
        return 0
    return min(count - MIN_FIT_IMAGES, max(MIN_VAL_GOOD, math.floor(count * val_fraction + 0.5)))


def _smallest_count_holding_out(val_good: int, val_fraction: float) -> int:
    count = MIN_TRAIN_GOOD
    while held_out(count, val_fraction) < val_good:
        count += 1
    return count


@dataclass(frozen=True)
class ProductSize:
    """How a product's train/good splits; ``shortfalls`` says what a small one lacks."""

    category: str
    train_dir: Path
    good: int
    fit: int
    val_good: int
    val_fraction: float = DEFAULT_VAL_FRACTION

    @classmethod
    def of(cls, category: str, train_dir: Path, good: int,
           val_fraction: float = DEFAULT_VAL_FRACTION) -> "ProductSize":
        """The split of ``good`` train/good images, as the loader makes it."""
        val_good = held_out(good, val_fraction)
        return cls(category, Path(train_dir), good, good - val_good, val_good, val_fraction)

    def shortfalls(self) -> list[str]:
        """One line per thing this product is too small for (empty for a usual product)."""
        if self.val_good > MIN_VAL_GOOD:
            return []
        more = _smallest_count_holding_out(MIN_VAL_GOOD + 1, self.val_fraction)
        return [f"category {self.category!r} has {self.good} good images ({self.fit} to fit, {self.val_good} held "
                f"out): every trial is judged on that one good image and the synthetic anomalies made from it, "
                f"so the model choice and the bundle's threshold are coarse ({more} or more good images hold out "
                f"{MIN_VAL_GOOD + 1})"]


def product_size(root: Path, category: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> ProductSize:
    """The split of ``<root>/<category>/train/good`` (files counted, nothing decoded)."""
    layout = discover_category(Path(root), category)
    return ProductSize.of(category, layout.folder / "train" / GOOD, len(layout.train), val_fraction)


def check_product(root: Path, category: str, *, needed_for: str = "a search",
                  val_fraction: float = DEFAULT_VAL_FRACTION, notify: bool = True) -> ProductSize:
    """The product's split, or UserError (one line: the count found and the minimum) when
    ``train/good`` cannot give one fit and one val image. With ``notify``, a product just
    above the minimum gets one ``notice:`` line per shortfall on stderr."""
    size = product_size(root, category, val_fraction)
    if size.good < MIN_TRAIN_GOOD:
        found = f"{size.good} good image" + ("" if size.good == 1 else "s")
        raise UserError(
            f"category {category!r}: {size.train_dir} holds {found}; {needed_for} needs at least {MIN_TRAIN_GOOD} "
            f"({MIN_FIT_IMAGES} to fit, {MIN_VAL_GOOD} held out to validate on)")
    if notify:
        for line in size.shortfalls():
            print(f"notice: {line}", file=sys.stderr)
    return size
