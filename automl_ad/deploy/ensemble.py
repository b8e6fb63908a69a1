"""Ensembles of trained trials: normalisation on val-good, fusion, Caruana selection.

Normalisation is a *robust z-score* fitted on val-good only: ``(x - median) / (1.4826 *
MAD)``, separately for image scores and for pixel maps. Why not quantile scaling: a
quantile map saturates above the largest normal score, so two members that both flag an
image would lose the information of *how far* beyond normal each one is; the z-score
keeps that, is one affine op per member (exports to ONNX as-is), and median/MAD shrug off
the odd mislabelled good image.

Fusion averages the normalised members (``max`` as an option). Members are chosen by
greedy forward selection with replacement (Caruana et al. 2004): start empty, repeatedly
add the candidate (possibly again) that most improves the val objective of the fused
ensemble, keep the best prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from automl_ad.data.tiling import inference_graph
from automl_ad.evaluation.metrics import evaluate
from automl_ad.evaluation.validation import objective

Fusion = Literal["mean", "max"]
_MAD_TO_SIGMA = 1.4826
_EPS = 1e-6
_MAX_PIXELS_FOR_FIT = 2_000_000  # enough for a stable median; keeps fitting cheap


@dataclass
class RobustScaler:
    """Affine normalisation (x - center) / scale, fitted on normal data only."""

    image_center: float
    image_scale: float
    pixel_center: float
    pixel_scale: float

    @staticmethod
    def fit(good_scores: Tensor, good_maps: Tensor) -> "RobustScaler":
        scores = good_scores.flatten().double()
        pixels = good_maps.flatten().double()
        if pixels.numel() > _MAX_PIXELS_FOR_FIT:
            stride = pixels.numel() // _MAX_PIXELS_FOR_FIT + 1
            pixels = pixels[::stride]
        return RobustScaler(*_median_mad(scores), *_median_mad(pixels))

    def scores(self, scores: Tensor) -> Tensor:
        return (scores - self.image_center) / self.image_scale

    def maps(self, maps: Tensor) -> Tensor:
        return (maps - self.pixel_center) / self.pixel_scale


def _median_mad(values: Tensor) -> tuple[float, float]:
    center = values.median()
    mad = (values - center).abs().median() * _MAD_TO_SIGMA
    if mad < _EPS:  # constant on normals: fall back to the spread, then to 1
        mad = values.std() if values.numel() > 1 and values.std() > _EPS else torch.tensor(1.0)
    return float(center), float(mad)


@dataclass
class MemberPredictions:
    """One candidate's raw outputs on the shared val set (and optionally test)."""

    name: str
    val_scores: Tensor
    val_maps: Tensor
    test_scores: Tensor | None = None
    test_maps: Tensor | None = None


@dataclass
class EnsembleResult:
    members: list[str]  # with repetitions: weights = counts
    scalers: dict[str, RobustScaler]
    fusion: Fusion
    val: dict[str, float | None]
    objective: float
    history: list[float] = field(default_factory=list)  # objective after each greedy step
    test: dict[str, float | None] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.members:
            counts[name] = counts.get(name, 0) + 1
        return counts


def fuse(parts: Sequence[Tensor], fusion: Fusion) -> Tensor:
    stacked = torch.stack(list(parts))
    return stacked.mean(dim=0) if fusion == "mean" else stacked.amax(dim=0)


def caruana_select(
    candidates: Sequence[MemberPredictions],
    val_labels: Tensor,
    val_masks: Tensor,
    val_has_mask: Tensor,
    *,
    k: int = 5,
    fusion: Fusion = "mean",
) -> EnsembleResult:
    """Greedy forward selection with replacement of up to ``k`` members.

    ``val_labels`` etc. describe the shared val set; the scalers are fitted on its good
    images (label 0) only.
    """
    if not candidates:
        raise ValueError("no candidates to ensemble")
    if fusion not in ("mean", "max"):
        raise ValueError(f"fusion must be mean or max, got {fusion!r}")
    good = val_labels == 0
    scalers = {c.name: RobustScaler.fit(c.val_scores[good], c.val_maps[good]) for c in candidates}
    normalised = {
        c.name: (scalers[c.name].scores(c.val_scores), scalers[c.name].maps(c.val_maps)) for c in candidates
    }

    def score_of(names: list[str]) -> tuple[float, dict]:
        scores = fuse([normalised[n][0] for n in names], fusion)
        maps = fuse([normalised[n][1] for n in names], fusion)
        metrics = evaluate(scores, maps, val_labels, val_masks, val_has_mask)
        return objective(metrics), metrics

    chosen: list[str] = []
    best_members: list[str] = []
    best_value, best_metrics = float("-inf"), {}
    history: list[float] = []
    for _ in range(k):
        step_best = None
        for candidate in candidates:
            value, metrics = score_of(chosen + [candidate.name])
            if step_best is None or value > step_best[0]:
                step_best = (value, metrics, candidate.name)
        value, metrics, name = step_best
        chosen.append(name)
        history.append(value)
        if value > best_value:
            best_value, best_metrics, best_members = value, metrics, list(chosen)
    return EnsembleResult(
        members=best_members,
        scalers={n: scalers[n] for n in set(best_members)},
        fusion=fusion,
        val=best_metrics,
        objective=best_value,
        history=history,
    )


def ensemble_test_metrics(
    result: EnsembleResult,
    candidates: Sequence[MemberPredictions],
    test_labels: Tensor,
    test_masks: Tensor,
    test_has_mask: Tensor,
) -> dict[str, float | None]:
    """Reported only: fused test metrics of the selected members."""
    by_name = {c.name: c for c in candidates}
    scores = fuse([result.scalers[n].scores(by_name[n].test_scores) for n in result.members], result.fusion)
    maps = fuse([result.scalers[n].maps(by_name[n].test_maps) for n in result.members], result.fusion)
    return evaluate(scores, maps, test_labels, test_masks, test_has_mask)


class EnsembleModel(nn.Module):
    """The deployable graph: members -> per-member normalisation -> fusion.

    ``forward(images in [0, 1]) -> (maps B x H x W, scores B)``; a single member with an
    identity scaler is the single-model case, so export handles both the same way.
    """

    def __init__(self, members: Sequence[nn.Module], scalers: Sequence[RobustScaler], weights: Sequence[float], fusion: Fusion = "mean") -> None:
        super().__init__()
        self.members = nn.ModuleList(inference_graph(m) for m in members)  # tiled: cut, score, stitch
        self.fusion = fusion
        self.register_buffer("image_center", torch.tensor([s.image_center for s in scalers], dtype=torch.float32))
        self.register_buffer("image_scale", torch.tensor([s.image_scale for s in scalers], dtype=torch.float32))
        self.register_buffer("pixel_center", torch.tensor([s.pixel_center for s in scalers], dtype=torch.float32))
        self.register_buffer("pixel_scale", torch.tensor([s.pixel_scale for s in scalers], dtype=torch.float32))
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        fused_maps: Tensor | None = None
        fused_scores: Tensor | None = None
        for index, member in enumerate(self.members):
            maps, scores = member(images)
            maps = (maps - self.pixel_center[index]) / self.pixel_scale[index]
            scores = (scores - self.image_center[index]) / self.image_scale[index]
            if self.fusion == "mean":
                maps, scores = maps * self.weights[index], scores * self.weights[index]
                fused_maps = maps if fused_maps is None else fused_maps + maps
                fused_scores = scores if fused_scores is None else fused_scores + scores
            else:
                fused_maps = maps if fused_maps is None else torch.maximum(fused_maps, maps)
                fused_scores = scores if fused_scores is None else torch.maximum(fused_scores, scores)
        return fused_maps, fused_scores
