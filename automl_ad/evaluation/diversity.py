"""Which tied detectors to ensemble: other feature extractors first, then the ones whose
val scores disagree most.

Among candidates the val set cannot tell apart, TPE's later trials sit next to the best
one (the same backbone, a neighbouring coreset ratio): the three best on val are then
three copies of one detector, and their ensemble buys nothing. What averaging buys is
the members' disagreement (Krogh & Vedelsby 1995: the ensemble's error is the members'
mean error less their ambiguity). Two sources of it need no label:

* **another feature extractor** (the method and its backbone): the PatchCore authors'
  ensemble of three backbones scored 99.6 image AUROC on MVTec AD against 99.2 for one
  (reference/methods.md); detectors built on different features err on different
  images, a prior that does not rest on the small val set;
* **rank disagreement on val**: how differently two candidates rank the same val
  images. On tens of val images that is itself noisy, so it only fills the places other
  feature extractors leave.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

POOL = 5  # the tied candidates best on val that may join by disagreement (a long tie's tail stays out)


def feature_extractor(method: str, params: Mapping[str, Any]) -> str:
    """``"method:backbone"`` of a trial from its method and params (keys ``backbone`` or
    ``<method>.backbone``; the method alone, ``"method:"``, for one without a backbone)."""
    backbone = next((v for k, v in params.items() if k == "backbone" or k.endswith(".backbone")), "")
    return f"{method}:{backbone}"


def rank_agreement(scores: Tensor) -> Tensor:
    """Spearman correlation between every pair of rows of ``scores`` (candidates x images)."""
    ranks = scores.double().argsort(dim=1).argsort(dim=1).double()
    ranks = ranks - ranks.mean(dim=1, keepdim=True)
    ranks = ranks / ranks.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ranks @ ranks.T


def least_agreeing(scores: Tensor, k: int, pool: int = POOL, picked: Sequence[int] = (0,)) -> list[int]:
    """Rows of ``scores`` (candidates in val order, the best first, x the shared val
    images) to ensemble: ``picked`` (the best), then one at a time the candidate among
    the first ``pool`` whose mean rank agreement with those already picked is lowest,
    ``k`` in all (ties: the better on val)."""
    if scores.shape[0] == 0:
        return []
    count = min(int(pool), scores.shape[0])
    agreement = rank_agreement(scores)
    picked = list(picked) or [0]
    while len(picked) < max(1, k):
        rest = [i for i in range(count) if i not in picked]
        if not rest:
            break
        picked.append(min(rest, key=lambda i: (agreement[i, picked].mean().item(), i)))
    return picked


def other_extractors_first(extractors: Sequence[str], scores: Tensor, k: int, pool: int = POOL) -> list[int]:
    """Rows to ensemble, candidates in val order (the best first); ``extractors[i]`` is
    row i's ``"method:backbone"``. The best; then the best on val of each other feature
    extractor, those of the best's method first (its own backbones are the PatchCore
    paper's ensemble; another method may tie on val and still be the weaker detector);
    then, while fewer than ``k``, ``least_agreeing`` among the first ``pool``."""
    if not len(extractors) or k <= 1:
        return list(range(min(1, len(extractors))))
    method = extractors[0].split(":")[0]
    ordered = sorted(range(len(extractors)), key=lambda i: (extractors[i].split(":")[0] != method, i))
    picked, seen = [0], {extractors[0]}
    for i in ordered:
        if len(picked) >= k:
            break
        if extractors[i] not in seen:
            seen.add(extractors[i])
            picked.append(i)
    return least_agreeing(scores, k, pool, picked)
