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
* Sharpness (PIL's 3 x 3 smoothing kernel, extrapolated) uses separable box sums;
  rotate is one ``grid_sample`` with reflection padding.

The ops run in a fixed order (the pointwise table, then hue/saturation, sharpness,
rotate); imgaug draws the order at random. Parameter ranges follow DRAEM's code.
"""

from __future__ import annotations

import math

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


def augment_sources(images: Tensor, generator: torch.Generator, n_aug: int, *, in_place: bool = False) -> Tensor:
    """B x C x H x W in [0, 1] -> the same with ``n_aug`` distinct random ops per image.
    ``in_place``: write into ``images`` (the caller owns it) instead of a copy."""
    if n_aug <= 0:
        return images
    batch = images.shape[0]
    device = images.device
    ranks = torch.rand((batch, len(OPS)), generator=generator, device=device).argsort(1).argsort(1)
    chosen = ranks < n_aug
    out = images if in_place else images.clone()
    pointwise = chosen[:, : len(POINTWISE_OPS)]
    rows = pointwise.any(1).nonzero().squeeze(1)
    if rows.numel():
        _apply_subset(out, rows, lambda part: _apply_pointwise(part, pointwise[rows], generator))
    for offset, op in enumerate((_hue_saturation, _sharpness, _rotate)):
        rows = chosen[:, len(POINTWISE_OPS) + offset].nonzero().squeeze(1)
        if rows.numel():
            _apply_subset(out, rows, lambda part: op(part, generator).clamp_(0.0, 1.0))
    return out


def _apply_subset(out: Tensor, rows: Tensor, op) -> None:
    if rows.numel() == out.shape[0]:
        out.copy_(op(out))
    else:
        out.index_copy_(0, rows, op(out.index_select(0, rows)))


# ------------------------------------------------------------------ pointwise table


def quantize(images: Tensor) -> Tensor:
    """[0, 1] floats -> int64 levels 0..255 (round half up, as a uint8 conversion would)."""
    return torch.mul(images.clamp(0.0, 1.0), LEVELS - 1).add_(0.5).long()


def _apply_pointwise(images: Tensor, chosen: Tensor, generator: torch.Generator) -> Tensor:
    """Compose the chosen pointwise ops (N x 7 bool) into per-channel tables and apply them."""
    count, channels = images.shape[:2]
    levels = quantize(images).view(count * channels, -1)
    needs_histogram = bool(chosen[:, POINTWISE_OPS.index("autocontrast")].any() | chosen[:, POINTWISE_OPS.index("equalize")].any())
    histogram = None
    if needs_histogram:
        histogram = torch.zeros(count * channels, LEVELS, device=images.device)
        histogram.scatter_add_(1, levels, torch.ones((1, 1), device=images.device).expand_as(levels))
        histogram = histogram.view(count, channels, LEVELS)
    table = build_table(chosen, channels, generator, images.device, histogram)
    return table.view(count * channels, LEVELS).gather(1, levels).view_as(images)


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


def _hue_saturation(x: Tensor, g: torch.Generator) -> Tensor:
    count = x.shape[0]
    # imgaug AddToHueAndSaturation((-50, 50)): hue in 0..255 units of the circle, and
    # saturation +-50 of 255, taken here as a chroma scale of 1 +- 50/127.5
    hue = uniform(g, (count,), x.device, -50 / 255, 50 / 255)
    saturation = 1.0 + uniform(g, (count,), x.device, -50 / 127.5, 50 / 127.5)
    if x.shape[1] == 1:  # no hue on grey: shift the intensity a little instead
        return x + hue[:, None, None, None]
    matrix = hue_saturation_matrix(hue, saturation)
    return torch.bmm(matrix, x.reshape(count, 3, -1)).view_as(x)


def _sharpness(x: Tensor, g: torch.Generator) -> Tensor:
    # PIL's SHARPEN-style smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 is
    # (3 x 3 box sum + 4 x centre) / 13; the box sum is two separable 3-tap sums.
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    smooth = box.add_(x, alpha=4.0).div_(13.0)
    factor = uniform(g, (x.shape[0], 1, 1, 1), x.device, 0.0, 2.0)
    return torch.lerp(smooth, x, factor)


def _rotate(x: Tensor, g: torch.Generator) -> Tensor:
    angle = uniform(g, (x.shape[0],), x.device, -math.pi / 4, math.pi / 4)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
