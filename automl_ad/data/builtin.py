"""Built-in procedural products in the MVTec AD layout, so every command runs offline.

``generate_builtin(out)`` writes ``<out>/<category>/train/good/000.png``,
``test/good/*.png``, ``test/<defect>/*.png`` and ``ground_truth/<defect>/<stem>_mask.png``
(0/255). Textures: ``fabric`` (plain weave) and ``marble`` (veined stone). Objects:
``screw`` (threaded part at a random pose, single-channel like MVTec's screw) and
``washer`` (a printed ring on a mat). The drawing lives in ``builtin_draw``.

Every image has its own numpy Generator seeded by (seed, category, split, index), so
generating a subset of categories, or fewer images, gives the same files. Masks mark
exactly what the defect changed: outside the mask a defective image equals the clean
rendering of the same scene, byte for byte.

The default test split is ``DEFAULT_N_TEST_GOOD`` (40) good and ``DEFAULT_N_TEST_DEFECTIVE``
(100) defective images per product, the defects dealt round-robin over the product's
defect types so every type gets the same count (20 or 25). Any other ``n_test`` keeps the
same good share; see ``defect_plan``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from automl_ad.data import builtin_draw as draw
from automl_ad.errors import UserError

BUILTIN_CATEGORIES: dict[str, str] = {
    "fabric": "texture",
    "marble": "texture",
    "screw": "object",
    "washer": "object",
}

BUILTIN_VERSION = "builtin-v2"  # bump when the pictures or counts change, so caches regenerate
# v2: test split 40 good + 100 defective (was 15 + 45); the same drawing, train split unchanged

DEFAULT_N_TRAIN = 200
DEFAULT_N_TEST_GOOD = 40  # with 15 good (v1) one image moved image AUROC by about 2 points
DEFAULT_N_TEST_DEFECTIVE = 100  # divisible by 4 and 5: every product's defect types get equal counts
DEFAULT_N_TEST = DEFAULT_N_TEST_GOOD + DEFAULT_N_TEST_DEFECTIVE


@dataclass(frozen=True)
class _Product:
    sample: Callable[[np.random.Generator], Any]
    render: Callable[[Any, int], draw.Rendering]
    defect: Callable[[str, Any, draw.Rendering, np.random.Generator, int], Any]
    defects: tuple[str, ...]
    grayscale: bool = False


_PRODUCTS: dict[str, _Product] = {
    "fabric": _Product(draw.sample_fabric, draw.render_fabric, draw.fabric_defect,
                       ("hole", "stain", "contamination", "cut")),
    "marble": _Product(draw.sample_marble, draw.render_marble, draw.marble_defect,
                       ("crack", "scratch", "stain", "hole")),
    "screw": _Product(draw.sample_screw, draw.render_screw, draw.screw_defect,
                      ("bent_shaft", "thread_missing", "damaged_tip", "scratch_head", "contamination"),
                      grayscale=True),
    "washer": _Product(draw.sample_washer, draw.render_washer, draw.washer_defect,
                       ("missing_chunk", "misprint", "crack", "scratch", "contamination")),
}

DEFECT_TYPES: dict[str, tuple[str, ...]] = {name: p.defects for name, p in _PRODUCTS.items()}

_DEFAULT_SETTINGS = {"n_train": DEFAULT_N_TRAIN, "n_test": DEFAULT_N_TEST, "image_size": 256, "seed": 0}
_SPLIT_CODES = {"train": 0, "test": 1}
_FOOTPRINT_ALPHA = 0.1  # paint weaker than this is dropped, so the mask has no faint halo
_STRUCTURAL_CHANGE = 0.02  # a re-rendered pixel counts as changed above this (about 5 grey levels)
_MIN_VISIBLE_CHANGE = 0.05  # mean change inside a mask; weaker defects are redrawn
_MIN_MASK_FRACTION = 0.0004  # about 26 px at 256 px: smaller defects are redrawn
_MAX_DRAWS = 12


@dataclass(frozen=True)
class BuiltinSample:
    """One rendered image: uint8 H x W x 3 RGB image and clean twin, mask H x W in {0, 1}."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    defect_type: str


def image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The Generator for one image; independent of which other images are generated."""
    category_key = zlib.crc32(category.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, category_key, _SPLIT_CODES[split], index]))


def good_in_test_split(n_test: int) -> int:
    """Good images in a test split of ``n_test``: the default split's share, at least one.

    ``n_test * DEFAULT_N_TEST_GOOD / DEFAULT_N_TEST`` rounded half up, so the default 140
    gives 40 good and 100 defective; small splits (tests use 2 to 11) keep one good image.
    """
    if n_test <= 0:
        return 0
    share = (2 * n_test * DEFAULT_N_TEST_GOOD + DEFAULT_N_TEST) // (2 * DEFAULT_N_TEST)
    return min(n_test, max(1, share))


def defect_plan(category: str, n_test: int) -> list[str]:
    """Defect type per test index: ``good_in_test_split`` good first, then the defects round-robin.

    Round-robin dealing keeps the defect types balanced: their counts differ by at most one.
    """
    defects = DEFECT_TYPES[category]
    n_good = good_in_test_split(n_test)
    return ["good"] * n_good + [defects[i % len(defects)] for i in range(n_test - n_good)]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def render_sample(category: str, defect_type: str, rng: np.random.Generator, image_size: int) -> BuiltinSample:
    """Render one image of ``category``; ``defect_type`` is "good" or one of DEFECT_TYPES."""
    product = _product(category)
    if defect_type != "good" and defect_type not in product.defects:
        raise UserError(f"defect type {defect_type!r} is not one of {category}'s: {', '.join(product.defects)}")
    scene = product.sample(rng)
    clean_render = product.render(scene, image_size)
    clean = _to_uint8(clean_render.image)
    if defect_type == "good":
        return BuiltinSample(clean, clean, np.zeros(clean.shape[:2], np.uint8), "good")
    for _ in range(_MAX_DRAWS):
        change = product.defect(defect_type, scene, clean_render, rng, image_size)
        defective, footprint = _apply_defect(product, change, clean_render, image_size)
        mask = footprint.astype(np.uint8)
        if mask.sum() < max(2.0, _MIN_MASK_FRACTION * image_size**2):
            continue
        image = np.where(mask[..., None] == 1, _to_uint8(defective), clean)
        visible = np.abs(image.astype(np.int16) - clean.astype(np.int16)).max(axis=2)[mask == 1].mean() / 255.0
        if visible >= _MIN_VISIBLE_CHANGE:
            return BuiltinSample(image, clean, mask, defect_type)
    raise RuntimeError(f"could not draw a visible {defect_type} on {category} at {image_size} px")


def _apply_defect(product: _Product, change: Any, clean: draw.Rendering, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Defective float image and its boolean footprint, before compositing onto the clean bytes."""
    if isinstance(change, draw.Overlay):
        image = clean.image.copy()
        footprint = np.zeros(image.shape[:2], bool)
        for colour, alpha in change.layers:
            image = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]
            footprint |= alpha > _FOOTPRINT_ALPHA
        return np.clip(image, 0, 1), footprint
    assert dataclasses.is_dataclass(change), "a defect returns an Overlay or a changed scene"
    image = product.render(change, size).image
    changed = (np.abs(image - clean.image).max(axis=2) > _STRUCTURAL_CHANGE).astype(np.uint8)
    # close pinholes where the new rendering happens to match the old one
    kernel = np.ones((3, 3), np.uint8)
    footprint = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, kernel) > 0
    return image, footprint


def _product(category: str) -> _Product:
    if category not in _PRODUCTS:
        raise UserError(f"unknown built-in category {category!r}; choose from {', '.join(BUILTIN_CATEGORIES)}")
    return _PRODUCTS[category]


def _write_png(path: Path, image: np.ndarray, grayscale: bool) -> None:
    pixels = image[..., 0] if grayscale else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {path}")


def _write_category(folder: Path, category: str, n_train: int, n_test: int, image_size: int, seed: int) -> None:
    product = _product(category)
    train_dir = folder / "train" / "good"
    train_dir.mkdir(parents=True)
    for index in range(n_train):
        sample = render_sample(category, "good", image_rng(seed, category, "train", index), image_size)
        _write_png(train_dir / f"{index:03d}.png", sample.image, product.grayscale)
    counters: dict[str, int] = {}
    for index, defect_type in enumerate(defect_plan(category, n_test)):
        sample = render_sample(category, defect_type, image_rng(seed, category, "test", index), image_size)
        stem = f"{counters.get(defect_type, 0):03d}"
        counters[defect_type] = counters.get(defect_type, 0) + 1
        test_dir = folder / "test" / defect_type
        test_dir.mkdir(parents=True, exist_ok=True)
        _write_png(test_dir / f"{stem}.png", sample.image, product.grayscale)
        if defect_type != "good":
            mask_dir = folder / "ground_truth" / defect_type
            mask_dir.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(mask_dir / f"{stem}_mask.png"), sample.mask * np.uint8(255)):
                raise OSError(f"could not write mask {mask_dir / stem}_mask.png")


def _check_counts(n_train: int, n_test: int, image_size: int, seed: int) -> None:
    if n_train < 1:
        raise UserError(f"n_train must be at least 1, got {n_train}")
    if n_test < 0:
        raise UserError(f"n_test must be at least 0, got {n_test}")
    if not 16 <= image_size <= 2048:
        raise UserError(f"image_size must be between 16 and 2048, got {image_size}")
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")


def generate_builtin(out: Path, categories: Sequence[str] | None = None, *, n_train: int = DEFAULT_N_TRAIN,
                     n_test: int = DEFAULT_N_TEST, image_size: int = 256, seed: int = 0) -> Path:
    """Write the built-in products under ``out`` (MVTec AD layout) and return ``out``.

    ``n_test`` counts good and defective test images together; ``defect_plan`` splits it.

    Each category is written to a temporary folder beside its final place and moved in
    with ``os.replace``, so a crash never leaves a half-written category; an existing
    category folder is replaced.
    """
    names = list(BUILTIN_CATEGORIES) if categories is None else list(categories)
    for name in names:
        _product(name)
    _check_counts(n_train, n_test, image_size, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        _publish_category(out, name, n_train=n_train, n_test=n_test, image_size=image_size, seed=seed,
                          keep_existing=False)
    return out


def _publish_category(out: Path, category: str, *, n_train: int, n_test: int, image_size: int, seed: int,
                      keep_existing: bool) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".tmp", dir=out))
    try:
        _write_category(staging, category, n_train, n_test, image_size, seed)
        final = out / category
        if final.exists():
            if keep_existing:  # another process finished it first; theirs is identical
                return
            retired = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".old", dir=out))
            os.replace(final, retired / category)
            shutil.rmtree(retired, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            if not (keep_existing and final.exists()):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def builtin_cache_root() -> Path:
    """Where ``ensure_builtin_root`` keeps the default dataset."""
    base = os.environ.get("AUTOML_AD_CACHE")
    cache = Path(base).expanduser() if base else Path.home() / ".cache" / "automl_ad"
    return cache / BUILTIN_VERSION


def ensure_builtin_root() -> Path:
    """The default built-in dataset, generated on first use; returns its root."""
    root = builtin_cache_root()
    missing = [name for name in BUILTIN_CATEGORIES if not (root / name).is_dir()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        for name in missing:
            _publish_category(root, name, keep_existing=True, **_DEFAULT_SETTINGS)
    return root
