"""Tiling: a model that sees tiles of a larger image, its maps stitched back together.

Squashing a 500 x 1260 photograph to a 256 px pixel budget loses thin defects. A tiled
geometry (``data.geometry``, mode ``tiled``) resizes each image to a larger *canvas*
and cuts it into overlapping *tiles* of the model's input shape; the model trains on the
tiles, and at inference the graph (``Tiled``) cuts, scores and stitches:

* maps: each tile's map is placed where the tile came from; where tiles overlap the
  maps are averaged (a constant count map divides the sum), so the stitched map has the
  canvas' shape and every pixel has a value;
* image score: the highest of the tiles' image scores (a defect is in one tile).

Every step is slicing, padding and adding with shapes fixed by the canvas, so the same
graph traces to ONNX and the exported bundle tiles inside itself (``predict`` only
resizes to the canvas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shape = tuple[int, int]  # (height, width)


def _origins(canvas: int, tile: int, stride: int) -> tuple[int, ...]:
    """Start of each tile along one side: every ``stride``, the last flush with the end."""
    starts = list(range(0, max(1, canvas - tile + 1), stride))
    if starts[-1] + tile < canvas:
        starts.append(canvas - tile)
    return tuple(starts)


@dataclass(frozen=True)
class Tiling:
    tile: Shape
    canvas: Shape
    stride: Shape

    def __post_init__(self) -> None:
        for name, side, whole in (("height", self.tile[0], self.canvas[0]), ("width", self.tile[1], self.canvas[1])):
            if not 0 < side <= whole:
                raise ValueError(f"tiling: a tile {name} of {side} px does not fit a canvas of {whole} px")

    @classmethod
    def grid(cls, tile: Shape, per_side: int, stride: Shape) -> "Tiling":
        """``per_side`` x ``per_side`` tiles of ``tile``, each ``stride`` from the last."""
        canvas = (tile[0] + (per_side - 1) * stride[0], tile[1] + (per_side - 1) * stride[1])
        return cls(tile=tuple(tile), canvas=canvas, stride=tuple(stride))

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row by row."""
        rows = _origins(self.canvas[0], self.tile[0], self.stride[0])
        columns = _origins(self.canvas[1], self.tile[1], self.stride[1])
        return [(top, left) for top in rows for left in columns]

    @property
    def count(self) -> int:
        return len(self.origins)

    def split(self, images: Tensor) -> Tensor:
        """B x C x H x W canvases -> (B * tiles) x C x h x w, the tiles of one image together."""
        height, width = self.tile
        tiles = [images[:, :, top:top + height, left:left + width] for top, left in self.origins]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def coverage(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """H x W: how many tiles cover each canvas pixel."""
        count = torch.zeros(self.canvas, dtype=dtype)
        for top, left in self.origins:
            count[top:top + self.tile[0], left:left + self.tile[1]] += 1
        return count

    def stitch(self, maps: Tensor, coverage: Tensor | None = None) -> Tensor:
        """(B * tiles) x h x w tile maps -> B x H x W, averaged where tiles overlap."""
        height, width = self.tile
        per_image = maps.reshape(-1, self.count, height, width)
        total: Tensor | None = None
        for index, (top, left) in enumerate(self.origins):
            placed = F.pad(per_image[:, index], (left, self.canvas[1] - left - width, top, self.canvas[0] - top - height))
            total = placed if total is None else total + placed
        assert total is not None
        return total / (self.coverage(maps.dtype).to(maps.device) if coverage is None else coverage)

    def image_scores(self, scores: Tensor) -> Tensor:
        """(B * tiles) tile scores -> B image scores: the highest tile's."""
        return scores.reshape(-1, self.count).amax(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {"tile": list(self.tile), "canvas": list(self.canvas), "stride": list(self.stride)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Tiling | None":
        if not data:
            return None
        return cls(tile=tuple(int(v) for v in data["tile"]), canvas=tuple(int(v) for v in data["canvas"]),
                   stride=tuple(int(v) for v in data["stride"]))


class Tiled(nn.Module):
    """A method's inference graph over canvases: ``forward(B x 3 x H x W) -> (maps B x H x
    W, scores B)``, the method run on the tiles (module doc)."""

    def __init__(self, method: nn.Module, tiling: Tiling) -> None:
        super().__init__()
        self.method = method
        self.tiling = tiling
        # not persistent: a constant of the geometry, not a weight of the model
        self.register_buffer("coverage", tiling.coverage(), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps, scores = self.method(self.tiling.split(images))
        return self.tiling.stitch(maps, self.coverage.to(maps.dtype)), self.tiling.image_scores(scores)


def inference_graph(method: nn.Module) -> nn.Module:
    """What scores whole images: the method itself, or ``Tiled`` around a tiled one."""
    tiling = getattr(method, "tiling", None)
    if isinstance(method, Tiled) or tiling is None:
        return method
    return Tiled(method, tiling)


def graph_tiling(model: nn.Module) -> dict[str, Any] | None:
    """The tiling inside a deployable graph (``Tiling.to_dict``), or None when it has none.
    Every member of an ensemble is built for one search geometry, so they share it."""
    for module in model.modules():
        if isinstance(module, Tiled):
            return module.tiling.to_dict()
    return None


def training_images(method: nn.Module, images: Tensor) -> Tensor:
    """What a method fits and trains on: the images, or their tiles for a tiled one."""
    tiling = getattr(method, "tiling", None)
    return images if tiling is None else tiling.split(images)
