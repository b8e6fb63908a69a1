"""Image AUROC, pixel AUROC, AUPRO and F1-max, vectorised in torch on any device.

Every metric is computed at exact thresholds: the scores are sorted once and the curves
are read at the end of each run of tied scores, so ties count the way sklearn counts them
(AUROC = probability that a random positive outranks a random negative, ties counting
one half, which equals the trapezoid area under the ROC curve).

AUPRO follows the MVTec AD evaluation code: the ground-truth defects are split into
connected components (8-connectivity) over all images; at each threshold, PRO is the mean
over components of the fraction of the component's pixels above the threshold (every
region weighs the same whatever its size) and FPR is taken over all defect-free pixels;
AUPRO is the trapezoid integral of PRO over FPR from 0 to ``fpr_limit``, with the curve
interpolated at ``fpr_limit``, divided by ``fpr_limit``.

Connected components come from ``scipy.ndimage.label`` on the CPU (one call for the whole
N x H x W stack, with a structuring element that links no pixel across images); the
component ids then go back to the maps' device, where the rest runs.

A metric that is undefined on its input (one class only, no defect pixel, no defect-free
pixel) is returned as ``None``, never as 0, so a missing value cannot pass for a bad one.
Inputs that are malformed (shapes, NaN scores, labels outside {0, 1}) raise
``automl_ad.errors.UserError``.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

from automl_ad.errors import UserError

__all__ = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "evaluate"]

# 8-connectivity inside each image, no connection between neighbouring images of the stack.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


# ---------------------------------------------------------------- input checking


def _check_binary(name: str, values: Tensor) -> Tensor:
    """Return ``values`` as bool after checking every entry is 0 or 1."""
    if values.dtype == torch.bool:
        return values
    if not bool(((values == 0) | (values == 1)).all()):
        raise UserError(f"metrics: {name} must contain only 0 and 1")
    return values != 0


def _check_no_nan(name: str, values: Tensor) -> None:
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        raise UserError(f"metrics: {name} contains NaN")


def _image_inputs(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Flattened scores and bool labels on the scores' device."""
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise UserError(
            f"metrics: scores and labels must both have shape (N,), got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    _check_no_nan("scores", scores)
    return scores, _check_binary("labels", labels.to(scores.device))


def _pixel_inputs(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Maps and bool masks, both N x H x W on the maps' device."""
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise UserError(
            f"metrics: maps must be N x H x W and masks N x H x W or N x 1 x H x W of the "
            f"same size, got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    _check_no_nan("maps", maps)
    return maps, _check_binary("masks", masks.to(maps.device))


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise UserError(f"metrics: fpr_limit must be in (0, 1], got {fpr_limit}")


# ---------------------------------------------------------------- sorted scores


# Dtypes whose every value converts to float32 exactly, so float32 keys rank them exactly.
_EXACT_IN_FLOAT32 = {
    torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16, torch.bool
}
_PAYLOAD_SPAN = 2**32


def _descending_float32_key(scores: Tensor) -> Tensor:
    """int64 key whose ascending order is the descending order of the float32 scores.

    IEEE floats compare like sign-magnitude integers: flipping the 31 low bits of negative
    numbers makes the int32 view monotone; bitwise NOT then reverses the order. In-place
    steps keep the temporaries of this multi-million-pixel pass down to two.
    """
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)  # + 0.0: -0 -> +0, and a copy
    key = bits >> 31
    key.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits).bitwise_not_()
    return key.to(torch.int64)


def _float32_from_key(key: Tensor) -> Tensor:
    monotone = (~key).to(torch.int32)
    return (monotone ^ ((monotone >> 31) & 0x7FFFFFFF)).view(torch.float32)


class _DescendingScores:
    """Items sorted from highest to lowest score, their payloads in that order, and the
    last index of each run of tied scores.

    Reading cumulative counts only at ``group_ends`` gives a curve at every distinct
    threshold ("predict anomalous when score >= this value") and nowhere in between.
    ``payload`` is a small non-negative integer per item (a label or a component id).
    Scores that float32 holds exactly are packed with the payload into one int64 and
    sorted as plain integers, which on the CPU is several times faster than sorting floats
    and gathering the payload through the permutation.
    """

    def __init__(self, scores: Tensor, payload: Tensor) -> None:
        flat_scores = scores.reshape(-1)
        flat_payload = payload.reshape(-1).to(torch.int64)
        if flat_scores.dtype in _EXACT_IN_FLOAT32 and (
            flat_payload.numel() == 0 or int(flat_payload.max()) < _PAYLOAD_SPAN
        ):
            packed = _descending_float32_key(flat_scores).mul_(_PAYLOAD_SPAN).add_(flat_payload)
            packed, _ = torch.sort(packed)
            sorted_keys = packed >> 32  # arithmetic shift: floor division by the span
            self.payload = packed & (_PAYLOAD_SPAN - 1)
            self._sorted_scores: Tensor | None = None
        else:
            self._sorted_scores, order = torch.sort(flat_scores, descending=True)
            sorted_keys = self._sorted_scores
            self.payload = flat_payload[order]
        self._sorted_keys = sorted_keys
        is_last_of_run = torch.ones_like(sorted_keys, dtype=torch.bool)
        is_last_of_run[:-1] = sorted_keys[1:] != sorted_keys[:-1]
        self.group_ends = torch.nonzero(is_last_of_run).squeeze(1)
        self.all_distinct = self.group_ends.numel() == sorted_keys.numel()

    def at_group_ends(self, per_item: Tensor) -> Tensor:
        """Values of a per-item (sorted order) tensor at the last item of each run."""
        return per_item if self.all_distinct else per_item[self.group_ends]

    def cumulative_count(self, flags: Tensor) -> Tensor:
        """Number of flagged items scoring >= each distinct threshold (int64).

        ``flags`` is a bool tensor in sorted order (computed from ``payload``).
        """
        return self.at_group_ends(torch.cumsum(flags, dim=0, dtype=torch.int64))

    def predicted_count(self) -> Tensor:
        """Number of items scoring >= each distinct threshold (int64)."""
        return self.group_ends + 1

    def thresholds(self) -> Tensor:
        """The distinct scores, highest first."""
        if self._sorted_scores is not None:
            return self._sorted_scores[self.group_ends]
        return _float32_from_key(self._sorted_keys[self.group_ends])


def _auroc_from_sorted(ranked: _DescendingScores) -> float | None:
    """AUROC with positives = items whose payload is non-zero."""
    positive = ranked.payload > 0
    n_total = positive.numel()
    n_positive = int(positive.sum())
    n_negative = n_total - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    positives_at_or_above = ranked.cumulative_count(positive)
    negatives_at_or_above = ranked.predicted_count() - positives_at_or_above
    positives_in_run = torch.diff(positives_at_or_above, prepend=positives_at_or_above.new_zeros(1))
    negatives_in_run = torch.diff(negatives_at_or_above, prepend=negatives_at_or_above.new_zeros(1))
    positives_strictly_above = positives_at_or_above - positives_in_run
    # Each negative wins against the positives strictly above it and ties half with the
    # positives of its own run; doubling keeps the sum an exact integer.
    twice_pairs_won = (negatives_in_run * (2 * positives_strictly_above + positives_in_run)).sum()
    return int(twice_pairs_won) / (2 * n_positive * n_negative)


# ---------------------------------------------------------------- image level


def image_auroc(scores: Tensor, labels: Tensor) -> float | None:
    """AUROC of image scores (higher = more anomalous) against labels in {0, 1}.

    scores, labels: shape (N,). Returns None when only one class is present.
    """
    scores, positive = _image_inputs(scores, labels)
    if scores.numel() == 0:
        return None
    return _auroc_from_sorted(_DescendingScores(scores, positive))


def f1_max(scores: Tensor, labels: Tensor) -> tuple[float, float] | None:
    """Best F1 over all thresholds, and the threshold that reaches it.

    Predict anomalous when ``score >= threshold``; the threshold is one of the scores.
    When several thresholds reach the best F1 the highest one is returned (fewest alarms).
    Returns None when no label is positive (F1 is then undefined at every threshold).
    """
    scores, positive = _image_inputs(scores, labels)
    n_positive = int(positive.sum())
    if n_positive == 0:
        return None
    ranked = _DescendingScores(scores, positive)
    true_positives = ranked.cumulative_count(ranked.payload > 0).to(torch.float64)
    predicted = ranked.predicted_count().to(torch.float64)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted + actual positives).
    f1 = 2.0 * true_positives / (predicted + n_positive)
    best = int(torch.argmax(f1))  # first maximum = highest threshold
    return float(f1[best]), float(ranked.thresholds()[best])


# ---------------------------------------------------------------- pixel level


def pixel_auroc(maps: Tensor, masks: Tensor) -> float | None:
    """AUROC over all pixels of ``maps`` (N x H x W) against ``masks`` (N x [1 x] H x W).

    Returns None when the masks have no defect pixel or no defect-free pixel.
    """
    maps, defect = _pixel_inputs(maps, masks)
    if maps.numel() == 0:
        return None
    return _auroc_from_sorted(_DescendingScores(maps, defect))


def _label_components(defect: Tensor) -> tuple[Tensor, Tensor]:
    """Component id per pixel (0 = defect-free, 1..K) on the input's device, and sizes (K,)."""
    defect_cpu = defect.detach().to("cpu").numpy()
    component_ids, _ = scipy.ndimage.label(defect_cpu, structure=_EIGHT_CONNECTED_PER_IMAGE)
    sizes = np.bincount(component_ids.reshape(-1))[1:]
    device = defect.device
    return (
        torch.from_numpy(component_ids.astype(np.int64)).to(device),
        torch.from_numpy(sizes.astype(np.int64)).to(device),
    )


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # Summing millions of per-pixel weights needs float64; MPS has none.
    return torch.float32 if device.type == "mps" else torch.float64


def _trapezoid_up_to(x: Tensor, y: Tensor, x_limit: float) -> Tensor:
    """Trapezoid area under the polyline (x, y) for x in [x[0], x_limit].

    x must be non-decreasing and reach x_limit; the segment crossing x_limit is cut there
    with y linearly interpolated. Vertical segments (equal x) add nothing.
    """
    x_start, x_stop = x[:-1], x[1:]
    y_start, y_stop = y[:-1], y[1:]
    x_stop_cut = torch.clamp(x_stop, max=x_limit)
    width = x_stop - x_start
    safe_width = torch.where(width > 0, width, torch.ones_like(width))
    fraction_kept = torch.where(width > 0, (x_stop_cut - x_start) / safe_width, 1.0)
    y_stop_cut = y_start + (y_stop - y_start) * fraction_kept
    area = 0.5 * (y_start + y_stop_cut) * (x_stop_cut - x_start)
    return torch.where(x_start < x_limit, area, torch.zeros_like(area)).sum()


def _aupro_from_sorted(
    ranked: _DescendingScores, component_sizes: Tensor, fpr_limit: float
) -> float | None:
    """AUPRO with ``ranked.payload`` = component id per pixel (0 = defect-free)."""
    n_components = component_sizes.numel()
    n_defect_free = ranked.payload.numel() - int(component_sizes.sum())
    if n_components == 0 or n_defect_free == 0:
        return None
    device = ranked.payload.device
    dtype = _accumulation_dtype(device)
    # A pixel of component c adds 1 / (K * |c|) to PRO once the threshold falls below it.
    weight_of_component = torch.cat(
        [
            torch.zeros(1, dtype=dtype, device=device),
            1.0 / (n_components * component_sizes.to(dtype)),
        ]
    )
    fpr = ranked.cumulative_count(ranked.payload == 0).to(dtype) / n_defect_free
    # Only the curve up to the first point at or past fpr_limit is integrated, so PRO is
    # accumulated over that prefix of the ranking only.
    limit = torch.tensor([fpr_limit], dtype=dtype, device=device)
    n_points = int(torch.searchsorted(fpr, limit)) + 1
    n_points = min(n_points, fpr.numel())
    n_items = int(ranked.group_ends[n_points - 1]) + 1
    prefix_weights = weight_of_component[ranked.payload[:n_items]]
    pro = torch.cumsum(prefix_weights, dim=0)
    pro = pro if ranked.all_distinct else pro[ranked.group_ends[:n_points]]
    fpr = fpr[:n_points]
    origin = torch.zeros(1, dtype=dtype, device=device)
    area = _trapezoid_up_to(torch.cat([origin, fpr]), torch.cat([origin, pro]), fpr_limit)
    return float(area) / fpr_limit


def aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition).

    maps: N x H x W, higher = more anomalous; masks: N x H x W or N x 1 x H x W in {0, 1}.
    Returns a value in [0, 1], or None when there is no defect or no defect-free pixel.
    """
    _check_fpr_limit(fpr_limit)
    maps, defect = _pixel_inputs(maps, masks)
    if maps.numel() == 0:
        return None
    component_ids, component_sizes = _label_components(defect)
    return _aupro_from_sorted(_DescendingScores(maps, component_ids), component_sizes, fpr_limit)


# ---------------------------------------------------------------- everything at once


def evaluate(
    scores: Tensor,
    maps: Tensor,
    labels: Tensor,
    masks: Tensor,
    has_mask: Tensor | None = None,
) -> dict[str, float | None]:
    """All metrics of one evaluation set.

    scores: N image scores; maps: N x H x W; labels: N in {0, 1};
    masks: N x [1 x] H x W in {0, 1}; has_mask: N bool, the images whose mask is known
    (pixel metrics use only those; all images when None).
    Returns image_auroc, pixel_auroc, aupro, f1_max, f1_threshold; undefined ones are None.
    """
    scores, positive = _image_inputs(scores, labels)
    maps, defect = _pixel_inputs(maps, masks)
    if maps.shape[0] != scores.shape[0]:
        raise UserError(
            f"metrics: {scores.shape[0]} image scores but {maps.shape[0]} anomaly maps"
        )
    if has_mask is not None:
        if has_mask.shape != scores.shape:
            raise UserError(
                f"metrics: has_mask must have shape {tuple(scores.shape)}, "
                f"got {tuple(has_mask.shape)}"
            )
        keep = _check_binary("has_mask", has_mask.to(maps.device))
        maps, defect = maps[keep], defect[keep]

    best_f1 = f1_max(scores, positive)
    result: dict[str, float | None] = {
        "image_auroc": image_auroc(scores, positive),
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": None if best_f1 is None else best_f1[0],
        "f1_threshold": None if best_f1 is None else best_f1[1],
    }
    if maps.numel() == 0 or not bool(defect.any()):
        return result
    # One sort of all pixels serves both pixel metrics: a non-zero component id is a
    # defect pixel for the AUROC.
    component_ids, component_sizes = _label_components(defect)
    ranked = _DescendingScores(maps, component_ids)
    result["pixel_auroc"] = _auroc_from_sorted(ranked)
    result["aupro"] = _aupro_from_sorted(ranked, component_sizes, 0.3)
    return result
