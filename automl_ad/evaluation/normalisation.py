"""Robust centre and scale of scores on normal images: ``(x - median) / (1.4826 * MAD)``.

One rule for every place that normalises a detector's output on val-good: a trial (which
stores the statistics of its val-good maps with its val scores) and the ensemble that
fuses members (``deploy.ensemble.RobustScaler``). Median and MAD shrug off the odd
mislabelled good image; pixel maps are subsampled to a fixed count, enough for a stable
median and cheap.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAD_TO_SIGMA = 1.4826
_EPS = 1e-6
MAX_PIXELS_FOR_FIT = 2_000_000


def robust_center_scale(values: Tensor) -> tuple[float, float]:
    """(median, 1.4826 x MAD) of ``values``; a constant input falls back to its standard
    deviation, then to 1."""
    values = values.flatten().double()
    if values.numel() > MAX_PIXELS_FOR_FIT:
        values = values[:: values.numel() // MAX_PIXELS_FOR_FIT + 1]
    center = values.median()
    mad = (values - center).abs().median() * MAD_TO_SIGMA
    if mad < _EPS:
        mad = values.std() if values.numel() > 1 and values.std() > _EPS else torch.tensor(1.0)
    return float(center), float(mad)
