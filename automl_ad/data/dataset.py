"""Loading one category into uint8 tensors, with a decode cache in memory and on disk.

``load_category`` discovers the files (``layout``), decodes and resizes every image once,
and splits ``train/good`` into ``fit`` and ``val_good`` with a seeded permutation.

Resizing: images use PIL's bilinear filter, which is antialiased when shrinking (its
support widens with the scale; torch's ``antialias=True`` copies it) and works on uint8
directly, single-threaded, so parallel trials do not fight over cores. Masks use area
averaging (PIL BOX on float) and keep a pixel as defect when at least half of it was defect. Area + 0.5 does not depend on where the sampling grid falls (nearest
does), but like nearest it drops defects thinner than half an output pixel, so a very
thin scratch can vanish at small image sizes; ``data check`` prints mean defect areas.

Cache: the decoded, resized tensors depend only on the files and ``image_size``, so they
are keyed by ``decode_key`` = sha256 over (relative path, byte size, mtime) of every file
read, the image size and ``CACHE_VERSION``. The split seed and ``val_fraction`` are applied
after the cache and go only into ``CategoryData.fingerprint``. Hits come from a
process-level dict (the newest ``MEMORY_CACHE_ENTRIES`` keys) and, when ``cache_dir`` is
given, from ``<cache_dir>/<category>-<size>px-<key>.safetensors``, written to a temporary
name and moved in with ``os.replace`` so parallel trials never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from automl_ad.data import builtin
from automl_ad.data.geometry import Shape, as_shape
from automl_ad.data.images import read_image, read_mask
from automl_ad.data.layout import GOOD, CategoryLayout, discover_category
from automl_ad.data.minimum import held_out
from automl_ad.data.types import CategoryData, ImageSet
from automl_ad.errors import UserError, as_out_of_space, out_of_space

CACHE_VERSION = "decoded-v1"  # bump when decoding or resizing changes, so old caches miss
MEMORY_CACHE_ENTRIES = 8
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096


@dataclass
class DecodedCategory:
    """Every image of a category at one size; what the caches hold. Paths are relative
    to the category folder, so a moved dataset still hits the cache."""

    train_images: Tensor  # N x 3 x S x S uint8
    train_paths: list[str]
    test_images: Tensor  # M x 3 x S x S uint8
    test_masks: Tensor  # M x 1 x S x S uint8 in {0, 1}
    test_labels: Tensor  # M int64
    test_has_mask: Tensor  # M bool
    test_defect_types: list[str]
    test_paths: list[str]


_memory_cache: OrderedDict[str, DecodedCategory] = OrderedDict()


def clear_memory_cache() -> None:
    """Forget every decoded category held by this process."""
    _memory_cache.clear()


def _resized_hwc(image: np.ndarray, size: int | Shape) -> np.ndarray:
    height, width = as_shape(size)
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
                      .resize((width, height), Image.Resampling.BILINEAR))  # PIL takes (width, height)


def _resized_coverage(mask: np.ndarray, size: int | Shape) -> np.ndarray:
    height, width = as_shape(size)
    coverage = np.asarray(mask, dtype=np.float32)
    if coverage.shape != (height, width):
        # BOX on a float image is the exact area average when shrinking (nearest when growing).
        coverage = np.asarray(Image.fromarray(coverage).resize((width, height), Image.Resampling.BOX))
    return coverage >= 0.5


def resize_image(image: np.ndarray, size: int | Shape) -> Tensor:
    """H x W x 3 uint8 -> 3 x height x width uint8 (``size``: a side or (height, width);
    antialiased bilinear; exact copy when no resize)."""
    return torch.from_numpy(np.ascontiguousarray(_resized_hwc(image, size).transpose(2, 0, 1)))


def resize_mask(mask: np.ndarray, size: int | Shape) -> Tensor:
    """H x W bool -> 1 x height x width uint8 in {0, 1} (area average, defect where >= 0.5)."""
    return torch.from_numpy(_resized_coverage(mask, size).astype(np.uint8)[None])


def _shape_tag(shape: Shape) -> str:
    """The shape in cache keys and names: the side alone for a square (as before shapes)."""
    height, width = shape
    return f"{height}" if height == width else f"{height}x{width}"


def decode_key(layout: CategoryLayout, image_size: int | Shape) -> str:
    """sha256 hex over every file's relative path, size and mtime, plus the image shape."""
    digest = hashlib.sha256(f"{CACHE_VERSION}\n{_shape_tag(as_shape(image_size))}\n".encode())
    for path in layout.files():
        try:
            stat = path.stat()
        except OSError as error:
            raise UserError(f"cannot stat {path}: {error.strerror}") from error
        relative = path.relative_to(layout.folder).as_posix()
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _check_arguments(image_size: int, shape: Shape | None, val_fraction: float, seed: int) -> None:
    for side in (image_size, *(shape or ())):
        if isinstance(side, bool) or not isinstance(side, int) or not MIN_IMAGE_SIZE <= side <= MAX_IMAGE_SIZE:
            raise UserError(f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
                            f"got {side!r}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")


def _decode(layout: CategoryLayout, shape: Shape) -> DecodedCategory:
    """Read and resize every file of ``layout``; UserError naming the first bad file.

    Fills preallocated numpy arrays: per-image torch copies and ``torch.stack`` use
    intra-op threads, which stall badly when parallel trials already use every core.
    """
    if not layout.train:
        raise UserError(f"no training images in {layout.folder / 'train' / GOOD}")
    train = np.empty((len(layout.train), 3, *shape), np.uint8)
    for index, path in enumerate(layout.train):
        train[index] = _resized_hwc(read_image(path), shape).transpose(2, 0, 1)
    count = len(layout.test)
    images = np.empty((count, 3, *shape), np.uint8)
    masks = np.zeros((count, 1, *shape), np.uint8)
    has_mask = np.zeros(count, np.bool_)
    for index, item in enumerate(layout.test):
        image = read_image(item.path)
        has_mask[index] = item.is_good  # good images need no mask file: all zero is right
        if item.mask is not None:
            mask = read_mask(item.mask)
            if mask.shape != image.shape[:2]:
                raise UserError(
                    f"mask {item.mask} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
            masks[index, 0] = _resized_coverage(mask, shape)
            has_mask[index] = True
        images[index] = _resized_hwc(image, shape).transpose(2, 0, 1)
    return DecodedCategory(
        train_images=torch.from_numpy(train),
        train_paths=[path.relative_to(layout.folder).as_posix() for path in layout.train],
        test_images=torch.from_numpy(images),
        test_masks=torch.from_numpy(masks),
        test_labels=torch.tensor([0 if item.is_good else 1 for item in layout.test], dtype=torch.long),
        test_has_mask=torch.from_numpy(has_mask),
        test_defect_types=[item.defect_type for item in layout.test],
        test_paths=[item.path.relative_to(layout.folder).as_posix() for item in layout.test],
    )


_TENSOR_FIELDS = ("train_images", "test_images", "test_masks", "test_labels", "test_has_mask")
_LIST_FIELDS = ("train_paths", "test_defect_types", "test_paths")


def _cache_file(cache_dir: Path, category: str, shape: Shape, key: str) -> Path:
    return cache_dir / f"{category}-{_shape_tag(shape)}px-{key[:32]}.safetensors"


def _read_disk_cache(path: Path, key: str) -> DecodedCategory | None:
    """The cached category, or None when missing, stale or damaged (then it is rebuilt)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as cached:
            metadata = cached.metadata() or {}
            if metadata.get("key") != key:
                return None
            lists = json.loads(metadata["lists"])
            tensors = {name: cached.get_tensor(name) for name in _TENSOR_FIELDS}
        return DecodedCategory(**tensors, **{name: list(lists[name]) for name in _LIST_FIELDS})
    except Exception:  # noqa: BLE001 - any damage means "decode again", never a crash
        return None


def _write_disk_cache(path: Path, key: str, decoded: DecodedCategory) -> None:
    from safetensors.torch import save_file

    tensors = {name: getattr(decoded, name).contiguous() for name in _TENSOR_FIELDS}
    metadata = {"key": key, "lists": json.dumps({name: getattr(decoded, name) for name in _LIST_FIELDS})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except Exception as error:  # noqa: BLE001 - OSError, or safetensors' own I/O error
        if out_of_space(error):
            # The cache sits in the experiment folder: the disk that is full is the one
            # every later write of the search goes to, so stop here, naming it.
            raise as_out_of_space(error, path, "the data cache") from None
        # The data loaded fine; a read-only cache folder only costs time next run.
        warnings.warn(f"could not write the data cache {path}: {error}", RuntimeWarning, stacklevel=3)


def _decoded(layout: CategoryLayout, shape: Shape, cache_dir: Path | None) -> tuple[str, DecodedCategory]:
    key = decode_key(layout, shape)
    if key in _memory_cache:
        _memory_cache.move_to_end(key)
        return key, _memory_cache[key]
    decoded = None
    cache_path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        if cache_dir.exists() and not cache_dir.is_dir():
            raise UserError(f"cache_dir is not a folder: {cache_dir}")
        cache_path = _cache_file(cache_dir, layout.category, shape, key)
        decoded = _read_disk_cache(cache_path, key)
    if decoded is None:
        decoded = _decode(layout, shape)
        if cache_path is not None:
            _write_disk_cache(cache_path, key, decoded)
    _memory_cache[key] = decoded
    while len(_memory_cache) > MEMORY_CACHE_ENTRIES:
        _memory_cache.popitem(last=False)
    return key, decoded


def split_train(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit indices, val indices), each sorted; at least one val image when count >= 2."""
    n_val = held_out(count, val_fraction)  # the rule check_product counts with
    if n_val == 0:
        return list(range(count)), []
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def load_category(root: Path, category: str, image_size: int, *, shape: Shape | None = None,
                  val_fraction: float = 0.2, seed: int = 0, cache_dir: Path | None = None) -> CategoryData:
    """Load ``<root>/<category>`` at ``image_size`` x ``image_size``, or at ``shape``
    (height, width; ``data.geometry``) for that pixel budget.

    ``fit`` and ``val_good`` split ``train/good`` by a permutation seeded with ``seed``
    (``val_fraction`` of the images, at least one when there are two or more). Raises
    UserError with one line for a missing root or category, an empty ``train/good``, an
    unreadable image or mask, or a mask whose size differs from its image. Files that do
    not fit the layout are ignored here; ``data check`` reports them.
    """
    shape = as_shape(image_size) if shape is None else as_shape(shape)
    _check_arguments(image_size, shape, val_fraction, seed)
    layout = discover_category(Path(root), category)
    key, decoded = _decoded(layout, shape, cache_dir)
    fit_index, val_index = split_train(len(decoded.train_paths), float(val_fraction), seed)
    folder = layout.folder
    fingerprint = hashlib.sha256(f"{key}\nseed={seed}\nval_fraction={float(val_fraction)!r}".encode()).hexdigest()
    # Copies (numpy, single-threaded): callers may edit in place; the cache must not change.
    train_images = decoded.train_images.numpy()
    test = ImageSet(
        images=torch.from_numpy(decoded.test_images.numpy().copy()),
        masks=torch.from_numpy(decoded.test_masks.numpy().copy()),
        labels=decoded.test_labels.clone(),
        has_mask=decoded.test_has_mask.clone(),
        defect_types=list(decoded.test_defect_types),
        paths=[str(folder / path) for path in decoded.test_paths],
    )
    return CategoryData(
        category=category,
        root=Path(root),
        image_size=image_size,
        fit=torch.from_numpy(train_images[fit_index]),
        val_good=torch.from_numpy(train_images[val_index]),
        test=test,
        fingerprint=fingerprint[:16],
        fit_paths=[str(folder / decoded.train_paths[i]) for i in fit_index],
        val_paths=[str(folder / decoded.train_paths[i]) for i in val_index],
    )


def resolve_data_root(data: Path | None, category: str) -> Path:
    """The dataset root to use: ``data`` when given, else the built-in products.

    Without ``data`` the category must be a built-in one; a one-line notice on stderr says
    where the built-in products live (they are generated there on first use).
    """
    if data is not None:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise UserError(f"--data folder not found: {root}")
        # Absolute: trials run in Ray workers whose working directory is not the user's,
        # so a relative --data (`--data data`) made every trial fail with "data root not found".
        return root.absolute()

    if category not in builtin.BUILTIN_CATEGORIES:
        raise UserError(
            f"category {category!r} needs --data; without it choose a built-in product: "
            f"{', '.join(builtin.BUILTIN_CATEGORIES)}"
        )
    where = builtin.builtin_cache_root() if hasattr(builtin, "builtin_cache_root") else None
    if where is not None:  # before generating, which can take a while on first use
        print(f"notice: no --data given; using the built-in procedural products in {where}", file=sys.stderr)
    root = builtin.ensure_builtin_root()
    if where is None:
        print(f"notice: no --data given; using the built-in procedural products in {root}", file=sys.stderr)
    return root
