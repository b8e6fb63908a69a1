"""NSA's recipe around the patch exchange, as its official code trains it.

Official code: hmsch/natural-synthetic-anomalies, commit 9195916 (MIT). This module
holds what ``poisson.py``'s NSA family takes from it besides the blend itself:

* **per-class constants** (``train_mvtec.py``: WIDTH_BOUNDS_PCT, NUM_PATCHES,
  INTENSITY_LOGISTIC_PARAMS, BACKGROUND, MIN_OBJECT_PCT, MIN_OVERLAP_PCT; the README:
  mixed gradients for textures, source gradients for objects; resize bounds (0.5, 2)
  for textures), through ``category_defaults``;
* **the training augmentations of the normal images** (``train_mvtec.py``'s transforms,
  applied to both the image and its donor before ``patch_ex``), through
  ``augmentation_defaults`` and ``augment``;
* **the label pipeline of patch_ex** (``self_sup_data/self_sup_tasks.py``), ``nsa_labels``.

The augmentations, official and here:
  unaligned objects (bottle, hazelnut, metal_nut, screw; here also the built-in washer):
      resize 256, RandomRotation(5), CenterCrop 230, RandomCrop 224;
  aligned objects: resize 256, CenterCrop 230, RandomCrop 224;
  textures: resize 264, RandomVerticalFlip, RandomCrop 256.
The official model sees a 224 (objects) or 256 (textures) crop, and at test time the
centre 224 crop of a 256 image (objects) or the whole 256 image (textures). Here a model
has one input size for training and test, so a crop is a window of ``crop`` of each side
(224/230 for objects, the central 230 px the random 224 crop moves in; 256/264 for
textures) at a uniformly random place, resampled to the full size: the same relative
jitter, plus a scale change of 1/crop (2.7 % for objects; textures have 3.1 % in the
official code too, 264 against 256 at test). Rotation is uniform in [-rotate, rotate]
degrees about the centre, vertical flips have probability ``vflip``. All three are one
affine resampling per batch (bilinear; torchvision's rotation is nearest-neighbour),
with reflected borders: the official crop stays inside the rotated image, here the
corners of a rotated full image come from the reflection (under 3 % of the side at 5
degrees).

An unknown category (a user's product, KolektorSDD) gets the aligned-object treatment:
the crop jitter only. Neither a flip nor a rotation is safe for a product whose
orientation may itself be a defect (a part mounted upside down), and a shift of a few
pixels is harmless on objects and textures alike; it matches the other defaults an
unknown category gets (the paper's object settings: source gradients, 3 patches).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.synthesis.base import majority_filter, uniform

CHANGE_TOLERANCE = 1.0  # grey levels (0..255) below which a pixel counts as unchanged (patch_ex's tol)

TEXTURES = ("carpet", "grid", "leather", "tile", "wood", "fabric", "marble")
# rotated at random in MVTec AD, so trained with small rotations (bottle: rotationally
# symmetric); the built-in washer is a metal_nut-like ring at random angle
UNALIGNED = ("bottle", "hazelnut", "metal_nut", "screw", "washer")

OBJECT_CROP = 224 / 230  # RandomCrop 224 out of CenterCrop 230
TEXTURE_CROP = 256 / 264  # RandomCrop 256 out of a 264 px image
ROTATION = 5.0  # RandomRotation(5): degrees, uniform in [-5, 5]
TEXTURE_VFLIP = 0.5  # RandomVerticalFlip()

# Per-class settings of train_mvtec.py, plus the built-in products: fabric and marble as
# textures, washer as a metal_nut-like object.
_LOGISTIC = {  # INTENSITY_LOGISTIC_PARAMS: (k, x0)
    "screw": (1.0, 3.0),
    "capsule": (0.5, 4.0),
    **{c: (1 / 12, 24.0) for c in ("bottle", "cable", "hazelnut")},
    **{c: (1 / 3, 7.0) for c in ("metal_nut", "pill", "carpet", "grid", "leather", "tile", "fabric", "marble", "washer")},
    **{c: (1 / 6, 15.0) for c in ("toothbrush", "transistor", "zipper", "wood")},
}
_WIDTHS = {  # WIDTH_BOUNDS_PCT (min_y, max_y, min_x, max_x); others (0.03, 0.4) both ways
    "screw": (0.03, 0.12, 0.03, 0.12),
    "capsule": (0.03, 0.15, 0.03, 0.4),
    "pill": (0.03, 0.2, 0.03, 0.4),
    "toothbrush": (0.03, 0.4, 0.03, 0.2),
    "zipper": (0.03, 0.4, 0.03, 0.2),
    "cable": (0.05, 0.4, 0.05, 0.4),
    "hazelnut": (0.03, 0.35, 0.03, 0.35),
    "washer": (0.03, 0.2, 0.03, 0.2),
}
# BACKGROUND: (fg_bright, fg_thresh). -1 = the median of the image border, for the
# built-in washer only (a dark mat, not one of MVTec's backgrounds). The built-in screw
# lies on a light background as MVTec's does, and the official (200, 60) finds it as
# well as a border estimate does (IoU with the drawn part 0.854 against 0.859 for
# (-1, 40), 24 images at 128 px).
_FOREGROUND = {
    **{c: (200.0, 60.0) for c in ("bottle", "screw", "capsule", "zipper")},
    **{c: (20.0, 20.0) for c in ("hazelnut", "pill", "toothbrush", "metal_nut")},
    "washer": (-1.0, 30.0),
}
_MIN_OBJECT = {  # MIN_OBJECT_PCT; washer follows the default 0.7 (no official value)
    "screw": 0.5,
    "metal_nut": 0.5,
    "toothbrush": 0.25,
}
_PATCHES_4 = ("screw", "zipper")  # NUM_PATCHES 4 (and every texture); else 3


def category_defaults(category: str | None) -> dict[str, Any]:
    """NSA's per-class settings for ``category``; unknown names get the paper's defaults
    (the object settings of train_mvtec.py without a foreground test)."""
    if category is None:
        return {}
    name = category.lower()
    out: dict[str, Any] = {}
    if name in TEXTURES:
        out.update(mode="mixed", resize_min=0.5, resize_max=2.0, n_patches=4, object=False)
    if name in _PATCHES_4:
        out["n_patches"] = 4
    if name in _WIDTHS:
        out.update(zip(("width_min_y", "width_max_y", "width_min_x", "width_max_x"), _WIDTHS[name]))
    if name in _LOGISTIC:
        out["k"], out["x0"] = _LOGISTIC[name]
    if name in _FOREGROUND:
        out["object"] = True
        out["fg_bright"], out["fg_thresh"] = _FOREGROUND[name]
        out["min_object"] = _MIN_OBJECT.get(name, 0.7)
    return out


def augmentation_defaults(category: str | None) -> dict[str, float]:
    """The official training augmentation of ``category`` as NSA parameters (crop,
    rotate, vflip): textures flip and crop, unaligned objects rotate and crop, every
    other name (aligned objects and unknown products) crops only."""
    name = (category or "").lower()
    if name in TEXTURES:
        return {"crop": TEXTURE_CROP, "rotate": 0.0, "vflip": TEXTURE_VFLIP}
    return {"crop": OBJECT_CROP, "rotate": ROTATION if name in UNALIGNED else 0.0, "vflip": 0.0}


def augmenting(crop: float, rotate: float, vflip: float) -> bool:
    return crop < 1.0 or rotate > 0.0 or vflip > 0.0


def augment(images: Tensor, generator: torch.Generator, crop: float, rotate: float, vflip: float) -> Tensor:
    """Each image flipped upside down with probability ``vflip``, rotated by U(-rotate,
    rotate) degrees about its centre, then a window of ``crop`` of each side at a random
    place resampled to the full size (the official order: flip or rotate, then crop).
    One batched affine resampling; ``images`` is returned as it is when all are off (no
    random numbers drawn)."""
    if not augmenting(crop, rotate, vflip):
        return images
    batch, _, height, width = images.shape
    device = images.device
    flip = uniform(generator, (batch,), device) < vflip
    angle = uniform(generator, (batch,), device, -1.0, 1.0) * math.radians(rotate)
    # window centre in normalised coordinates, the window [t - crop, t + crop] inside [-1, 1]
    shift = uniform(generator, (batch, 2), device, -1.0, 1.0) * (1.0 - crop)
    cos, sin = torch.cos(angle), torch.sin(angle)
    aspect = height / width  # rotation in pixels, not in the normalised (anisotropic) square
    sign = torch.where(flip, -1.0, 1.0)
    tx, ty = shift[:, 0], shift[:, 1]
    theta = torch.stack(
        (
            torch.stack((cos * crop, -sin * aspect * crop, cos * tx - sin * aspect * ty), 1),
            sign[:, None] * torch.stack((sin / aspect * crop, cos * crop, sin / aspect * tx + cos * ty), 1),
        ),
        1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ------------------------------------------------------------------------ labels

DISK_RADIUS = 5  # skimage.morphology.disk(5): the footprint of patch_ex's intensity median
_DISK_CHUNK = 1 << 16  # pixels per gather in disk_median_at (81 values each)


def disk_offsets(radius: int) -> Tensor:
    """(dy, dx) of skimage's disk(radius): every offset with dy^2 + dx^2 <= radius^2."""
    steps = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    keep = dy * dy + dx * dx <= radius * radius
    return torch.stack((dy[keep], dx[keep]), 1)


def disk_median_at(values: Tensor, where: Tensor, radius: int = DISK_RADIUS) -> Tensor:
    """Median of ``values`` (B x 1 x H x W) over a disk of ``radius`` around each pixel
    where ``where`` (B x 1 x H x W bool) holds, edges extended by repetition (as
    scipy.ndimage.median_filter's mode "nearest", which skimage's median uses). Returns
    the medians of those pixels in ``where.nonzero()`` order. Only those pixels are
    gathered: NSA's labels are zero everywhere else, so this costs the labelled area,
    not the image (a full-image exact median over 81 values would)."""
    image, y, x = where[:, 0].nonzero(as_tuple=True)
    padded = F.pad(values, (radius,) * 4, mode="replicate")[:, 0]
    offsets = disk_offsets(radius)
    middle = offsets.shape[0] // 2  # an odd count: the median is one of the values
    if values.device.type == "cpu":
        # numpy on a CPU: windows as strided views, copied per pixel, and introselect,
        # about 2.5x (gather) and 6x (selection) less CPU time than torch's int64 gather
        # and row-wise median (168k pixels: 80 + 200 ms against 205 + 1300 ms)
        side = 2 * radius + 1
        inside = np.zeros((side, side), dtype=bool)
        inside[offsets[:, 0] + radius, offsets[:, 1] + radius] = True
        windows = np.lib.stride_tricks.sliding_window_view(padded.numpy(), (side, side), axis=(1, 2))
        picked = [image.numpy(), y.numpy(), x.numpy()]
        out = np.empty(image.shape[0], dtype=np.float32)
        for start in range(0, image.shape[0], _DISK_CHUNK):
            chunk = windows[tuple(a[start : start + _DISK_CHUNK] for a in picked)][:, inside]
            out[start : start + _DISK_CHUNK] = np.partition(chunk, middle, axis=1)[:, middle]
        return torch.from_numpy(out)
    row = padded.shape[2]
    steps = (offsets[:, 0] * row + offsets[:, 1]).to(values.device)
    base = (image * padded.shape[1] + y + radius) * row + x + radius
    flat = padded.reshape(-1)
    out_t = values.new_empty(base.shape[0])
    for start in range(0, base.shape[0], _DISK_CHUNK):
        part = base[start : start + _DISK_CHUNK]
        out_t[start : start + _DISK_CHUNK] = flat[part[:, None] + steps[None, :]].median(1).values
    return out_t


def nsa_labels(before: Tensor, after: Tensor, region: Tensor, mode: str, k: float, x0: float) -> tuple[Tensor, Tensor]:
    """Pixel labels (B x 1 x H x W) and image labels (B) as patch_ex makes them.

    d = mean over channels of |after - before| in 0..255 units; ``region`` (B x 1 x H x W)
    is where patches were pasted (for objects: only where the source or the destination
    is object). label_mask = 5x5 median (cv2.medianBlur, edges repeated) of
    [d > tol inside region]. Then
      binary:     label_mask;
      logistic:   label_mask / (1 + exp(-k (m - x0))), m = median of d * label_mask over
                  a disk of radius 5 (skimage ``median(., disk(5))``);
      continuous: m itself, / 255 (the official "intensity" label is in grey levels and
                  trained with MSE on a ReLU output; here the output is a sigmoid).
    Image label 1 iff some pixel changed by more than tol (the picture was altered, even
    where the filters leave no labelled pixel).
    """
    diff = (after - before).abs().mean(1, keepdim=True) * 255.0
    changed = diff > CHANGE_TOLERANCE
    labels = changed.flatten(1).any(1).float()
    label_mask = majority_filter(changed & (region > 0.5), 5, border="replicate")
    if mode == "binary":
        return label_mask, labels
    intensity = diff * label_mask
    if mode == "logistic":
        where = label_mask > 0.5
        masks = torch.zeros_like(label_mask)
        masks[where] = torch.sigmoid(k * (disk_median_at(intensity, where) - x0))
        return masks, labels
    if mode != "continuous":
        raise ValueError(f"nsa_labels: mode={mode!r} not one of binary, logistic, continuous")
    # the median is non-zero only where most of the disk is labelled: near the label mask
    near = F.max_pool2d(label_mask, 2 * DISK_RADIUS + 1, stride=1, padding=DISK_RADIUS) > 0.5
    masks = torch.zeros_like(label_mask)
    masks[near] = disk_median_at(intensity, near) / 255.0
    return masks, labels
