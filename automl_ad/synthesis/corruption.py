"""Structured corruptions for the self-supervised autoencoder (SSAE) of Bauer, Nakajima
and Müller ("Self-Supervised Training with Autoencoders for Visual Anomaly Detection",
arXiv 2206.11723; "Self-Supervised Autoencoders for Visual Anomaly Detection",
Mathematics 12(24) 3988, 2024), batched in torch.

What the paper says (abstracts of arXiv v8 and the journal version, read through the
search tool; the full method section could not be retrieved): training is a denoising
autoencoder with *structured, spatially coherent, non-i.i.d.* corruption of parts of the
input, the target being the clean image, so the model learns to keep normal regions and
replace irregular ones (a hybrid of inpainting and segmentation). The follow-up by Bauer
and Müller (arXiv 2511.07233, "Noise & Pattern") adds Gaussian noise on top of the
occluded regions.

What is implemented, and is an ASSUMPTION where the paper text was not available
(third-party descriptions mention elastic deformations and DTD-like textures inside
random masks, unverified):
  - regions: 1 to ``n_regions`` per image (the first always, each further one with
    probability 0.5), each a smooth random blob: an ellipse-like window of side
    U(size_min, size_max) x image side, aspect up to 2:1, random rotation, whose border is
    perturbed by Perlin noise (amplitude ``roughness``);
  - fill, drawn per region with weights (w_patch, w_noise, w_elastic):
      patch:   content of a donor image (another normal image), shifted and rescaled,
      noise:   a generated colour fractal-noise texture,
      elastic: the image itself warped by a smooth random displacement field of
               magnitude ``elastic`` x image side;
  - optional Gaussian noise of std ``noise_std`` added inside the regions (Noise &
    Pattern; 0 = off, the 2022/2024 setting as far as the abstracts tell).
Masks are the corrupted regions; image label 1 iff a region is non-empty. Every training
input is corrupted by default (``normal_share`` 0), as a denoising AE sees no clean input.

Params (``CorruptionParams``): normal_share [0, 1] 0.0; n_regions [1, 8] 3;
size_min [0.02, 0.8] 0.08; size_max [0.02, 0.8] 0.3; roughness [0, 1] 0.5;
w_patch [0, 1] 1.0; w_noise [0, 1] 1.0; w_elastic [0, 1] 1.0; elastic [0.005, 0.2] 0.04;
noise_std [0, 0.3] 0.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.errors import UserError
from automl_ad.synthesis.base import SynthBatch, SynthParams, Synthesizer, register_family, affine_paste, pixel_grid, uniform
from automl_ad.synthesis.perlin import noise_textures, perlin_noise


@dataclass
class CorruptionParams(SynthParams):
    FAMILY: ClassVar[str] = "corruption"
    RANGES: ClassVar[dict[str, tuple]] = {
        "normal_share": (0.0, 1.0),
        "n_regions": (1, 8),
        "size_min": (0.02, 0.8),
        "size_max": (0.02, 0.8),
        "roughness": (0.0, 1.0),
        "w_patch": (0.0, 1.0),
        "w_noise": (0.0, 1.0),
        "w_elastic": (0.0, 1.0),
        "elastic": (0.005, 0.2),
        "noise_std": (0.0, 0.3),
    }
    PAIRS: ClassVar[tuple] = (("size_min", "size_max"),)

    normal_share: float = 0.0
    n_regions: int = 3
    size_min: float = 0.08
    size_max: float = 0.3
    roughness: float = 0.5
    w_patch: float = 1.0
    w_noise: float = 1.0
    w_elastic: float = 1.0
    elastic: float = 0.04
    noise_std: float = 0.0

    def check_pairs(self) -> None:
        super().check_pairs()
        if self.w_patch + self.w_noise + self.w_elastic <= 0:
            raise UserError("synthesis corruption: w_patch + w_noise + w_elastic must be > 0 (all are 0)")


def blob_masks(batch: int, height: int, width: int, generator: torch.Generator, device: torch.device, size_min: float, size_max: float, roughness: float) -> Tensor:
    """B x 1 x H x W {0,1}: rotated ellipse-like blobs with Perlin-perturbed borders."""
    side = min(height, width)
    radius = uniform(generator, (batch,), device, size_min, size_max) * side / 2
    aspect = torch.exp(uniform(generator, (batch,), device, -math.log(2.0), math.log(2.0)))
    radius_y, radius_x = radius * aspect.sqrt(), radius / aspect.sqrt()
    reach = torch.maximum(radius_y, radius_x)
    center_y = uniform(generator, (batch,), device, 0.0, 1.0) * (height - 2 * reach).clamp_min(0) + reach
    center_x = uniform(generator, (batch,), device, 0.0, 1.0) * (width - 2 * reach).clamp_min(0) + reach
    angle = uniform(generator, (batch,), device, 0.0, math.pi)
    yy, xx = pixel_grid(batch, height, width, device)
    dy, dx = yy - center_y[:, None, None], xx - center_x[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = (cos * dy - sin * dx) / radius_y[:, None, None]
    v = (sin * dy + cos * dx) / radius_x[:, None, None]
    periods = torch.randint(2, 9, (batch,), generator=generator, device=device)
    wobble = perlin_noise(batch, height, width, periods, periods, generator)
    return ((u * u + v * v).sqrt() + roughness * 0.5 * wobble < 1.0).float().unsqueeze(1)


def elastic_warp(images: Tensor, generator: torch.Generator, magnitude: float) -> Tensor:
    """Warp by a smooth random displacement field (about ``magnitude`` x side)."""
    batch, _, height, width = images.shape
    periods = torch.randint(2, 6, (2 * batch,), generator=generator, device=images.device)
    field = perlin_noise(2 * batch, height, width, periods, periods, generator).view(batch, 2, height, width)
    base_y = (torch.arange(height, device=images.device, dtype=torch.float32) * 2 + 1) / height - 1
    base_x = (torch.arange(width, device=images.device, dtype=torch.float32) * 2 + 1) / width - 1
    gy, gx = torch.meshgrid(base_y, base_x, indexing="ij")
    grid = torch.stack((gx + 2 * magnitude * field[:, 1], gy + 2 * magnitude * field[:, 0]), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@register_family
class CorruptionSynthesizer(Synthesizer):
    FAMILY = "corruption"
    Params = CorruptionParams

    def synthesize(self, images: Tensor, donors: Tensor, generator: torch.Generator, *, sources_given: bool) -> SynthBatch:
        p = self.params
        batch, channels, height, width = images.shape
        device = images.device
        current = images.clone()
        union = images.new_zeros(batch, 1, height, width)
        weights = torch.tensor([p.w_patch, p.w_noise, p.w_elastic], device=device)
        for region in range(p.n_regions):
            active = torch.ones(batch, dtype=torch.bool, device=device) if region == 0 else uniform(generator, (batch,), device) < 0.5
            rows = active.nonzero().squeeze(1)
            count = rows.numel()
            if count == 0:
                continue
            mask = blob_masks(count, height, width, generator, device, p.size_min, p.size_max, p.roughness)
            kind = torch.multinomial(weights.expand(count, -1), 1, generator=generator).view(count, 1, 1, 1)
            fill = self._fills(current[rows], donors[rows], generator, kind)
            if p.noise_std > 0:
                fill = fill + p.noise_std * torch.randn(fill.shape, generator=generator, device=device)
            current[rows] = torch.where(mask > 0, fill.clamp(0, 1), current[rows])
            union[rows] = torch.maximum(union[rows], mask)
        return SynthBatch(current, union, (union.flatten(1).amax(1) > 0).float())

    def _fills(self, images: Tensor, donors: Tensor, generator: torch.Generator, kind: Tensor) -> Tensor:
        count, channels, height, width = images.shape
        device = images.device
        side = images.new_tensor([height, width])
        half = side.expand(count, 2) / 2
        src_center = uniform(generator, (count, 2), device) * side
        scale = torch.exp(uniform(generator, (count,), device, -math.log(1.5), math.log(1.5)))
        fill = torch.empty_like(images)
        for code in range(3):
            rows = (kind.view(-1) == code).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if code == 0:
                fill[rows] = affine_paste(donors[rows], half[rows], half[rows] + 1, src_center[rows], scale[rows])[0]
            elif code == 1:
                fill[rows] = noise_textures(rows.numel(), channels, height, width, generator, device)
            else:
                fill[rows] = elastic_warp(images[rows], generator, self.params.elastic)
        return fill
