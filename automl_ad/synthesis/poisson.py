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

NSA's patches go through ``paste_rectangles``, which resamples the donor and solves only
inside each patch's window (windows grouped by size). ``poisson_blend`` (any mask) is
solved for the whole batch on the images' device:
the unknowns are the pixels of each mask's bounding rectangle, Dirichlet data come from
the target just outside it, and the discrete 5-point system is diagonalised by the
type-I discrete sine transform, done as batched matrix products with per-image DST
matrices (the rectangles differ in size). Edge guidance: NORMAL uses the source's
difference on every edge touching the mask, MIXED the larger-magnitude one of source and
target (per channel); edges away from the mask keep the target's (as OpenCV's
seamlessClone does), so for rectangular masks (NSA's) the result is the exact discrete
Poisson solution. The outermost image ring is never blended.

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

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.errors import UserError
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


def poisson_blend(target: Tensor, source: Tensor, mask: Tensor, mode: str = "normal") -> Tensor:
    """Gradient-domain blend of ``source`` into ``target`` where ``mask`` > 0.5.

    target, source: B x C x H x W (source already placed where it should land);
    mask: B x 1 x H x W. mode: "normal" (source gradients) or "mixed" (per edge and
    channel the larger-magnitude gradient). Returns B x C x H x W, not clamped.
    """
    if mode not in ("normal", "mixed"):
        raise UserError(f"poisson_blend: mode={mode!r} not one of normal, mixed")
    batch, channels, height, width = target.shape
    inside = mask[:, 0] > 0.5
    inside = inside.clone()
    inside[:, 0, :] = inside[:, -1, :] = False
    inside[:, :, 0] = inside[:, :, -1] = False
    if not bool(inside.any()):
        return target.clone()

    rows_any, cols_any = inside.any(2), inside.any(1)
    has = rows_any.any(1)
    y0 = rows_any.float().argmax(1)
    y1 = height - 1 - rows_any.flip(1).float().argmax(1)
    x0 = cols_any.float().argmax(1)
    x1 = width - 1 - cols_any.flip(1).float().argmax(1)
    box_h = torch.where(has, y1 - y0 + 1, torch.zeros_like(y0))
    box_w = torch.where(has, x1 - x0 + 1, torch.zeros_like(x0))
    max_h, max_w = int(box_h.max()), int(box_w.max())

    # Work on windows of the boxes plus their Dirichlet ring (the image border is never
    # inside, so the ring lies in the image); pixels past a smaller box are masked out.
    device = target.device
    ring_rows = (y0[:, None] - 1 + torch.arange(max_h + 2, device=device)).clamp(0, height - 1)
    ring_cols = (x0[:, None] - 1 + torch.arange(max_w + 2, device=device)).clamp(0, width - 1)
    b_index = torch.arange(batch, device=device)[:, None, None]

    def window(image: Tensor) -> Tensor:
        return image.permute(0, 2, 3, 1)[b_index, ring_rows[:, :, None], ring_cols[:, None, :]].permute(0, 3, 1, 2)

    target_w, source_w = window(target), window(source)
    inside_w = window(inside.unsqueeze(1))
    delta = _window_delta(target_w, source_w, inside_w, box_h.tolist(), box_w.tolist(), mode)

    rows = ring_rows[:, 1:-1, None].expand(batch, max_h, max_w)
    cols = ring_cols[:, None, 1:-1].expand(batch, max_h, max_w)
    out = target.permute(0, 2, 3, 1).clone()
    out.index_put_((b_index.expand(batch, max_h, max_w), rows, cols), delta.permute(0, 2, 3, 1), accumulate=True)
    return out.permute(0, 3, 1, 2).contiguous()


def _window_delta(
    target_w: Tensor, source_w: Tensor, inside_w: Tensor, box_h: list[int], box_w: list[int], mode: str
) -> Tensor:
    """Poisson correction on windows: target_w, source_w N x C x (h + 2) x (w + 2) hold each
    box (its top-left interior pixel at window (1, 1), sizes box_h x box_w, host ints) plus
    its Dirichlet ring; inside_w N x 1 x ... marks the blended pixels. Returns the change
    of the interior, N x C x h x w, zero outside each box."""
    batch = target_w.shape[0]
    max_h, max_w = target_w.shape[2] - 2, target_w.shape[3] - 2
    device = target_w.device
    rhs = torch.zeros_like(target_w)
    for dim in (2, 3):
        size = target_w.shape[dim]
        lo = lambda t: t.narrow(dim, 0, size - 1)  # noqa: E731 - tiny slicing helpers
        hi = lambda t: t.narrow(dim, 1, size - 1)  # noqa: E731
        d_target = hi(target_w) - lo(target_w)
        d_source = hi(source_w) - lo(source_w)
        on_mask = lo(inside_w) | hi(inside_w)
        if mode == "mixed":
            on_mask = on_mask & (d_source.abs() > d_target.abs())
        excess = d_target - torch.where(on_mask, d_source, d_target)
        rhs.narrow(dim, 0, size - 1).add_(excess)
        rhs.narrow(dim, 1, size - 1).sub_(excess)

    sine_h, eig_h, valid_h = _dst_basis(box_h, max_h, device)
    sine_w, eig_w, valid_w = _dst_basis(box_w, max_w, device)
    valid = (valid_h[:, :, None] * valid_w[:, None, :]).unsqueeze(1)
    interior = rhs[:, :, 1:-1, 1:-1] * valid

    spectrum = sine_h.unsqueeze(1) @ interior @ sine_w.unsqueeze(1).transpose(-1, -2)
    # positive on valid entries; past a box both factors are 1 and the spectrum is 0 there
    eigen = (eig_h[:, :, None] + eig_w[:, None, :]).unsqueeze(1)
    spectrum = spectrum / eigen
    norm = torch.tensor([4.0 / ((h + 1) * (w + 1)) for h, w in zip(box_h, box_w)]).to(device).view(batch, 1, 1, 1)
    return norm * (sine_h.unsqueeze(1).transpose(-1, -2) @ spectrum @ sine_w.unsqueeze(1)) * valid


def paste_rectangles(
    current: Tensor,
    patch_mask: Tensor,
    donors: Tensor,
    active: Tensor,
    dest_center: Tensor,
    dest_half: Tensor,
    src_center: Tensor,
    scale: Tensor,
    mode: str,
    max_groups: int = 4,
    target_fg: Tensor | None = None,
) -> None:
    """Poisson-blend one rescaled donor rectangle into each active image, in place.

    Same geometry as ``affine_paste`` (the strict interior of the destination rectangle,
    centre ``dest_center``, half sizes ``dest_half``, samples the donor around
    ``src_center`` scaled by ``scale``; all B x 2 / B) followed by ``poisson_blend``, but
    only the rectangles' windows are touched: the donor is resampled on each window alone
    and the DST solve runs on windows grouped by size (at most ``max_groups`` groups,
    each padded to its largest box), so the cost follows the patch areas, not the image
    size. ``scale``: B (both axes) or B x 2 (y, x). Also sets ``patch_mask`` (B x 1 x H x W)
    to 1 on the rectangles; with ``target_fg`` (B x 1 x H x W {0, 1}, the object mask of
    ``current``'s images) only where the destination or the resampled source is object,
    as patch_ex labels only those pixels, and ``donors`` then carries the donors' object
    masks as its last channel (resampled with the patch, not blended). The outermost
    image ring is never blended.
    """
    batch, channels, height, width = current.shape
    device = current.device
    scale = scale[:, None].expand(-1, 2) if scale.ndim == 1 else scale
    # strict interior |y - cy| < half, as pixel index ranges, off the image border
    top = (torch.floor(dest_center[:, 0] - dest_half[:, 0]) + 1).clamp_min(1)
    bottom = (torch.ceil(dest_center[:, 0] + dest_half[:, 0]) - 1).clamp_max(height - 2)
    left = (torch.floor(dest_center[:, 1] - dest_half[:, 1]) + 1).clamp_min(1)
    right = (torch.ceil(dest_center[:, 1] + dest_half[:, 1]) - 1).clamp_max(width - 2)
    box_h = (bottom - top + 1).clamp_min(0)
    box_w = (right - left + 1).clamp_min(0)
    keep = active & (box_h > 0) & (box_w > 0)
    box_h, box_w = box_h * keep, box_w * keep
    sizes = torch.stack((box_h, box_w), 1).long().tolist()  # one host sync: window sizes
    for members in _size_groups(sizes, max_groups):
        index = torch.tensor(members, device=device)
        group_h = box_h[index].long()
        group_w = box_w[index].long()
        max_h, max_w = max(sizes[m][0] for m in members), max(sizes[m][1] for m in members)
        rows = top[index, None] - 1 + torch.arange(max_h + 2, device=device)
        cols = left[index, None] - 1 + torch.arange(max_w + 2, device=device)
        # donor samples on the window (its ring included) only
        src_y = src_center[index, 0, None] + (rows - dest_center[index, 0, None]) / scale[index, 0, None]
        src_x = src_center[index, 1, None] + (cols - dest_center[index, 1, None]) / scale[index, 1, None]
        grid = torch.stack(
            (
                ((2 * src_x + 1) / width - 1)[:, None, :].expand(-1, max_h + 2, -1),
                ((2 * src_y + 1) / height - 1)[:, :, None].expand(-1, -1, max_w + 2),
            ),
            -1,
        )
        source_w = _donor_windows(donors, members, index, grid, per_member=current.device.type == "cpu")
        source_fg = source_w[:, channels:, 1:-1, 1:-1] if target_fg is not None else None
        source_w = source_w[:, :channels]
        rows_at = rows.long().clamp(0, height - 1)[:, :, None]
        cols_at = cols.long().clamp(0, width - 1)[:, None, :]
        image_at = index[:, None, None]
        target_w = current[image_at, :, rows_at, cols_at].permute(0, 3, 1, 2)
        steps_h = torch.arange(max_h + 2, device=device)
        steps_w = torch.arange(max_w + 2, device=device)
        inside_h = (steps_h >= 1) & (steps_h[None] <= group_h[:, None])
        inside_w = (steps_w >= 1) & (steps_w[None] <= group_w[:, None])
        inside = (inside_h[:, :, None] & inside_w[:, None, :]).unsqueeze(1)
        delta = _window_delta(target_w, source_w, inside, [sizes[m][0] for m in members], [sizes[m][1] for m in members], mode)
        # window pixels outside a box get their own values back (delta is 0 there), and
        # never coincide with another box pixel of the same image
        interior = (image_at, slice(None), rows_at[:, 1:-1], cols_at[:, :, 1:-1])
        current[interior] = (target_w[:, :, 1:-1, 1:-1] + delta).permute(0, 2, 3, 1)
        mask_at = (image_at, 0, rows_at[:, 1:-1], cols_at[:, :, 1:-1])
        pasted = inside[:, 0, 1:-1, 1:-1]
        if target_fg is not None:  # bilinear 0/1 mask > 0.5: cv2.resize of the uint8 mask
            pasted = pasted & ((target_fg[mask_at] > 0.5) | (source_fg[:, 0] > 0.5))
        patch_mask[mask_at] = torch.maximum(patch_mask[mask_at], pasted.float())


def _donor_windows(donors: Tensor, members: list[int], index: Tensor, grid: Tensor, *, per_member: bool) -> Tensor:
    """Bilinear samples (reflection padding) of donors ``members`` (``index`` on the
    device) at ``grid`` (G x h x w x 2): G x C x h x w. ``per_member``: one small
    grid_sample per member on a view of its donor, no donor copies (cheaper on a CPU);
    else one grid_sample on the gathered donors (one launch on an accelerator)."""
    if per_member:
        return torch.cat([
            F.grid_sample(donors[m : m + 1], grid[k : k + 1], mode="bilinear", padding_mode="reflection", align_corners=False)
            for k, m in enumerate(members)
        ])
    return F.grid_sample(donors.index_select(0, index), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _size_groups(sizes: list[list[int]], max_groups: int) -> list[list[int]]:
    """Images with a non-empty box, sorted by solve cost and cut into at most
    ``max_groups`` runs so that the total cost of padding each run to its largest box is
    smallest (few groups: little per-call overhead; similar sizes: little padding)."""
    def cost(h: int, w: int) -> int:
        return h * w * (h + w)  # DST by matrix products along both axes

    order = sorted((i for i, (h, w) in enumerate(sizes) if h > 0 and w > 0), key=lambda i: -cost(*sizes[i]))
    count = len(order)
    if count == 0:
        return []
    # padded[i][j]: cost of one run order[i:j] padded to its largest box, every pair in
    # one sweep per start (running maxima): the DP below then costs O(groups * count^2)
    padded = [[0] * (count + 1) for _ in range(count + 1)]
    for begin in range(count):
        tallest = widest = 0
        for end in range(begin + 1, count + 1):
            h, w = sizes[order[end - 1]]
            tallest, widest = max(tallest, h), max(widest, w)
            padded[begin][end] = (end - begin) * cost(tallest, widest)

    groups = min(max_groups, count)
    # best[g][j]: least cost of the first j images in g runs; cut[g][j]: where the last run starts
    best = [[math.inf] * (count + 1) for _ in range(groups + 1)]
    cut = [[0] * (count + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for g in range(1, groups + 1):
        previous, current, cuts = best[g - 1], best[g], cut[g]
        for j in range(g, count + 1):
            for i in range(g - 1, j):
                total = previous[i] + padded[i][j]
                if total < current[j]:
                    current[j], cuts[j] = total, i
    g = min(range(1, groups + 1), key=lambda k: best[k][count])
    runs, j = [], count
    while g > 0:
        i = cut[g][j]
        runs.append(order[i:j])
        j, g = i, g - 1
    return runs[::-1]


def _dst_basis(sizes: list[int], max_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image DST-I matrices (B x N x N, zero outside each image's size), the matching
    eigenvalues of the 1-D Dirichlet Laplacian 2 - 2 cos(pi k / (n + 1)) (B x N, 1 past
    each size) and the valid-entry mask (B x N floats). Assembled on the host from
    cached matrices and moved to ``device`` in one transfer per tensor: no per-image
    copies on an accelerator."""
    count = len(sizes)
    basis = torch.zeros(count, max_size, max_size)
    eig = torch.ones(count, max_size)
    valid = torch.zeros(count, max_size)
    for row, size in enumerate(sizes):
        if size > 0:
            basis[row, :size, :size] = _dst_matrix(size)
            eig[row, :size] = _dirichlet_eigenvalues(size)
            valid[row, :size] = 1.0
    return basis.to(device), eig.to(device), valid.to(device)


_DST_CACHE: dict[int, Tensor] = {}
_EIG_CACHE: dict[int, Tensor] = {}
_DST_CACHE_LIMIT = 256


def _dst_matrix(size: int) -> Tensor:
    """sin(pi k l / (size + 1)), k, l = 1..size (host), cached: patch sizes repeat across batches."""
    if size not in _DST_CACHE:
        if len(_DST_CACHE) >= _DST_CACHE_LIMIT:
            _DST_CACHE.pop(next(iter(_DST_CACHE)))
        k = torch.arange(1, size + 1, dtype=torch.float64)
        _DST_CACHE[size] = torch.sin(math.pi * k[:, None] * k[None, :] / (size + 1)).float()
    return _DST_CACHE[size]


def _dirichlet_eigenvalues(size: int) -> Tensor:
    """2 - 2 cos(pi k / (size + 1)), k = 1..size (host), cached."""
    if size not in _EIG_CACHE:
        if len(_EIG_CACHE) >= _DST_CACHE_LIMIT:
            _EIG_CACHE.pop(next(iter(_EIG_CACHE)))
        k = torch.arange(1, size + 1, dtype=torch.float32)
        _EIG_CACHE[size] = 2.0 - 2.0 * torch.cos(math.pi * k / (size + 1.0))
    return _EIG_CACHE[size]


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
