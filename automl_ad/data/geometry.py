"""How a product's images become the model's input: the shape for a pixel budget.

Every search size (``image_size`` in the space, the planner, the calibration cache, the
store) is a *pixel budget*: ``image_size ** 2`` pixels a image. The geometry turns it
into the H x W the images are resized to:

* ``square``: ``image_size x image_size`` whatever the images' shape (the only geometry
  before; a product whose images are square gets nothing else).
* ``keep_aspect``: the product's median aspect (width / height of ``train/good``, read
  from the file headers) at about the same number of pixels, both sides multiples of
  ``SIDE_MULTIPLE`` (every backbone's coarsest stride) and at least ``MIN_SIDE``. On
  KolektorSDD (500 x ~1260 px commutator photographs, 256 px budget) the plain
  nearest-neighbour baseline tests 0.766 image AUROC squashed to 256 x 256 and 0.893 at
  416 x 160 (issue 22 note); since the pixel count stays about the same, so does every
  cost the planner knows.

* ``tiled``: ``TILES_PER_SIDE`` x ``TILES_PER_SIDE`` overlapping tiles, each of
  ``keep_aspect``'s shape for the pixel budget (``square``'s for a square product), cut
  from the image resized to a larger canvas (``data.tiling``): the model sees the pixels
  of a resolution about ``TILES_PER_SIDE`` times higher per side, at as many times the
  cost of each image's setup and inference. Only for images at least as large as the
  canvas: on smaller ones it would upsample, adding cost and no detail.

``shape(size)`` is the shape images are resized to (the canvas when tiled: data, val
anomalies, metrics and the exported bundle's input); ``input_shape(size)`` is what the
model itself takes (a tile), which is what calibration and training steps cost.

Mixed sizes in one product: one geometry for all of them (a model has one input
shape), from the median aspect; an image of another aspect is stretched to it, as every
image was before. ``suggest`` picks ``keep_aspect`` when the median aspect is at least
``ASPECT_THRESHOLD`` away from square.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from automl_ad.data.tiling import Tiling
from automl_ad.errors import UserError

SIDE_MULTIPLE = 32
MIN_SIDE = 32
MAX_ASPECT = 8.0  # a part 8x longer than wide; beyond it the short side has too few pixels
ASPECT_THRESHOLD = 1.25  # median aspect (either way) from which keep_aspect is suggested
MODES = ("square", "keep_aspect", "tiled")
TILES_PER_SIDE = 2
TILE_OVERLAP = 0.25  # of a tile's side: a defect on a tile's border is whole in its neighbour
Shape = tuple[int, int]  # (height, width)


def as_shape(size: int | Sequence[int]) -> Shape:
    """``(size, size)`` for an int, ``(height, width)`` for a pair."""
    if isinstance(size, (tuple, list)):
        height, width = size
        return int(height), int(width)
    return int(size), int(size)


def shape_text(shape: Shape) -> str:
    """``256 px`` for a square, ``416x160 px`` (height x width) otherwise."""
    height, width = shape
    return f"{height} px" if height == width else f"{height}x{width} px"


@dataclass(frozen=True)
class Geometry:
    mode: str = "square"
    aspect: float = 1.0  # width / height of the product's images (keep_aspect, tiled)
    per_side: int = TILES_PER_SIDE  # tiles along each side (tiled)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"geometry must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (1.0 / MAX_ASPECT <= float(self.aspect) <= MAX_ASPECT):
            raise UserError(f"geometry: an aspect of {self.aspect:.3g} (width / height) is beyond 1:{MAX_ASPECT:g}; "
                            f"crop the images to the part first, or pass --geometry square")
        if not 1 <= int(self.per_side) <= 8:
            raise UserError(f"geometry: {self.per_side} tiles per side; use 1 to 8")

    @property
    def square(self) -> bool:
        return self.mode == "square" or self.shape(256) == (256, 256)

    def input_shape(self, image_size: int) -> Shape:
        """The (height, width) the model takes for the pixel budget ``image_size`` (a
        tile when tiled)."""
        size = int(image_size)
        if self.mode == "square":
            return size, size
        root = math.sqrt(float(self.aspect))
        height = _to_multiple(size / root)
        width = _to_multiple(size * root)
        return height, width

    def tiling(self, image_size: int) -> Tiling | None:
        """How the canvas is cut into model inputs; None unless tiled."""
        if self.mode != "tiled":
            return None
        tile = self.input_shape(image_size)
        stride = tuple(min(side, _to_multiple(side * (1.0 - TILE_OVERLAP))) for side in tile)
        return Tiling.grid(tile, self.per_side, stride)

    def shape(self, image_size: int) -> Shape:
        """The (height, width) images are resized to for the pixel budget ``image_size``
        (the canvas when tiled)."""
        tiling = self.tiling(image_size)
        return self.input_shape(image_size) if tiling is None else tiling.canvas

    def tiles(self, image_size: int) -> int:
        """Model inputs per image: 1, or the tiles of a tiled canvas."""
        tiling = self.tiling(image_size)
        return 1 if tiling is None else tiling.count

    def describe(self, image_size: int) -> str:
        if self.mode == "square":
            return "square (every image resized to a square)"
        tiling = self.tiling(image_size)
        if tiling is not None:
            overlap = (tiling.tile[0] - tiling.stride[0], tiling.tile[1] - tiling.stride[1])
            return (f"tiled ({tiling.count} tiles of {shape_text(tiling.tile)} overlapping by "
                    f"{overlap[0]}x{overlap[1]} px, from each image at {shape_text(tiling.canvas)})")
        return (f"keep_aspect (aspect {self.aspect:.2f} width/height; {image_size} px budget -> "
                f"{shape_text(self.shape(image_size))})")

    def label(self, image_size: int) -> str:
        """Short: ``square 256 px``, ``keep_aspect 416x160 px``, ``tiled 4 x 416x160 px of 736x288 px``."""
        tiling = self.tiling(image_size)
        if tiling is None:
            return f"{self.mode} {shape_text(self.shape(image_size))}"
        return f"tiled {tiling.count} x {shape_text(tiling.tile)} of {shape_text(tiling.canvas)}"

    def to_dict(self) -> dict[str, Any]:
        kept = {"mode": self.mode, "aspect": round(float(self.aspect), 4)}
        return {**kept, "per_side": self.per_side} if self.mode == "tiled" else kept

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Geometry":
        """The stored geometry; a record written before geometries existed is square."""
        if not data:
            return cls()
        return cls(mode=str(data.get("mode", "square")), aspect=float(data.get("aspect", 1.0)),
                   per_side=int(data.get("per_side", TILES_PER_SIDE)))


def _to_multiple(side: float) -> int:
    return max(MIN_SIDE, SIDE_MULTIPLE * int(round(side / SIDE_MULTIPLE)))


def median_aspect(sizes: Iterable[Shape]) -> float:
    """Median width / height of ``(height, width)`` pairs."""
    aspects = [width / height for height, width in sizes if height > 0 and width > 0]
    if not aspects:
        raise UserError("geometry: no image sizes to take an aspect from")
    return float(statistics.median(aspects))


def product_aspect(paths: Sequence[Path]) -> float:
    """The median aspect of these images, from their file headers (nothing decoded)."""
    from automl_ad.data.images import image_size_of

    return median_aspect(image_size_of(path) for path in paths)


def suggest(aspect: float) -> Geometry:
    """keep_aspect when the product is clearly not square, else square."""
    if max(aspect, 1.0 / aspect) >= ASPECT_THRESHOLD:
        return Geometry("keep_aspect", aspect)
    return Geometry("square", 1.0)


def resolve(mode: str, paths: Sequence[Path], image_size: int | None = None) -> Geometry:
    """The geometry a search runs: ``auto`` suggests one from the images' aspect;
    ``square``, ``keep_aspect`` and ``tiled`` are taken as asked (the aspect from the
    images). ``tiled`` with ``image_size`` (the largest searched) checks that a tile is
    no larger than the images (UserError otherwise)."""
    if mode == "square":
        return Geometry()
    aspect = product_aspect(paths)
    if mode == "auto":
        return suggest(aspect)
    geometry = Geometry(mode, aspect)
    if mode == "tiled" and image_size is not None:
        check_tiles_fit(geometry, int(image_size), paths)
    return geometry


def machine_memory_bytes() -> int:
    """This machine's physical memory."""
    return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def data_memory_bytes(geometry: Geometry, image_size: int, train: int, test: int) -> int:
    """What a trial holds of the images alone at ``image_size``: every image decoded
    (uint8), the fit images as float32 for setup and, when tiled, their tiles again as
    float32. Backbone activations come on top (measured: PatchCore at a 736 x 288 canvas
    on KolektorSDD, 504 images, 6.9 GB RSS against about 1.9 GB of this)."""
    height, width = geometry.shape(image_size)
    pixels = 3 * height * width
    fit = max(1, round(train * 0.8))
    copies = 4 + (4 if geometry.mode == "tiled" else 0)  # float32 fit images, then their tiles
    return pixels * (train + test) + pixels * fit * copies


def check_memory(geometry: Geometry, image_size: int, train: int, test: int,
                 available: int | None = None) -> None:
    """UserError when the images alone would take more than half of this machine's
    memory at ``image_size``: one line before a search or training starts, rather than
    trials killed for memory."""
    needed = data_memory_bytes(geometry, image_size, train, test)
    available = machine_memory_bytes() if available is None else available
    if needed > available / 2:
        raise UserError(f"image size {image_size} ({geometry.describe(image_size)}): {train + test} images need about "
                        f"{needed / 2**30:.1f} GB before any model, more than half of this machine's "
                        f"{available / 2**30:.1f} GB; pass a smaller --image-size"
                        + (" or --geometry keep_aspect" if geometry.mode == "tiled" else ""))


def median_shape(paths: Sequence[Path]) -> Shape:
    """(height, width) medians of these images, from their file headers."""
    from automl_ad.data.images import image_size_of

    sizes = [image_size_of(path) for path in paths]
    if not sizes:
        raise UserError("geometry: no image sizes to take a shape from")
    return int(statistics.median(h for h, _ in sizes)), int(statistics.median(w for _, w in sizes))


def offered(aspect: float, native: Shape, image_size: int) -> list[Geometry]:
    """The geometries that can help a product at ``image_size``: square; keep_aspect when
    the parts are clearly not square; tiled when the files hold at least the canvas' pixels
    (on smaller files tiles would only upsample)."""
    choices = [Geometry()]
    if suggest(aspect).mode == "keep_aspect":
        choices.append(Geometry("keep_aspect", aspect))
    tiled = Geometry("tiled", aspect)
    canvas = tiled.shape(image_size)
    if native[0] >= canvas[0] and native[1] >= canvas[1]:
        choices.append(tiled)
    return choices


def check_tiles_fit(geometry: Geometry, image_size: int, paths: Sequence[Path]) -> None:
    """UserError when a tile at ``image_size`` is larger than the product's (median) images."""
    height, width = median_shape(paths)
    tile = geometry.input_shape(image_size)
    if tile[0] > height or tile[1] > width:
        raise UserError(f"--geometry tiled: a tile of {shape_text(tile)} at image size {image_size} is larger than "
                        f"the images ({int(height)}x{int(width)} px, median); pass a smaller --image-size or "
                        f"--geometry keep_aspect")


def stored(record: dict[str, Any], asked: str) -> Geometry:
    """The geometry a search record keeps (square before geometries existed); a resume
    that asks for another one is refused, since its trials so far ran this one."""
    geometry = Geometry.from_dict(record.get("geometry"))
    if asked not in ("auto", geometry.mode):
        raise UserError(f"--resume: --geometry {asked} differs from {geometry.mode} in the search record")
    return geometry
