"""How sure the val set is: the noise of a val image AUROC, and which candidates it cannot
tell apart.

A val set of 80 good images and a few hundred synthetic anomalies measures image AUROC
with a standard error of about 0.01 near 0.97. On real photographs the top trials of a
search differed by less than that while their test AUROCs spanned 0.91-0.96, so a choice
by the larger val number was a choice by noise. Two tools:

* ``delong_standard_error``: from the val scores themselves (DeLong et al. 1988); each
  trial stores it (``objective_se``), and the leaderboard shows the interval.
  ``auroc_standard_error`` (Hanley & McNeil's closed form from the AUROC and the class
  counts) stands in where the scores are gone. Trials validated on different val sets (other image sizes, other held-out
  families) are compared with it, unpaired.
* ``paired_bootstrap``: candidates scored on the *same* val images are resampled
  together (good and anomalous images separately, so every replicate keeps the class
  balance), which removes the noise they share: the question "is A better than B on
  this kind of image" gets a much tighter answer than two independent intervals give.
  ``tied_with_best`` says which candidates are not significantly worse than the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# One-sided 95 %: a candidate is "worse" only when the val set is 95 % sure of it.
CONFIDENCE = 0.95
Z_ONE_SIDED = 1.645
BOOTSTRAP_REPLICATES = 1000


def auroc_standard_error(auroc: float, anomalous: int, good: int) -> float:
    """Standard error of an AUROC measured on ``anomalous`` positive and ``good``
    negative images (Hanley & McNeil 1982); inf without both classes."""
    if anomalous < 1 or good < 1:
        return math.inf
    a = min(max(float(auroc), 1e-6), 1.0 - 1e-6)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    variance = (a * (1 - a) + (anomalous - 1) * (q1 - a * a) + (good - 1) * (q2 - a * a)) / (anomalous * good)
    return math.sqrt(max(variance, 0.0))


def delong_standard_error(scores: Tensor, labels: Tensor) -> float | None:
    """Standard error of the image AUROC of ``scores`` (DeLong et al. 1988: the variance
    of each image's share of won pairs), from the val images themselves; None without
    both classes. Unlike the closed form it assumes nothing of the score distributions."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().long()
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    if positives < 2 or negatives < 2:
        return None
    wins = _pair_wins(scores, labels)
    variance = wins.mean(dim=1).var() / positives + wins.mean(dim=0).var() / negatives
    return float(variance.clamp_min(0.0).sqrt())


def within_noise(best: float, best_se: float | None, other: float, other_se: float | None) -> bool:
    """Whether ``other`` is not significantly below ``best`` (unpaired, one-sided 95 %);
    without a standard error only an equal value is within noise."""
    spread = math.sqrt((best_se or 0.0) ** 2 + (other_se or 0.0) ** 2)
    return best - other <= Z_ONE_SIDED * spread


@dataclass(frozen=True)
class Bootstrap:
    """Paired bootstrap of C candidates' val AUROCs: ``replicates`` is B x C."""

    point: Tensor  # C: AUROC on the val set itself
    replicates: Tensor  # B x C

    def interval(self, index: int, coverage: float = 0.9) -> tuple[float, float]:
        """Percentile interval of candidate ``index``'s AUROC."""
        tail = (1.0 - coverage) / 2.0
        values = self.replicates[:, index]
        return float(torch.quantile(values, tail)), float(torch.quantile(values, 1.0 - tail))

    def worse_probability(self, index: int, than: int) -> float:
        """Share of replicates in which candidate ``index`` scores below ``than``."""
        return float((self.replicates[:, index] < self.replicates[:, than]).double().mean())

    def tied_with_best(self, confidence: float = CONFIDENCE) -> list[int]:
        """Candidates not significantly worse than the best point estimate (the best
        itself first, the rest by point estimate)."""
        best = int(self.point.argmax())
        order = sorted(range(len(self.point)), key=lambda i: (-float(self.point[i]), i))
        return [i for i in order if i == best or self.worse_probability(i, best) < confidence]


def _pair_wins(scores: Tensor, labels: Tensor) -> Tensor:
    """P x G: 1 where the anomalous image outscores the good one, 0.5 on a tie."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    difference = positive[:, None] - negative[None, :]
    return (difference > 0).double() + 0.5 * (difference == 0).double()


def paired_bootstrap(scores: Tensor, labels: Tensor, *, replicates: int = BOOTSTRAP_REPLICATES,
                     seed: int = 0) -> Bootstrap:
    """AUROC of every candidate (rows of ``scores``, C x N on the same N val images) on
    ``replicates`` stratified resamples of the images, the same resample for every
    candidate. Exact with ties: each replicate weighs the P x G win matrix by how often
    it drew each anomalous and each good image."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    labels = torch.as_tensor(labels).long()
    if scores.dim() == 1:
        scores = scores[None]
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("a bootstrap of AUROC needs good and anomalous val images")
    generator = torch.Generator().manual_seed(seed)
    draw_positive = torch.randint(positives, (replicates, positives), generator=generator)
    draw_negative = torch.randint(negatives, (replicates, negatives), generator=generator)
    weight_positive = torch.zeros(replicates, positives, dtype=torch.float64).scatter_add_(
        1, draw_positive, torch.ones(replicates, positives, dtype=torch.float64))
    weight_negative = torch.zeros(replicates, negatives, dtype=torch.float64).scatter_add_(
        1, draw_negative, torch.ones(replicates, negatives, dtype=torch.float64))
    points, columns = [], []
    for row in scores:
        wins = _pair_wins(row, labels)
        points.append(wins.mean())
        columns.append(((weight_positive @ wins) * weight_negative).sum(dim=1) / (positives * negatives))
    return Bootstrap(point=torch.stack(points).float(), replicates=torch.stack(columns, dim=1).float())
