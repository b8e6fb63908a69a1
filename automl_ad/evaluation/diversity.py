"""Which tied detectors to ensemble: the ones whose val scores disagree most.

Among candidates the val set cannot tell apart, TPE's later trials sit next to the best
one (the same backbone, a neighbouring coreset ratio): the three best on val are then
three copies of one detector, and their ensemble buys nothing. What averaging buys is
the members' disagreement (Krogh & Vedelsby 1995: the ensemble's error is the members'
mean error less their ambiguity), and disagreement needs no label: it is read from how
differently two candidates rank the same val images.
"""

from __future__ import annotations

import torch
from torch import Tensor

POOL = 5  # the tied candidates best on val that may join (a long tie's tail stays out)


def rank_agreement(scores: Tensor) -> Tensor:
    """Spearman correlation between every pair of rows of ``scores`` (candidates x images)."""
    ranks = scores.double().argsort(dim=1).argsort(dim=1).double()
    ranks = ranks - ranks.mean(dim=1, keepdim=True)
    ranks = ranks / ranks.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ranks @ ranks.T


def least_agreeing(scores: Tensor, k: int, pool: int = POOL) -> list[int]:
    """Rows of ``scores`` (candidates in val order, the best first, x the shared val
    images) to ensemble: the best, then one at a time the candidate among the first
    ``pool`` whose mean rank agreement with those already picked is lowest, ``k`` in
    all (ties: the better on val)."""
    count = min(int(pool), scores.shape[0])
    if count == 0:
        return []
    agreement = rank_agreement(scores[:count])
    picked = [0]
    while len(picked) < min(max(1, k), count):
        rest = [i for i in range(count) if i not in picked]
        picked.append(min(rest, key=lambda i: (agreement[i, picked].mean().item(), i)))
    return picked
