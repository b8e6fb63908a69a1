"""The gradient-domain (Poisson) blend under NSA's synthetic anomalies, batched in torch.

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.errors import UserError


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
