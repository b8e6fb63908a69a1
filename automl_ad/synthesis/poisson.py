"""NSA's natural synthetic anomalies (Schlüter et al., ECCV 2022), batched in torch.

Follows the official code (hmsch/natural-synthetic-anomalies, commit 9195916:
``patch_ex`` in self_sup_data/self_sup_tasks.py, the settings of train_mvtec.py); the
per-class constants, the training augmentations and the label pipeline live in
``nsa_recipe.py``, which says where they follow it.

Per image (the NSA method first augments every image as the official loader does:
crops, small rotations for unaligned objects, vertical flips for textures; the family
alone does not, see ``NSAParams.crop``): a rectangular patch is cut from a donor
(another image of the batch, or of ``sources``), half-width per dimension
(0.03 + Gamma(gamma_shape, gamma_scale)) x side, clipped to [width_min_*, width_max_*];
rescaled by clip(N(1, 0.5), resize_min, resize_max) keeping its aspect ratio, its full
size then clipped to [width_min_*, width_max_*] x side as patch_ex does (the bounds are
half-widths, so a pasted patch spans at most width_max of the side), moved to a new
random location and blended by gradient-domain (Poisson) editing. The first patch is
always added, each of the further ``n_patches - 1`` with probability 0.5. Object
categories (``object=True``) keep patches on the object: foreground = |gray*255 -
fg_bright| > fg_thresh followed by a 7x7 median filter (cv2.medianBlur: edges repeated),
fg_bright = -1 meaning "the median of the image border"; the source patch must hold at
least ``min_object`` foreground and at least ``min_overlap`` of the source's object pixels
must land on the destination's object (16 candidate positions tried at once, the first
passing one taken, else the best; the official code draws up to 200 one at a time and
skips the patch when none passes). The pixels labelled are those of the patches where
the source or the destination is object (the blend covers the whole patch).

Where this differs from the official code: the patch stays inside the image (the
official source rectangle may be cut at the border), overlapping patches label their
union (the official mask keeps the last patch's), sizes are not rounded to whole pixels,
no patch is skipped for covering under 50 pixels (cv2.seamlessClone's limit), and the
blend is the exact discrete Poisson solution on the rectangle rather than OpenCV's.

The blend itself (``paste_rectangles``, ``poisson_blend``) is in ``poisson_solver.py``.

Labels (``label``; ``nsa_recipe.nsa_labels``), from d = mean over channels of |I_a - I|
in 0..255 units: label_mask = 5x5 median of [d > 1 on the labelled pixels], then
  binary:     label_mask;
  logistic:   label_mask / (1 + exp(-k (m - x0))), m = median of d * label_mask over a
              disk of radius 5;
  continuous: m / 255.
Image label 1 iff some pixel has d > 1.

Params (``NSAParams``; per-category defaults: ``nsa_recipe.category_defaults``):
  normal_share [0, 1] 0.0; width_min_y, width_max_y, width_min_x, width_max_x [0.01, 0.5];
  gamma_shape [0.5, 5] 2; gamma_scale [0.005, 0.2] 0.05; resize_min [0.25, 1], resize_max
  [1, 4]; n_patches [1, 6]; mode normal|mixed; label binary|continuous|logistic;
  k [0.01, 10]; x0 [0, 100]; object (bool); fg_bright [-1, 255]; fg_thresh [1, 200];
  min_object [0, 1] 0.7; min_overlap [0, 1] 0.25; crop [0.5, 1] 1.0; rotate [0, 45] 0.0
  (degrees); vflip [0, 1] 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.synthesis.base import (
    SynthBatch,
    SynthParams,
    Synthesizer,
    check_images,
    gamma_samples,
    majority_filter,
    normal,
    register_family,
    uniform,
)
from automl_ad.synthesis.nsa_recipe import (  # noqa: F401  (TEXTURES, CHANGE_TOLERANCE: re-exported)
    CHANGE_TOLERANCE,
    TEXTURES,
    augment,
    augmenting,
    category_defaults,
    nsa_labels,
)
from automl_ad.synthesis.poisson_solver import (  # noqa: F401  (re-exported: the package, tests)
    _donor_windows,
    _size_groups,
    paste_rectangles,
    poisson_blend,
)


# ------------------------------------------------------------------- the family


@dataclass
class NSAParams(SynthParams):
    FAMILY: ClassVar[str] = "nsa"
    RANGES: ClassVar[dict[str, tuple]] = {
        "normal_share": (0.0, 1.0),
        "width_min_y": (0.01, 0.5),
        "width_max_y": (0.01, 0.5),
        "width_min_x": (0.01, 0.5),
        "width_max_x": (0.01, 0.5),
        "gamma_shape": (0.5, 5.0),
        "gamma_scale": (0.005, 0.2),
        "resize_min": (0.25, 1.0),
        "resize_max": (1.0, 4.0),
        "n_patches": (1, 6),
        "mode": ("normal", "mixed"),
        "label": ("binary", "continuous", "logistic"),
        "k": (0.01, 10.0),
        "x0": (0.0, 100.0),
        "object": (False, True),
        "fg_bright": (-1.0, 255.0),
        "fg_thresh": (1.0, 200.0),
        "min_object": (0.0, 1.0),
        "min_overlap": (0.0, 1.0),
        "crop": (0.5, 1.0),
        "rotate": (0.0, 45.0),
        "vflip": (0.0, 1.0),
    }
    PAIRS: ClassVar[tuple] = (("width_min_y", "width_max_y"), ("width_min_x", "width_max_x"))

    normal_share: float = 0.0
    width_min_y: float = 0.03
    width_max_y: float = 0.4
    width_min_x: float = 0.03
    width_max_x: float = 0.4
    gamma_shape: float = 2.0
    gamma_scale: float = 0.05
    resize_min: float = 0.7
    resize_max: float = 1.3
    n_patches: int = 3
    mode: str = "normal"
    label: str = "logistic"
    k: float = 1 / 3
    x0: float = 7.0
    object: bool = False
    fg_bright: float = -1.0
    fg_thresh: float = 20.0
    min_object: float = 0.7
    min_overlap: float = 0.25
    # Augmentation of the normal images before the exchange (nsa_recipe.augment). Off for
    # the family: it is NSA's training recipe, and the NSA method turns on its category's
    # official values (nsa_recipe.augmentation_defaults). When on, SynthBatch.clean holds
    # the augmented images, so a method trained on clean (DRAEM) keeps matching targets.
    crop: float = 1.0
    rotate: float = 0.0
    vflip: float = 0.0


_CANDIDATES = 16
_OVERLAP_GRID = 12  # sample points per side of a patch for the overlap test


def foreground(images: Tensor, bright: float, thresh: float) -> Tensor:
    """B x 1 x H x W {0,1} object mask per NSA: |gray - background| > thresh, then
    cv2.medianBlur(7) (edges repeated)."""
    gray = images.mean(1, keepdim=True) * 255.0
    if bright < 0:
        border = torch.cat((gray[:, :, 0], gray[:, :, -1], gray[:, :, :, 0], gray[:, :, :, -1]), dim=-1)
        background = border.flatten(1).median(1).values.view(-1, 1, 1, 1)
    else:
        background = torch.full_like(gray[:, :, :1, :1], bright)
    return majority_filter((gray - background).abs() > thresh, 7, border="replicate")


def _rect_share(integral: Tensor, center: Tensor, half: Tensor) -> Tensor:
    """Share of foreground in rectangles (B x T centres/halves, (y, x) px) via an integral image."""
    height, width = integral.shape[1] - 1, integral.shape[2] - 1
    top = (center[..., 0] - half[..., 0]).round().long().clamp(0, height)
    bottom = (center[..., 0] + half[..., 0]).round().long().clamp(0, height)
    left = (center[..., 1] - half[..., 1]).round().long().clamp(0, width)
    right = (center[..., 1] + half[..., 1]).round().long().clamp(0, width)
    flat = integral.flatten(1)

    def at(y: Tensor, x: Tensor) -> Tensor:
        return flat.gather(1, y * (width + 1) + x)

    total = at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)
    area = ((bottom - top) * (right - left)).clamp_min(1).float()
    return total / area


def _integral(fg: Tensor) -> Tensor:
    """B x (H + 1) x (W + 1) summed-area table of a B x 1 x H x W {0,1} mask (exact in
    float32 up to 2**24 pixels)."""
    return F.pad(fg[:, 0].cumsum(1).cumsum(2), (1, 0, 1, 0))


def _candidates(generator: torch.Generator, half: Tensor, height: int, width: int, tries: int) -> Tensor:
    """B x tries x 2 centres (y, x) keeping the rectangle inside the image with a 1 px margin."""
    low = half + 1.0
    high = torch.stack((height - 2.0 - half[:, 0], width - 2.0 - half[:, 1]), 1)
    high = torch.maximum(high, low)
    draw = uniform(generator, (half.shape[0], tries, 2), half.device)
    return low[:, None] + draw * (high - low)[:, None]


def _first_passing(centers: Tensor, share: Tensor, least: float) -> Tensor:
    """Per image the first candidate whose share reaches ``least``, else the best one."""
    passing = share >= least
    choice = torch.where(passing.any(1), passing.float().argmax(1), share.argmax(1))
    return centers[torch.arange(centers.shape[0], device=centers.device), choice]


def _sample_mask(mask: Tensor, center: Tensor, half: Tensor) -> Tensor:
    """A mask (B x 1 x H x W) at a grid of _OVERLAP_GRID^2 points over rectangles
    (centres B x T x 2, halves B x T x 2 or B x 1 x 2): B x T x points, bilinear > 0.5."""
    height, width = mask.shape[2:]
    steps = (torch.arange(_OVERLAP_GRID, device=mask.device) + 0.5) / _OVERLAP_GRID * 2 - 1
    gy, gx = torch.meshgrid(steps, steps, indexing="ij")
    ys = center[..., 0, None] + gy.reshape(1, 1, -1) * half[..., 0, None]  # B x T x P
    xs = center[..., 1, None] + gx.reshape(1, 1, -1) * half[..., 1, None]
    grid = torch.stack(((2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1), -1)
    return F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0] > 0.5


def _destination(generator: torch.Generator, half_dst: Tensor, height: int, width: int,
                 target_fg: Tensor | None, donor_fg: Tensor | None, src_center: Tensor, half_src: Tensor,
                 min_overlap: float) -> Tensor:
    """Destination centres. For objects patch_ex's test: of the source's object pixels,
    at least ``min_overlap`` land on the destination's object (estimated on a 12 x 12
    grid of points over the patch; the official code counts pixels and draws up to 200
    positions, here 16 at once and the best when none passes)."""
    if target_fg is None or donor_fg is None:
        return _candidates(generator, half_dst, height, width, 1)[:, 0]
    centers = _candidates(generator, half_dst, height, width, _CANDIDATES)
    source = _sample_mask(donor_fg, src_center[:, None], half_src[:, None])  # B x 1 x P
    dest = _sample_mask(target_fg, centers, half_dst[:, None].expand_as(centers))  # B x T x P
    share = (source & dest).sum(2).float() / source.sum(2).clamp_min(1).float()
    return _first_passing(centers, share, min_overlap)


def _official_resize(half_src: Tensor, scale: Tensor, lower: Tensor, upper: Tensor, side: Tensor) -> Tensor:
    """Destination half sizes (B x 2) as patch_ex resizes a patch: the height becomes
    clip(scale * h, lo, hi), the width follows at the same aspect, clipped, and the height
    is redone from it, clipped; lo, hi are the half-width bounds in pixels, applied to
    the full size (so a pasted patch spans at most width_max of the side)."""
    full = 2 * half_src
    lo, hi = lower * side, upper * side
    new_h = (scale * full[:, 0]).clamp(lo[0], hi[0])
    new_w = (new_h / full[:, 0] * full[:, 1]).clamp(lo[1], hi[1])
    new_h = (new_w / full[:, 1] * full[:, 0]).clamp(lo[0], hi[0])
    return torch.minimum(torch.stack((new_h, new_w), 1) / 2, side / 2 - 2)


@register_family
class NSASynthesizer(Synthesizer):
    FAMILY = "nsa"
    # val masks are ground truth, not soft training targets; val images are not augmented
    VAL_PARAMS = {"label": "binary", "crop": 1.0, "rotate": 0.0, "vflip": 0.0}

    @classmethod
    def category_defaults(cls, category: str | None) -> dict[str, Any]:
        return category_defaults(category)
    Params = NSAParams
    OUTPUT_IN_RANGE = True  # clamped blend; every label mode lies in [0, 1]

    def __call__(self, images: Tensor, generator: torch.Generator, *, sources: Tensor | None = None) -> SynthBatch:
        # the official code augments every training image (and, independently, its donor:
        # here the donor is another augmented image of the batch) before patch_ex
        p = self.params
        if not augmenting(p.crop, p.rotate, p.vflip):
            return super().__call__(images, generator, sources=sources)
        images = augment(check_images(images), generator, p.crop, p.rotate, p.vflip)
        out = super().__call__(images, generator, sources=sources)
        # the augmented normal images are what the anomalies were pasted into
        return SynthBatch(out.images, out.masks, out.labels, clean=images)

    def synthesize(self, images: Tensor, donors: Tensor, generator: torch.Generator, *, sources_given: bool) -> SynthBatch:
        p = self.params
        batch, _, height, width = images.shape
        device = images.device
        if sources_given:  # outside images are donors as they are: augment them as the batch was
            donors = augment(donors, generator, p.crop, p.rotate, p.vflip)
        current = images.clone()
        patch_mask = images.new_zeros(batch, 1, height, width)
        target_fg = donor_fg = donor_area = None
        if p.object:  # object masks once per call; a summed-area table for the source test
            target_fg = foreground(images, p.fg_bright, p.fg_thresh)
            donor_fg = foreground(donors, p.fg_bright, p.fg_thresh)
            donor_area = _integral(donor_fg)
            donors = torch.cat((donors, donor_fg), 1)  # resampled with each patch
        side = images.new_tensor([height, width])
        lower = images.new_tensor([p.width_min_y, p.width_min_x])
        upper = images.new_tensor([p.width_max_y, p.width_max_x])
        for patch in range(p.n_patches):
            # every image draws every patch's numbers; inactive ones are simply not pasted
            active = torch.ones(batch, dtype=torch.bool, device=device) if patch == 0 else uniform(generator, (batch,), device) < 0.5
            frac = 0.03 + gamma_samples(generator, (batch, 2), device, p.gamma_shape, p.gamma_scale)
            half_src = torch.minimum(torch.maximum(frac, lower), upper) * side
            half_src = torch.minimum(half_src, side / 2 - 2)
            scale = normal(generator, (batch,), device, 1.0, 0.5).clamp(p.resize_min, p.resize_max)
            half_dst = _official_resize(half_src, scale, lower, upper, side)
            if donor_area is not None:
                candidates = _candidates(generator, half_src, height, width, _CANDIDATES)
                share = _rect_share(donor_area, candidates, half_src[:, None].expand_as(candidates))
                src_center = _first_passing(candidates, share, p.min_object)
            else:
                src_center = _candidates(generator, half_src, height, width, 1)[:, 0]
            dst_center = _destination(generator, half_dst, height, width, target_fg, donor_fg, src_center, half_src, p.min_overlap)
            paste_rectangles(current, patch_mask, donors, active, dst_center, half_dst, src_center,
                             half_dst / half_src, p.mode, target_fg=target_fg)
        current.clamp_(0.0, 1.0)
        masks, labels = nsa_labels(images, current, patch_mask, p.label, p.k, p.x0)
        return SynthBatch(current, masks, labels)
