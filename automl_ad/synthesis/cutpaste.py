"""CutPaste and CutPaste-scar (Li et al., CVPR 2021), batched in torch.

cutpaste: a rectangle of area U(area_min, area_max) x image area and aspect ratio drawn
from U(1/aspect_max... 1) or U(1, aspect_max) with equal probability (paper: (0.3, 1) u
(1, 3.3)) is cut from the image itself (from a random ``sources`` image when given),
colour-jittered (brightness/contrast/saturation/hue = ``jitter``) and pasted at a random
location.
cutpaste_scar: a thin rectangle, width U(width_min, width_max) and length
U(length_min, length_max) pixels at 256 px (scaled with the image side), rotated by
U(-rotate, rotate) degrees, jittered, pasted elsewhere.

Masks are the pasted region; image label 1 iff that region is non-empty.

Params (``CutPasteParams``): normal_share [0, 1] 0.5, area_min [0.005, 0.5] 0.02,
area_max [0.005, 0.5] 0.15, aspect_max [1, 5] 3.3, jitter [0, 0.5] 0.1.
(``ScarParams``): normal_share [0, 1] 0.5, width_min [1, 32] 2, width_max [1, 32] 16,
length_min [4, 64] 10, length_max [4, 64] 25, rotate [0, 90] 45, jitter [0, 0.5] 0.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from automl_ad.synthesis.base import SynthBatch, SynthParams, Synthesizer, register_family, affine_paste, color_jitter, uniform

_REFERENCE_SIDE = 256.0


@dataclass
class CutPasteParams(SynthParams):
    FAMILY: ClassVar[str] = "cutpaste"
    RANGES: ClassVar[dict[str, tuple]] = {
        "normal_share": (0.0, 1.0),
        "area_min": (0.005, 0.5),
        "area_max": (0.005, 0.5),
        "aspect_max": (1.0, 5.0),
        "jitter": (0.0, 0.5),
    }
    PAIRS: ClassVar[tuple] = (("area_min", "area_max"),)

    normal_share: float = 0.5
    area_min: float = 0.02
    area_max: float = 0.15
    aspect_max: float = 3.3
    jitter: float = 0.1


@dataclass
class ScarParams(SynthParams):
    FAMILY: ClassVar[str] = "cutpaste_scar"
    RANGES: ClassVar[dict[str, tuple]] = {
        "normal_share": (0.0, 1.0),
        "width_min": (1.0, 32.0),
        "width_max": (1.0, 32.0),
        "length_min": (4.0, 64.0),
        "length_max": (4.0, 64.0),
        "rotate": (0.0, 90.0),
        "jitter": (0.0, 0.5),
    }
    PAIRS: ClassVar[tuple] = (("width_min", "width_max"), ("length_min", "length_max"))

    normal_share: float = 0.5
    width_min: float = 2.0
    width_max: float = 16.0
    length_min: float = 10.0
    length_max: float = 25.0
    rotate: float = 45.0
    jitter: float = 0.1


def _centers(generator: torch.Generator, reach: Tensor, height: int, width: int) -> Tensor:
    """Random centres (B x 2) keeping a shape of half-extent ``reach`` (B x 2) inside."""
    low = reach
    high = torch.maximum(torch.stack((height - reach[:, 0], width - reach[:, 1]), 1), low)
    return low + uniform(generator, tuple(reach.shape), reach.device) * (high - low)


def _paste(images: Tensor, donors: Tensor, generator: torch.Generator, half: Tensor, angle: Tensor | None, jitter: float) -> SynthBatch:
    batch, _, height, width = images.shape
    if angle is None:
        reach = half
    else:  # bounding half-extent of the rotated rectangle
        cos, sin = torch.cos(angle).abs(), torch.sin(angle).abs()
        reach = torch.stack((half[:, 0] * cos + half[:, 1] * sin, half[:, 0] * sin + half[:, 1] * cos), 1)
    reach = torch.minimum(reach, images.new_tensor([height / 2, width / 2]))
    src_center = _centers(generator, reach, height, width)
    dst_center = _centers(generator, reach, height, width)
    jittered = color_jitter(donors, generator, jitter)
    placed, mask = affine_paste(jittered, dst_center, half, src_center, torch.ones(batch, device=images.device), angle)
    out = torch.where(mask > 0, placed, images)
    return SynthBatch(out, mask, (mask.flatten(1).amax(1) > 0).float())


@register_family
class CutPasteSynthesizer(Synthesizer):
    FAMILY = "cutpaste"
    Params = CutPasteParams

    def synthesize(self, images: Tensor, donors: Tensor, generator: torch.Generator, *, sources_given: bool) -> SynthBatch:
        p = self.params
        batch, _, height, width = images.shape
        device = images.device
        donors = donors if sources_given else images
        area = uniform(generator, (batch,), device, p.area_min, p.area_max) * height * width
        wide = uniform(generator, (batch,), device) < 0.5
        aspect = torch.where(
            wide,
            uniform(generator, (batch,), device, 1.0, p.aspect_max),
            uniform(generator, (batch,), device, 1.0 / p.aspect_max, 1.0),
        )
        half_h = (torch.sqrt(area / aspect) / 2).clamp(1.0, height / 2 - 1)
        half_w = (torch.sqrt(area * aspect) / 2).clamp(1.0, width / 2 - 1)
        return _paste(images, donors, generator, torch.stack((half_h, half_w), 1), None, p.jitter)


@register_family
class ScarSynthesizer(Synthesizer):
    FAMILY = "cutpaste_scar"
    Params = ScarParams

    def synthesize(self, images: Tensor, donors: Tensor, generator: torch.Generator, *, sources_given: bool) -> SynthBatch:
        p = self.params
        batch, _, height, width = images.shape
        device = images.device
        donors = donors if sources_given else images
        unit = min(height, width) / _REFERENCE_SIDE
        # at least one pixel wide after scaling, so tiny test images still get a scar
        thick = (uniform(generator, (batch,), device, p.width_min, p.width_max) * unit).clamp_min(1.0)
        length = (uniform(generator, (batch,), device, p.length_min, p.length_max) * unit).clamp_min(2.0)
        angle = uniform(generator, (batch,), device, -p.rotate, p.rotate) * math.pi / 180
        half = torch.stack((length / 2, thick / 2), 1)  # long side vertical before rotation
        return _paste(images, donors, generator, half, angle, p.jitter)
