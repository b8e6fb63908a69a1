"""DRAEM's anomaly-source augmentations, batched: ``n_aug`` distinct ops out of ten per image.

DRAEM (Zavrtanik et al. 2021) augments each anomaly source with three random imgaug ops
out of: gamma contrast (per channel), brightness multiply+add, PIL sharpness, hue and
saturation shift, solarize, posterize, invert, PIL autocontrast, PIL equalize, rotate.
imgaug works on uint8 images; so does this module, which is what makes it fast:

* The seven *pointwise* ops (gamma, brightness, solarize, posterize, invert,
  autocontrast, equalize) map each 8-bit level of a channel to a new value, so for each
  image and channel their composition is one 256-entry lookup table. The tables are
  built on B x C x 256 tensors (autocontrast and equalize read the histogram of the
  image as the earlier ops left it: the level histogram pushed through the table so
  far) and applied with a single gather, however many pointwise ops an image drew.
* Hue/saturation is a 3 x 3 colour matrix per image: the chroma plane of YIQ rotated by
  the hue shift and scaled by the saturation change (the usual linear approximation of
  an HSV hue rotation; exact for greys, close for moderate saturations).
* Sharpness (PIL's 3 x 3 smoothing kernel, extrapolated) uses separable box sums on
  whole images (evaluating it at the masked pixels only, nine reads each, measured
  slower on CPU: the gathers cost more than the dense stencil);
  rotate is ``grid_sample``'s bilinear read with reflection padding.

The ops run in a fixed order: sharpness, the pointwise table, hue/saturation, rotate
(imgaug draws the order at random). Every op after sharpness is pointwise or a bilinear
read, so the augmented source can be evaluated at chosen pixels only (``sample``): DRAEM
blends the source only inside its Perlin mask, a few per cent of the pixels. Parameter
ranges follow DRAEM's code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.synthesis.base import uniform

POINTWISE_OPS = ("gamma", "brightness", "solarize", "posterize", "invert", "autocontrast", "equalize")
SPATIAL_OPS = ("hue_saturation", "sharpness", "rotate")
OPS = POINTWISE_OPS + SPATIAL_OPS
LEVELS = 256

# RGB -> YIQ (NTSC); its inverse maps back.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass
class SourceAugmentation:
    """One batch's draws. ``source``: B x C x H x W after sharpness (the one op that needs
    a neighbourhood before the others); then, in this order, per image: the pointwise
    ``table`` (B x C x 256, used on ``pointwise_rows``), the colour transform
    ``colour @ v + offset`` (B x C x C, B x C; on ``hue_rows``, identity elsewhere) and the
    rotation ``angle`` (B radians, 0 where rotate was not drawn; None when no image
    rotates). ``render`` evaluates it everywhere, ``sample`` only at given pixels."""

    source: Tensor
    pointwise_rows: Tensor
    hue_rows: Tensor
    table: Tensor | None
    colour: Tensor
    offset: Tensor
    angle: Tensor | None


def plan_augmentation(source: Tensor, generator: torch.Generator, n_aug: int) -> SourceAugmentation:
    """Draw ``n_aug`` distinct ops per image and their parameters. ``source`` is owned by
    the caller and sharpened in place on the rows that drew sharpness."""
    batch, channels = source.shape[:2]
    device = source.device
    ranks = torch.rand((batch, len(OPS)), generator=generator, device=device).argsort(1).argsort(1)
    chosen = ranks < max(n_aug, 0)
    column = {name: chosen[:, index] for index, name in enumerate(OPS)}
    # PIL's ImageEnhance.Sharpness factor, DRAEM's (0, 2); drawn for every row so that
    # the stream does not depend on which rows chose the op
    factor = uniform(generator, (batch,), device, 0.0, 2.0)
    sharpen = column["sharpness"].nonzero().squeeze(1)
    if sharpen.numel():
        _apply_subset(source, sharpen, lambda part: _sharpen(part, factor.index_select(0, sharpen)))
    pointwise = chosen[:, : len(POINTWISE_OPS)]
    pointwise_rows = pointwise.any(1)
    table = None
    if bool(pointwise_rows.any()):
        histogram = None
        if bool((column["autocontrast"] | column["equalize"]).any()):
            histogram = _histograms(source, column["autocontrast"] | column["equalize"])
        table = build_table(pointwise, channels, generator, device, histogram)
    colour, offset = _colour_transform(batch, channels, generator, device)
    hue = column["hue_saturation"]
    identity = torch.eye(channels, device=device).expand(batch, -1, -1)
    colour = torch.where(hue[:, None, None], colour, identity)
    offset = torch.where(hue[:, None], offset, torch.zeros_like(offset))
    angle = uniform(generator, (batch,), device, -math.pi / 4, math.pi / 4)
    angle = torch.where(column["rotate"], angle, torch.zeros_like(angle)) if bool(column["rotate"].any()) else None
    return SourceAugmentation(source, pointwise_rows, hue, table, colour, offset, angle)


def augment_sources(images: Tensor, generator: torch.Generator, n_aug: int, *, in_place: bool = False) -> Tensor:
    """B x C x H x W in [0, 1] -> the same with ``n_aug`` distinct random ops per image.
    ``in_place``: the caller owns ``images`` (it is sharpened in place) instead of a copy."""
    if n_aug <= 0:
        return images
    return render(plan_augmentation(images if in_place else images.clone(), generator, n_aug))


def render(aug: SourceAugmentation) -> Tensor:
    """The augmented sources at every pixel, B x C x H x W."""
    out = aug.source
    batch, channels = out.shape[:2]
    if aug.table is not None:
        rows = aug.pointwise_rows.nonzero().squeeze(1)
        levels = quantize(out.index_select(0, rows)).view(rows.numel() * channels, -1)
        mapped = aug.table.index_select(0, rows).view(-1, LEVELS).gather(1, levels)
        out = out.index_copy(0, rows, mapped.view(rows.numel(), channels, *out.shape[2:]))
    flat = out.reshape(batch, channels, -1)
    out = (torch.bmm(aug.colour, flat) + aug.offset[:, :, None]).clamp_(0.0, 1.0).view_as(out)
    if aug.angle is not None:
        rows = (aug.angle != 0).nonzero().squeeze(1)
        out = out.index_copy(0, rows, _rotate(out.index_select(0, rows), aug.angle.index_select(0, rows)))
    return out


def sample(aug: SourceAugmentation, image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """The augmented sources at pixels (``image``, ``y``, ``x``: N indices), N x C; equal
    to ``render(aug)[image, :, y, x]`` up to float rounding, at a cost that follows N."""
    height, width = aug.source.shape[2:]
    if aug.angle is None:
        return _evaluate(aug, image, y * width + x)
    turned = aug.angle[image] != 0
    out = torch.empty(image.numel(), aug.source.shape[1], device=image.device)
    straight = (~turned).nonzero().squeeze(1)
    out[straight] = _evaluate(aug, image[straight], y[straight] * width + x[straight])
    turned = turned.nonzero().squeeze(1)
    image, y, x = image[turned], y[turned], x[turned]
    src_y, src_x = _rotated_coordinates(aug.angle[image], y, x, height, width)
    top, left = src_y.floor(), src_x.floor()
    weight_y, weight_x = src_y - top, src_x - left
    top, left = top.long(), left.long()
    value = 0.0
    for dy, dx, weight in ((0, 0, (1 - weight_y) * (1 - weight_x)), (0, 1, (1 - weight_y) * weight_x),
                           (1, 0, weight_y * (1 - weight_x)), (1, 1, weight_y * weight_x)):
        row, col = top + dy, left + dx
        # a corner past the last pixel has weight 0 (coordinates are clipped to the image)
        weight = weight * ((row < height) & (col < width))
        corner = row.clamp_max(height - 1) * width + col.clamp_max(width - 1)
        value = value + weight[:, None] * _evaluate(aug, image, corner)
    out[turned] = value
    return out


def _evaluate(aug: SourceAugmentation, image: Tensor, pixel: Tensor) -> Tensor:
    """Source after table and colour at flat pixel index ``pixel`` of ``image``: N x C."""
    channels, height, width = aug.source.shape[1:]
    plane = image[:, None] * channels + torch.arange(channels, device=image.device)  # N x C
    values = aug.source.reshape(-1).take(plane * (height * width) + pixel[:, None])
    if aug.table is not None:
        mapped = aug.table.reshape(-1).take(plane * LEVELS + quantize(values))
        values = mapped if bool(aug.pointwise_rows.all()) else torch.where(aug.pointwise_rows[image][:, None], mapped, values)
    coloured = aug.hue_rows[image].nonzero().squeeze(1)
    if coloured.numel():
        rows = image[coloured]
        values[coloured] = (
            torch.einsum("nij,nj->ni", aug.colour[rows], values[coloured]) + aug.offset[rows]
        ).clamp_(0.0, 1.0)
    return values


def _rotated_coordinates(angle: Tensor, y: Tensor, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Where ``_rotate`` (affine_grid + grid_sample, align_corners=False, reflection
    padding) reads output pixel (y, x) from, in pixels; identity rows stay exact."""
    center_y, center_x = (height - 1) / 2, (width - 1) / 2
    dy, dx = y.float() - center_y, x.float() - center_x
    cos, sin = torch.cos(angle), torch.sin(angle)
    src_x = center_x + cos * dx - sin * dy * (width / height)
    src_y = center_y + sin * dx * (height / width) + cos * dy
    return _reflect(src_y, height), _reflect(src_x, width)


def _reflect(coordinate: Tensor, size: int) -> Tensor:
    """grid_sample's reflection padding for align_corners=False: mirror at -0.5 and
    size - 0.5, then clip to [0, size - 1]."""
    shifted = (coordinate + 0.5).abs()
    flips = torch.floor(shifted / size)
    extra = shifted - flips * size
    mirrored = torch.where(flips % 2 == 0, extra, size - extra) - 0.5
    return mirrored.clamp(0.0, size - 1.0)


def _apply_subset(out: Tensor, rows: Tensor, op) -> None:
    if rows.numel() == out.shape[0]:
        out.copy_(op(out))
    else:
        out.index_copy_(0, rows, op(out.index_select(0, rows)))


def _histograms(images: Tensor, rows: Tensor) -> Tensor:
    """B x C x 256 level counts of the images on ``rows`` (B bool), zeros elsewhere."""
    batch, channels = images.shape[:2]
    index = rows.nonzero().squeeze(1)
    # one bincount over (plane, level) keys in int32: exact, and a few times faster than
    # a scatter_add of int64 levels
    levels = images.index_select(0, index).clamp_(0.0, 1.0).mul_(LEVELS - 1).add_(0.5).to(torch.int32)
    planes = index.numel() * channels
    levels += (torch.arange(planes, device=images.device, dtype=torch.int32) * LEVELS).view(-1, channels, 1, 1)
    counts = torch.bincount(levels.view(-1), minlength=planes * LEVELS).view(-1, channels, LEVELS)
    histogram = torch.zeros(batch, channels, LEVELS, device=images.device)
    return histogram.index_copy_(0, index, counts.float())


# ------------------------------------------------------------------ pointwise table


def quantize(images: Tensor) -> Tensor:
    """[0, 1] floats -> int64 levels 0..255 (round half up, as a uint8 conversion would)."""
    return torch.mul(images.clamp(0.0, 1.0), LEVELS - 1).add_(0.5).long()


def build_table(
    chosen: Tensor, channels: int, generator: torch.Generator, device: torch.device, histogram: Tensor | None
) -> Tensor:
    """N x C x 256 output value of every input level after the chosen pointwise ops, in
    ``POINTWISE_OPS`` order. ``histogram`` (N x C x 256 level counts of the images) is
    needed when autocontrast or equalize is chosen. Every op draws its numbers for all N
    rows (determinism does not depend on which rows chose it)."""
    count = chosen.shape[0]
    table = (torch.arange(LEVELS, device=device, dtype=torch.float32) / (LEVELS - 1)).expand(count, channels, -1)
    for index, name in enumerate(POINTWISE_OPS):
        applied = _TABLE_OPS[name](table, generator, histogram)
        table = torch.where(chosen[:, index, None, None], applied.clamp(0.0, 1.0), table)
    return table


def _gamma(table: Tensor, g: torch.Generator, histogram: Tensor | None) -> Tensor:
    exponent = torch.exp(uniform(g, (table.shape[0], table.shape[1], 1), table.device, math.log(0.5), math.log(2.0)))
    return table.clamp_min(1e-6) ** exponent


def _brightness(table: Tensor, g: torch.Generator, histogram: Tensor | None) -> Tensor:
    mul = uniform(g, (table.shape[0], 1, 1), table.device, 0.8, 1.2)
    add = uniform(g, (table.shape[0], 1, 1), table.device, -30 / 255, 30 / 255)
    return table * mul + add


def _solarize(table: Tensor, g: torch.Generator, histogram: Tensor | None) -> Tensor:
    threshold = uniform(g, (table.shape[0], 1, 1), table.device, 32 / 255, 128 / 255)
    apply = uniform(g, (table.shape[0], 1, 1), table.device) < 0.5
    return torch.where(apply & (table >= threshold), 1.0 - table, table)


def _posterize(table: Tensor, g: torch.Generator, histogram: Tensor | None) -> Tensor:
    bits = torch.randint(1, 8, (table.shape[0], 1, 1), generator=g, device=table.device).float()
    step = 256.0 / 2.0**bits
    return torch.floor(table * 255.0 / step) * step / 255.0


def _invert(table: Tensor, g: torch.Generator, histogram: Tensor | None) -> Tensor:
    return 1.0 - table


def _autocontrast(table: Tensor, g: torch.Generator, histogram: Tensor | None) -> Tensor:
    if histogram is None:  # no row chose it (build_table's caller skips the histogram)
        return table
    present = histogram > 0
    low = torch.where(present, table, torch.full_like(table, math.inf)).amin(-1, keepdim=True)
    high = torch.where(present, table, torch.full_like(table, -math.inf)).amax(-1, keepdim=True)
    spread = high - low
    return torch.where(spread > 1e-6, (table - low) / spread.clamp_min(1e-6), table)


def _equalize(table: Tensor, g: torch.Generator, histogram: Tensor | None) -> Tensor:
    if histogram is None:
        return table
    current = quantize(table)  # the level each input level has become
    counts = torch.zeros_like(histogram).scatter_add_(-1, current, histogram)
    cdf = counts.cumsum(-1)
    total = cdf[..., -1:]
    cdf_min = torch.where(counts > 0, cdf, total.expand_as(cdf)).amin(-1, keepdim=True)
    equalized = (cdf - cdf_min) / (total - cdf_min).clamp_min(1.0)
    return equalized.gather(-1, current)


_TABLE_OPS = {
    "gamma": _gamma, "brightness": _brightness, "solarize": _solarize, "posterize": _posterize,
    "invert": _invert, "autocontrast": _autocontrast, "equalize": _equalize,
}


# -------------------------------------------------------------------- spatial ops


def hue_saturation_matrix(hue_shift: Tensor, saturation_scale: Tensor) -> Tensor:
    """N x 3 x 3 RGB colour matrices: rotate YIQ chroma by ``hue_shift`` (fraction of the
    circle) and scale it by ``saturation_scale``; luma is kept."""
    angle = 2 * math.pi * hue_shift
    cos, sin = torch.cos(angle) * saturation_scale, torch.sin(angle) * saturation_scale
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    chroma = torch.stack((
        torch.stack((one, zero, zero), -1),
        torch.stack((zero, cos, -sin), -1),
        torch.stack((zero, sin, cos), -1),
    ), -2)
    to_yiq = _RGB_TO_YIQ.to(hue_shift.device)
    to_rgb = _YIQ_TO_RGB.to(hue_shift.device)
    return to_rgb @ chroma @ to_yiq


def _colour_transform(batch: int, channels: int, g: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per image ``colour`` (B x C x C) and ``offset`` (B x C) of the hue/saturation op."""
    # imgaug AddToHueAndSaturation((-50, 50)): hue in 0..255 units of the circle, and
    # saturation +-50 of 255, taken here as a chroma scale of 1 +- 50/127.5
    hue = uniform(g, (batch,), device, -50 / 255, 50 / 255)
    saturation = 1.0 + uniform(g, (batch,), device, -50 / 127.5, 50 / 127.5)
    if channels == 1:  # no hue on grey: shift the intensity a little instead
        return torch.ones(batch, 1, 1, device=device), hue[:, None]
    return hue_saturation_matrix(hue, saturation), torch.zeros(batch, 3, device=device)


def _sharpen(x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ImageEnhance.Sharpness on N images with N factors: extrapolate from the
    smoothed image, clipped to [0, 1]."""
    # PIL's SHARPEN-style smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 is
    # (3 x 3 box sum + 4 x centre) / 13; the box sum is two separable 3-tap sums.
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    smooth = box.add_(x, alpha=4.0).div_(13.0)
    return torch.lerp(smooth, x, factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _rotate(x: Tensor, angle: Tensor) -> Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
