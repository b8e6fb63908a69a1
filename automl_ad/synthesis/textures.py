"""A procedural texture bank: DTD-like anomaly sources for DRAEM when no texture folder is given.

DRAEM pastes Describable Textures Dataset images (47 classes of natural and man-made
textures: striped, chequered, blotchy, marbled, honeycombed, dotted, woven, zigzagged ...)
into its Perlin masks. The paper's ablation finds that the exact source matters little
(ImageNet does as well, and fewer than 10 images suffice given the source augmentation
and opacity randomisation); what matters is a source unlike the product. Without a
``texture_dir`` this module stands in for DTD with textures drawn from ten procedural
kinds, each a scalar field in [0, 1] mapped through a random three-colour palette:

  stripes   bands along a random orientation, frequency, duty and edge softness, with a
            slower second band modulating them (lined, banded, striped)
  grid      two families of thin lines at a random angle to each other (grid, meshed,
            crosshatched)
  checker   the sign of two crossed cosines, softened (chequered, waffled)
  blotches  multi-octave value noise cut at a random level (blotchy, stained, smeared)
  marble    stripes whose phase is displaced by multi-octave noise (marbled, swirly)
  cells     Voronoi cells, one grey level each, with dark walls (honeycombed, scaly,
            crystalline)
  dots      a rotated (optionally hexagonal) lattice of discs (dotted, polka-dotted, studded)
  weave     alternating over/under thread blocks with threads across each (woven,
            interlaced, knitted)
  zigzag    stripes displaced by a triangle wave along them (zigzagged, pleated)
  ripples   rings around a random centre, warped by noise (spiralled, wrinkled, bumpy)

Every texture then gets fine grain (high-frequency value noise) of random strength.
Lengths are in units of the image's geometric-mean side, so a texture looks alike at any
size and aspect. All draws come from one ``torch.Generator``: the same (count, seed, H, W)
gives the same bank; ``texture_bank`` caches it (uint8, CPU) per process, like a dataset
read once. The kinds are whole-image patterns drawn here; nothing is shared with the
built-in products' drawing (``automl_ad/data/builtin_draw.py``): no localised strokes,
blobs or holes, which are what its defects are made of.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.synthesis.base import hsv_to_rgb, uniform

Field = Callable[[int, "_Grid", torch.Generator], Tensor]


class _Grid:
    """Pixel-centre coordinates of one H x W image in side units (1 x H x W each)."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.side = math.sqrt(height * width)
        self.y = ((torch.arange(height, dtype=torch.float32) + 0.5) / self.side).view(1, height, 1).expand(1, height, width)
        self.x = ((torch.arange(width, dtype=torch.float32) + 0.5) / self.side).view(1, 1, width).expand(1, height, width)

    def rotated(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates along and across direction ``theta`` (n radians): n x H x W each."""
        cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        return cos * self.x + sin * self.y, -sin * self.x + cos * self.y


def _draw(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """n uniform draws as n x 1 x 1, ready to broadcast over an image."""
    return uniform(generator, (n,), torch.device("cpu"), low, high)[:, None, None]


def _log_draw(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return torch.exp(_draw(generator, n, math.log(low), math.log(high)))


def _angle(generator: torch.Generator, n: int) -> Tensor:
    return uniform(generator, (n,), torch.device("cpu"), 0.0, math.pi)


def _soft_step(value: Tensor, level: Tensor, sharpness: Tensor) -> Tensor:
    """0 below ``level``, 1 above, with an edge ``1 / sharpness`` wide."""
    return torch.sigmoid(sharpness * (value - level))


def value_noise(n: int, grid: _Grid, generator: torch.Generator, cells: Tensor | float) -> Tensor:
    """n x H x W: random values on a lattice of ``cells`` (per image, or one for all) per
    side, bicubic between them (smooth blobs of size 1 / cells), roughly in [0, 1]."""
    cells = torch.as_tensor(cells, dtype=torch.float32).expand(n).clamp_min(1.0)
    longest = float(cells.max()) * max(grid.height, grid.width) / grid.side
    size = math.ceil(longest) + 3  # a lattice point beyond each border: no clamped edges
    lattice = torch.rand((n, 1, size, size), generator=generator)
    # lattice coordinates of the pixel centres (point k at k + 1), in grid_sample's
    # align_corners=True units (-1 at point 0, +1 at point size - 1)
    scale = cells[:, None, None]
    coords = torch.stack((1 + scale * grid.x, 1 + scale * grid.y), -1) * (2 / (size - 1)) - 1
    return F.grid_sample(lattice, coords, mode="bicubic", align_corners=True)[:, 0]


def fractal_noise(n: int, grid: _Grid, generator: torch.Generator, cells: Tensor | float, octaves: int = 4) -> Tensor:
    """Octaves of ``value_noise`` at doubling frequency and halving weight, each image
    stretched to [0, 1]."""
    cells = torch.as_tensor(cells, dtype=torch.float32).expand(n)
    total = sum(0.5**k * value_noise(n, grid, generator, cells * 2**k) for k in range(octaves))
    low = total.flatten(1).amin(1)[:, None, None]
    high = total.flatten(1).amax(1)[:, None, None]
    return (total - low) / (high - low).clamp_min(1e-6)


def _stripes(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    along, _ = grid.rotated(_angle(generator, n))
    freq = _log_draw(generator, n, 3.0, 28.0)
    wave = 0.5 + 0.5 * torch.cos(2 * math.pi * (freq * along + _draw(generator, n, 0.0, 1.0)))
    bands = _soft_step(wave, _draw(generator, n, 0.2, 0.8), _log_draw(generator, n, 3.0, 60.0))
    slow = torch.cos(2 * math.pi * (freq * _draw(generator, n, 0.1, 0.4) * along))
    return bands * (1 - _draw(generator, n, 0.0, 0.5) * (0.5 + 0.5 * slow))


def _grid_lines(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    theta = _angle(generator, n)
    first, _ = grid.rotated(theta)
    second, _ = grid.rotated(theta + uniform(generator, (n,), torch.device("cpu"), math.pi / 3, 2 * math.pi / 3))
    freq = _log_draw(generator, n, 4.0, 24.0)
    width = _draw(generator, n, 0.75, 0.97)  # cosine level above which a line is drawn
    sharp = _log_draw(generator, n, 10.0, 80.0)
    lines = [_soft_step(torch.cos(2 * math.pi * freq * c), width, sharp) for c in (first, second)]
    return torch.maximum(lines[0], lines[1] * _draw(generator, n, 0.5, 1.0))


def _checker(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    along, across = grid.rotated(_angle(generator, n))
    freq = _log_draw(generator, n, 2.0, 14.0)
    product = torch.cos(2 * math.pi * freq * along) * torch.cos(2 * math.pi * freq * _draw(generator, n, 0.6, 1.6) * across)
    return _soft_step(product, torch.zeros(n, 1, 1), _log_draw(generator, n, 4.0, 60.0))


def _blotches(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    noise = fractal_noise(n, grid, generator, _log_draw(generator, n, 2.0, 8.0).view(-1))
    return _soft_step(noise, _draw(generator, n, 0.35, 0.65), _log_draw(generator, n, 4.0, 40.0))


def _marble(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    along, _ = grid.rotated(_angle(generator, n))
    warp = fractal_noise(n, grid, generator, 3.0, octaves=5)
    phase = _log_draw(generator, n, 1.5, 8.0) * along + _draw(generator, n, 1.0, 4.0) * warp
    veins = (0.5 + 0.5 * torch.sin(2 * math.pi * phase)).pow(_log_draw(generator, n, 0.3, 4.0))
    return veins


def _cells(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    """Worley cells: one site per lattice cell, jittered; each pixel looks at the sites of
    its own and the 8 neighbouring cells (the nearest two are always among them)."""
    freq = _log_draw(generator, n, 3.0, 10.0)  # cells per side
    rows = math.ceil(float(freq.max()) * grid.height / grid.side) + 2
    cols = math.ceil(float(freq.max()) * grid.width / grid.side) + 2
    jitter = _draw(generator, n, 0.5, 1.0)[..., None]
    # site of lattice cell (i, j), stored at [i + 1, j + 1]: its corner plus an offset
    offset = 0.5 + jitter * (torch.rand((n, rows, cols, 2), generator=generator) - 0.5)
    shade = torch.rand((n, rows * cols), generator=generator)
    y, x = freq * grid.y, freq * grid.x  # n x H x W in cell units
    cell_y, cell_x = torch.floor(y), torch.floor(x)
    # the nearest and second-nearest site so far, updated over the 9 candidates
    # (elementwise; a topk over a stacked 9 x n x H x W tensor is ten times slower on CPU)
    first = torch.full_like(y, math.inf)
    second = torch.full_like(y, math.inf)
    owner = torch.zeros(y.shape, dtype=torch.long)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            index = ((cell_y + dy + 1) * cols + (cell_x + dx + 1)).long().view(n, -1)  # n x P
            site = offset.view(n, rows * cols, 2).gather(1, index[..., None].expand(-1, -1, 2))
            site_y = cell_y + dy + site[..., 0].view_as(y)
            site_x = cell_x + dx + site[..., 1].view_as(x)
            distance = torch.sqrt((y - site_y) ** 2 + (x - site_x) ** 2)
            closer = distance < first
            second = torch.where(closer, first, torch.minimum(second, distance))
            owner = torch.where(closer, index.view_as(y), owner)
            first = torch.where(closer, distance, first)
    gap = second - first  # 0 on the wall between two cells
    inside = _soft_step(gap, _draw(generator, n, 0.03, 0.2), torch.tensor(40.0))
    return shade.gather(1, owner.view(n, -1)).view_as(y) * (0.3 + 0.7 * inside)


def _dots(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    along, across = grid.rotated(_angle(generator, n))
    freq = _log_draw(generator, n, 4.0, 20.0)
    a, b = freq * along, freq * across
    hexagonal = (torch.rand((n, 1, 1), generator=generator) < 0.5).float()
    b = b + hexagonal * 0.5 * (torch.floor(a) % 2)  # every other row shifted half a period
    radius = torch.sqrt((a - torch.floor(a) - 0.5) ** 2 + (b - torch.floor(b) - 0.5) ** 2)
    return 1 - _soft_step(radius, _draw(generator, n, 0.12, 0.42), _log_draw(generator, n, 15.0, 80.0))


def _weave(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    along, across = grid.rotated(_angle(generator, n))
    freq = _log_draw(generator, n, 3.0, 12.0)
    a, b = freq * along, freq * across
    over = (torch.floor(a) + torch.floor(b)) % 2  # which thread lies on top in this block
    threads = torch.randint(2, 6, (n, 1, 1), generator=generator).float()
    warp = 0.5 + 0.5 * torch.cos(2 * math.pi * threads * b)  # threads running along a
    weft = 0.5 + 0.5 * torch.cos(2 * math.pi * threads * a)
    bulge = torch.sin(math.pi * torch.where(over > 0, a - torch.floor(a), b - torch.floor(b)))
    return torch.where(over > 0, warp, weft) * (0.4 + 0.6 * bulge)


def _zigzag(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    along, across = grid.rotated(_angle(generator, n))
    teeth = _log_draw(generator, n, 2.0, 10.0) * across
    triangle = 2 * (teeth - torch.floor(teeth) - 0.5).abs()  # 0..1..0 along the stripes
    freq = _log_draw(generator, n, 3.0, 16.0)
    wave = torch.cos(2 * math.pi * freq * (along + _draw(generator, n, 0.05, 0.3) * triangle))
    return _soft_step(wave, _draw(generator, n, -0.5, 0.5), _log_draw(generator, n, 3.0, 40.0))


def _ripples(n: int, grid: _Grid, generator: torch.Generator) -> Tensor:
    centre_y = _draw(generator, n, -0.2, 1.2) * grid.height / grid.side
    centre_x = _draw(generator, n, -0.2, 1.2) * grid.width / grid.side
    radius = torch.sqrt((grid.y - centre_y) ** 2 + (grid.x - centre_x) ** 2)
    spin = torch.atan2(grid.y - centre_y, grid.x - centre_x) / (2 * math.pi)
    twist = torch.randint(-3, 4, (n, 1, 1), generator=generator).float()  # arms of a spiral, 0: rings
    warp = value_noise(n, grid, generator, 4.0)
    phase = _log_draw(generator, n, 3.0, 20.0) * radius + twist * spin + _draw(generator, n, 0.0, 1.5) * warp
    return 0.5 + 0.5 * torch.sin(2 * math.pi * phase)


KINDS: dict[str, Field] = {
    "stripes": _stripes,
    "grid": _grid_lines,
    "checker": _checker,
    "blotches": _blotches,
    "marble": _marble,
    "cells": _cells,
    "dots": _dots,
    "weave": _weave,
    "zigzag": _zigzag,
    "ripples": _ripples,
}


def _palettes(n: int, generator: torch.Generator) -> Tensor:
    """n x 3 colours x 3 channels: a dark, a middle and a light colour of related or
    contrasting hues, sometimes nearly grey (DTD holds both), in random order of lightness."""
    cpu = torch.device("cpu")
    base = uniform(generator, (n, 1), cpu)
    spread = uniform(generator, (n, 1), cpu, 0.0, 0.5) * torch.tensor([[-1.0, 0.0, 1.0]])
    hue = (base + spread) % 1.0
    saturation = uniform(generator, (n, 1), cpu, 0.0, 0.9) * uniform(generator, (n, 3), cpu, 0.5, 1.0)
    dark = uniform(generator, (n, 1), cpu, 0.02, 0.45)
    light = uniform(generator, (n, 1), cpu, 0.55, 1.0)
    value = torch.cat((dark, torch.lerp(dark, light, uniform(generator, (n, 1), cpu, 0.3, 0.7)), light), 1)
    flip = torch.rand((n, 1), generator=generator) < 0.5  # light marks on dark as often as the reverse
    value = torch.where(flip, value.flip(1), value)
    return hsv_to_rgb(hue, saturation, value).transpose(1, 2)  # n x 3 stops x RGB


def _colour(field: Tensor, palette: Tensor) -> Tensor:
    """n x H x W in [0, 1] -> n x 3 x H x W through each image's 3-stop palette."""
    t = field.clamp(0.0, 1.0)[:, None]  # n x 1 x H x W
    low, mid, high = (palette[:, k, :, None, None] for k in range(3))
    first = torch.lerp(low, mid, (2 * t).clamp_max(1.0))
    return torch.lerp(first, high, (2 * t - 1).clamp_min(0.0))


GRAIN_CELLS = 48.0  # grain blobs per side: in side units like every length, so every
# draw, and with it the bank, is the same at any size (only its resolution changes)


def generate_textures(count: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """``count`` textures, count x 3 x H x W float in [0, 1], on the CPU; kinds in turn
    (texture i is of kind i mod 10), every parameter drawn from ``generator``."""
    if count < 1 or height < 1 or width < 1:
        raise ValueError(f"generate_textures: count, height and width must be >= 1, got {count}, {height}, {width}")
    grid = _Grid(height, width)
    out = torch.empty(count, 3, height, width)
    for offset, make in enumerate(KINDS.values()):
        rows = torch.arange(offset, count, len(KINDS))
        if rows.numel() == 0:
            continue
        field = make(rows.numel(), grid, generator)
        grain = value_noise(rows.numel(), grid, generator, GRAIN_CELLS) - 0.5
        field = field + _draw(generator, rows.numel(), 0.0, 0.35) * grain
        out[rows] = _colour(field, _palettes(rows.numel(), generator)).clamp(0.0, 1.0)
    return out


_CACHE: "OrderedDict[tuple[int, int, int, int], Tensor]" = OrderedDict()
_CACHE_ENTRIES = 4  # a process trains at one or two shapes; older banks are dropped


def texture_bank(count: int, height: int, width: int, seed: int = 0) -> Tensor:
    """The bank of ``count`` textures at H x W from ``seed``: count x 3 x H x W uint8 on the
    CPU, made once per process and (count, H, W, seed). Callers must not modify it."""
    key = (count, height, width, seed)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    generator = torch.Generator().manual_seed(seed)
    bank = generate_textures(count, height, width, generator).mul(255.0).round_().to(torch.uint8)
    _CACHE[key] = bank
    while len(_CACHE) > _CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return bank
