"""DRAEM's synthetic anomalies (Zavrtanik et al., ICCV 2021), batched in torch.

Mask: 2-D gradient (Perlin) noise with 2**ky x 2**kx periods across the image,
ky, kx drawn independently from {min_scale_exp, ..., max_scale_exp}, rotated by a random
angle in (-rotate, rotate) degrees, thresholded at ``threshold``. The noise is generated
for the whole batch at once: each image has its own lattice of random unit gradients and
the rotation is applied to the sampling coordinates (so, unlike rotating the noise image,
no corner is left empty).

Rotation of normals (DRAEM's code, ``train_DRAEM``'s loader): before anything is pasted,
each image is, with probability ``rotate_normal_p`` (0.3), rotated about its centre by a
uniform angle in (-rotate_normal, rotate_normal) degrees (90), bilinear, corners filled
with black (imgaug's Affine defaults, as the official loader). The rotated image is the
clean image of that sample: ``SynthBatch.clean`` carries it as the reconstruction target,
and normal samples (label 0) are the rotated image unchanged. The paper's text says
(-45, 45); the code, which produced its results, says 0.3 and (-90, 90). The frozen val
anomalies turn it off (``VAL_PARAMS``): val good images are never rotated.

Anomaly source A, per image: with probability ``texture_share`` a texture, else another
normal image (``sources`` or the batch rolled) or, with probability ``noise_share``, a
generated colour noise texture. Textures are the images of ``texture_dir`` (DTD in the
paper; loaded once) when given, else the procedural bank of ``textures.py`` (BANK_SIZE
DTD-like textures from a fixed seed, made once per image shape: a fixed stand-in dataset,
so which textures exist never depends on the run's seed). The paper takes every source
from DTD (``texture_share`` 1). A gets ``n_aug`` distinct augmentations out of DRAEM's
ten (``source_aug.py``: the pointwise ones as one lookup table per image and channel),
evaluated only inside the mask.

Blend (paper Eq. 1): I_a = (1 - M) I + (1 - beta) M A + beta M I, beta ~ U(beta_low, beta_high).
Labels: mask M, image label 1 iff M is non-empty (as DRAEM's loader does).

Params (``PerlinParams``; names used by the search):
  normal_share  [0, 1]    0.5   share of samples left normal
  min_scale_exp [0, 6]    0     smallest noise period exponent
  max_scale_exp [0, 6]    5     largest noise period exponent (DRAEM: 0..5)
  threshold     [0.1, 0.9] 0.5  Perlin threshold (noise scaled to about [-1, 1])
  rotate        [0, 180]  90    max rotation of the noise in degrees
  beta_low      [0, 0.95] 0.0   lowest opacity of the original image inside M (code: U(0, 0.8))
  beta_high     [0, 0.95] 0.8   highest (the paper's 1.0 would leave pixels unchanged)
  n_aug         [0, 10]   3     augmentations applied to the anomaly source
  texture_share [0, 1]    1.0   share of sources that are textures (texture_dir, else the bank)
  noise_share   [0, 1]    0.5   of the other sources: share of noise textures (rest: normal images)
  rotate_normal_p [0, 1]  0.3   probability that a normal image is rotated first (code: 0.3)
  rotate_normal [0, 180]  90    max rotation of normal images in degrees (code: 90)

Frozen val anomalies (``VAL_PARAMS``) set texture_share 0 and rotate_normal_p 0: the val
set's perlin anomalies stay those of the generator before the texture bank (other normal
images and noise), drawn from the same random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.errors import UserError
from automl_ad.synthesis.base import (
    SynthBatch,
    check_images,
    SynthParams,
    Synthesizer,
    register_family,
    luminance,
    uniform,
)
from automl_ad.synthesis.source_aug import plan_augmentation, sample
from automl_ad.synthesis.textures import texture_bank

_SQRT2 = math.sqrt(2.0)
# Rotated unit-square coordinates reach 0.5 +- sqrt(2)/2; shift them to start at 0.
_ROT_MARGIN = _SQRT2 / 2 - 0.5


def perlin_noise(
    batch: int,
    height: int,
    width: int,
    periods_y: Tensor,
    periods_x: Tensor,
    generator: torch.Generator,
    angle: Tensor | None = None,
    samples_per_period: int = 4,
) -> Tensor:
    """Batched 2-D gradient noise, B x H x W, values in about [-1, 1].

    periods_y, periods_x: B integer-valued tensors (noise periods across the image).
    angle: B radians; the sampling coordinates are rotated around the image centre.

    Each image gets a lattice of random unit gradients, one cell per period. The noise is
    evaluated exactly on a regular grid of ``samples_per_period`` to 8 samples per lattice
    cell, with a few matrix products because Perlin's fade-weighted corner sum is
    separable along y and x; one ``grid_sample`` then maps every output pixel, rotated and
    scaled by its image's periods, into that grid with bilinear interpolation. No
    per-pixel gathers; images are grouped by their largest period so that each group's
    lattice fits its periods.
    """
    device = periods_y.device
    longest_each = torch.maximum(periods_y, periods_x)
    if angle is None:
        cells = int(longest_each.max()) + 1  # one host sync: sizes the lattice
        return _axis_aligned_noise(batch, height, width, periods_y, periods_x, generator, cells)
    # Images are grouped by their largest period (rounded up to a power of two), each
    # group on a lattice of its own size: one lattice sized by the batch's largest period
    # would be mostly unused by images with few periods.
    bucket = torch.exp2(torch.log2(longest_each.clamp_min(1).float()).ceil()).long()
    groups = sorted(set(bucket.tolist()))  # one host sync
    if len(groups) == 1:
        return _rotated_noise(height, width, periods_y, periods_x, generator, angle, groups[0], samples_per_period)
    noise = torch.empty(batch, height, width, device=device)
    for group in groups:
        rows = (bucket == group).nonzero().squeeze(1)
        noise[rows] = _rotated_noise(
            height, width, periods_y[rows], periods_x[rows], generator, angle[rows], group, samples_per_period
        )
    return noise


def _rotated_noise(
    height: int, width: int, periods_y: Tensor, periods_x: Tensor, generator: torch.Generator,
    angle: Tensor, longest: int, samples_per_period: int,
) -> Tensor:
    """``perlin_noise`` of images whose periods are at most ``longest``."""
    batch, device = periods_y.shape[0], periods_y.device
    cells = int(math.ceil((1.0 + 2 * _ROT_MARGIN) * longest)) + 1
    per_cell = max(samples_per_period, min(8, min(height, width) // max(longest, 1)))
    theta = 2 * math.pi * torch.rand((batch, cells + 1, cells + 1), generator=generator, device=device)
    value, slope = _cell_weights(cells, per_cell, device)
    # Perlin's sum over corners of fade_y fade_x (g_y (f_y - o_y) + g_x (f_x - o_x)) is
    # separable: contract x with banded matrices, then y with the 4 per-sample weights.
    along_x_y = torch.sin(theta) @ value.T  # B x (cells + 1) x N: the g_y terms
    along_x_x = torch.cos(theta) @ slope.T  # the g_x terms
    pairs = torch.stack((along_x_y[:, :-1], along_x_y[:, 1:], along_x_x[:, :-1], along_x_x[:, 1:]), 2)
    weights_y = torch.stack(_fade_terms(per_cell, device), 1)  # per_cell x 4
    grid = (weights_y @ pairs).reshape(batch, 1, cells * per_cell, cells * per_cell)

    cos, sin = torch.cos(angle), torch.sin(angle)
    offset = 0.5 + _ROT_MARGIN
    # Output pixel centres in [-1, 1] (x_n, y_n) map to sample-grid coordinates in
    # [-1, 1]; lattice coordinate l sits at 2 l / cells - 1 there.
    scale_y = periods_y.float() / cells
    scale_x = periods_x.float() / cells
    y_n = (2 * torch.arange(height, device=device, dtype=torch.float32) + 1) / height - 1
    x_n = (2 * torch.arange(width, device=device, dtype=torch.float32) + 1) / width - 1
    coords = torch.empty(batch, height, width, 2, device=device)
    # each coordinate is (term in x) + (term in y): one broadcast add per component
    torch.add(
        (scale_x * cos)[:, None, None] * x_n[None, None, :],
        (scale_x * sin)[:, None, None] * y_n[None, :, None] + (2 * offset * scale_x - 1)[:, None, None],
        out=coords[..., 0],
    )
    torch.add(
        (-scale_y * sin)[:, None, None] * x_n[None, None, :],
        (scale_y * cos)[:, None, None] * y_n[None, :, None] + (2 * offset * scale_y - 1)[:, None, None],
        out=coords[..., 1],
    )
    noise = F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=False)
    return _SQRT2 * noise.squeeze(1)


def _axis_aligned_noise(
    batch: int, height: int, width: int, periods_y: Tensor, periods_x: Tensor, generator: torch.Generator, cells: int
) -> Tensor:
    """Unrotated noise evaluated exactly at every pixel: with per-image banded weight
    matrices along y and x (B x size x lattice) the corner sum is two matrix products."""
    theta = 2 * math.pi * torch.rand((batch, cells + 1, cells + 1), generator=generator, device=periods_y.device)
    value_y, slope_y = _pixel_weights(periods_y, height, cells + 1)
    value_x, slope_x = _pixel_weights(periods_x, width, cells + 1)
    noise = slope_y @ torch.sin(theta) @ value_x.transpose(1, 2) + value_y @ torch.cos(theta) @ slope_x.transpose(1, 2)
    return _SQRT2 * noise


def _pixel_weights(periods: Tensor, size: int, lattice: int) -> tuple[Tensor, Tensor]:
    """B x size x lattice: for pixel k at lattice coordinate l = (k + 0.5) / size * period,
    the fade weights of points floor(l), floor(l) + 1 (value) and those times the offset
    to the point (slope)."""
    coord = (torch.arange(size, device=periods.device, dtype=torch.float32) + 0.5) / size * periods.float()[:, None]
    cell = coord.floor()
    t = coord - cell
    fade = t * t * t * (t * (t * 6 - 15) + 10)
    points = torch.arange(lattice, device=periods.device, dtype=torch.float32)
    at_near = (points == cell[..., None]).float()
    at_far = (points == cell[..., None] + 1).float()
    value = at_near * (1 - fade)[..., None] + at_far * fade[..., None]
    slope = at_near * ((1 - fade) * t)[..., None] + at_far * (fade * (t - 1))[..., None]
    return value, slope


def _fade_terms(per_cell: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At t = (k + 0.5) / per_cell: the weights of lattice points 0 and 1 times the offset
    to them, (1 - fade(t)) t and fade(t) (t - 1), and the plain weights 1 - fade(t), fade(t)."""
    t = (torch.arange(per_cell, device=device, dtype=torch.float32) + 0.5) / per_cell
    fade = t * t * t * (t * (t * 6 - 15) + 10)
    return (1 - fade) * t, fade * (t - 1), 1 - fade, fade


def _cell_weights(cells: int, per_cell: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Banded (cells * per_cell) x (cells + 1) matrices: row (cell i, sample k) holds the
    plain weights (value) or offset weights (slope) of lattice points i and i + 1."""
    slope_near, slope_far, near, far = _fade_terms(per_cell, device)
    value = torch.zeros(cells, per_cell, cells + 1, device=device)
    slope = torch.zeros(cells, per_cell, cells + 1, device=device)
    index = torch.arange(cells, device=device)
    value[index, :, index] = near
    value[index, :, index + 1] = far
    slope[index, :, index] = slope_near
    slope[index, :, index + 1] = slope_far
    return value.view(cells * per_cell, cells + 1), slope.view(cells * per_cell, cells + 1)


def noise_textures(batch: int, channels: int, height: int, width: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Colour fractal-noise textures (B x C x H x W in [0, 1]) as stand-in anomaly sources."""
    count = batch * channels
    base = 2 ** torch.randint(1, 5, (count,), generator=generator, device=device)
    noise = perlin_noise(count, height, width, base, base, generator)
    noise = noise + 0.5 * perlin_noise(count, height, width, base * 2, base * 2, generator)
    noise = noise.view(batch, channels, height, width)
    gain = uniform(generator, (batch, channels, 1, 1), device, 0.3, 0.8)
    offset = uniform(generator, (batch, channels, 1, 1), device, 0.2, 0.8)
    return (offset + gain * noise).clamp(0, 1)


# ------------------------------------------------------------------------ family


@dataclass
class PerlinParams(SynthParams):
    FAMILY: ClassVar[str] = "perlin"
    RANGES: ClassVar[dict[str, tuple]] = {
        "normal_share": (0.0, 1.0),
        "min_scale_exp": (0, 6),
        "max_scale_exp": (0, 6),
        "threshold": (0.1, 0.9),
        "rotate": (0.0, 180.0),
        "beta_low": (0.0, 0.95),
        "beta_high": (0.0, 0.95),
        "n_aug": (0, 10),
        "noise_share": (0.0, 1.0),
        "texture_share": (0.0, 1.0),
        "rotate_normal_p": (0.0, 1.0),
        "rotate_normal": (0.0, 180.0),
    }
    PAIRS: ClassVar[tuple] = (("min_scale_exp", "max_scale_exp"), ("beta_low", "beta_high"))

    normal_share: float = 0.5
    min_scale_exp: int = 0
    max_scale_exp: int = 5
    threshold: float = 0.5
    rotate: float = 90.0
    beta_low: float = 0.0
    beta_high: float = 0.8
    n_aug: int = 3
    noise_share: float = 0.5
    texture_share: float = 1.0
    rotate_normal_p: float = 0.3
    rotate_normal: float = 90.0


BANK_SIZE = 64  # procedural textures (DTD: 5640; the paper finds < 10 enough)
BANK_SEED = 0  # one fixed bank, like one dataset on disk


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_textures(texture_dir: Path, height: int, width: int) -> Tensor:
    """All images under ``texture_dir`` (recursive), RGB, resized: N x 3 x H x W uint8."""
    import cv2
    import numpy as np

    texture_dir = Path(texture_dir)
    if not texture_dir.is_dir():
        raise UserError(f"texture_dir {texture_dir} is not a folder")
    files = sorted(p for p in texture_dir.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"texture_dir {texture_dir} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    loaded = []
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise UserError(f"texture_dir: cannot read image {path}")
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        loaded.append(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))
    return torch.from_numpy(np.stack(loaded))


def rotate_images(images: Tensor, angle: Tensor) -> Tensor:
    """Each image rotated about its centre by ``angle`` (B radians; positive turns
    clockwise on screen), bilinear, black outside the original: the pixel-true rotation
    of a non-square image too (grid_sample's [-1, 1] coordinates rescaled by the aspect)."""
    height, width = images.shape[-2:]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output pixel (x, y) about the centre reads input (cos x + sin y, -sin x + cos y),
    # in pixels; divided by the half-sides that is this matrix in [-1, 1] coordinates
    theta = torch.stack(
        (torch.stack((cos, sin * height / width, torch.zeros_like(cos)), 1),
         torch.stack((-sin * width / height, cos, torch.zeros_like(cos)), 1)),
        1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_family
class PerlinSynthesizer(Synthesizer):
    FAMILY = "perlin"
    Params = PerlinParams
    OUTPUT_IN_RANGE = True  # a clamped copy, lerped towards sources in [0, 1]
    # the val set's perlin anomalies: other normal images and noise as sources (the
    # generator before the texture bank, same stream) on unrotated good images
    VAL_PARAMS = {"texture_share": 0.0, "rotate_normal_p": 0.0}

    def __init__(self, params: PerlinParams, *, category: str | None = None, texture_dir: Path | None = None) -> None:
        super().__init__(params, category=category, texture_dir=texture_dir)
        self._textures: dict[tuple[int, int], Tensor] = {}
        if texture_dir is not None and not Path(texture_dir).is_dir():
            raise UserError(f"texture_dir {texture_dir} is not a folder")

    def _texture_bank(self, height: int, width: int) -> Tensor:
        """N x 3 x H x W uint8: the texture folder's images, else the procedural bank."""
        if self.texture_dir is None:
            return texture_bank(BANK_SIZE, height, width, seed=BANK_SEED)  # cached per process
        if (height, width) not in self._textures:
            self._textures[(height, width)] = load_textures(self.texture_dir, height, width)
        return self._textures[(height, width)]

    def __call__(self, images: Tensor, generator: torch.Generator, *, sources: Tensor | None = None) -> SynthBatch:
        images = check_images(images)
        rotated = self.rotate_normals(images, generator)
        if rotated is None:
            return super().__call__(images, generator, sources=sources)
        out = super().__call__(rotated, generator, sources=sources)
        return SynthBatch(out.images, out.masks, out.labels, clean=rotated)

    def rotate_normals(self, images: Tensor, generator: torch.Generator) -> Tensor | None:
        """The batch with DRAEM's rotation applied to the drawn rows (a new tensor), or
        None when no row rotates. Draws nothing when the rotation is off, so the stream
        (and every seeded val set) is what it was without it."""
        p = self.params
        if p.rotate_normal_p <= 0.0 or p.rotate_normal <= 0.0:
            return None
        batch, device = images.shape[0], images.device
        # both draws for the whole batch: the stream does not depend on which rows turn
        turn = (uniform(generator, (batch,), device) < p.rotate_normal_p).nonzero().squeeze(1)
        angle = uniform(generator, (batch,), device, -p.rotate_normal, p.rotate_normal) * math.pi / 180
        if turn.numel() == 0:
            return None
        rotated = images.clone()
        rotated[turn] = rotate_images(images[turn], angle[turn])
        return rotated

    def masks(self, batch: int, height: int, width: int, generator: torch.Generator, device: torch.device) -> Tensor:
        p = self.params
        exp_y = torch.randint(p.min_scale_exp, p.max_scale_exp + 1, (batch,), generator=generator, device=device)
        exp_x = torch.randint(p.min_scale_exp, p.max_scale_exp + 1, (batch,), generator=generator, device=device)
        angle = uniform(generator, (batch,), device, -p.rotate, p.rotate) * math.pi / 180
        noise = perlin_noise(batch, height, width, 2**exp_y, 2**exp_x, generator, angle)
        return (noise > p.threshold).float().unsqueeze(1)

    def anomaly_sources(self, images: Tensor, donors: Tensor, generator: torch.Generator) -> Tensor:
        batch, channels, height, width = images.shape
        device = images.device
        p = self.params
        # which rows take a texture; no draw at share 0 or 1 (share 0: the stream of the
        # generator before the bank, which the val set keeps)
        if p.texture_share >= 1.0:
            textured = torch.ones(batch, dtype=torch.bool, device=device)
        elif p.texture_share <= 0.0:
            textured = torch.zeros(batch, dtype=torch.bool, device=device)
        else:
            textured = uniform(generator, (batch,), device) < p.texture_share
        out = donors  # the family owns its donors tensor (see Synthesizer.synthesize)
        if not bool(textured.all()):
            use_noise = ((uniform(generator, (batch,), device) < p.noise_share) & ~textured).nonzero().squeeze(1)
            if use_noise.numel():
                out.index_copy_(0, use_noise, noise_textures(use_noise.numel(), channels, height, width, generator, device))
        rows = textured.nonzero().squeeze(1)
        if rows.numel():
            bank = self._texture_bank(height, width)
            pick = torch.randint(0, bank.shape[0], (rows.numel(),), generator=generator, device=device)
            chosen = bank[pick.cpu()].to(device).float().div(255.0)
            out.index_copy_(0, rows, chosen if channels == 3 else luminance(chosen))
        return out

    def synthesize(self, images: Tensor, donors: Tensor, generator: torch.Generator, *, sources_given: bool) -> SynthBatch:
        p = self.params
        batch, _, height, width = images.shape
        mask = self.masks(batch, height, width, generator, images.device)
        augmentation = plan_augmentation(self.anomaly_sources(images, donors, generator), generator, p.n_aug)
        beta = uniform(generator, (batch,), images.device, p.beta_low, p.beta_high)
        # I_a = (1 - M) I + (1 - beta) M A + beta M I changes only the masked pixels (a few
        # per cent of them): A is evaluated there alone
        image, y, x = mask[:, 0].nonzero(as_tuple=True)
        blended = images.clamp(0.0, 1.0)
        if image.numel():
            channels = images.shape[1]
            plane = image[:, None] * channels + torch.arange(channels, device=images.device)
            at = plane * (height * width) + (y * width + x)[:, None]  # N x C flat indices
            flat = blended.view(-1)
            flat[at] = torch.lerp(flat[at], sample(augmentation, image, y, x), (1 - beta[image])[:, None])
        labels = torch.zeros(batch, device=images.device).index_fill_(0, image, 1.0)
        return SynthBatch(blended, mask, labels)
