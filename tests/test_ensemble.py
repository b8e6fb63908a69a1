"""Ensembles: robust normalisation, Caruana selection, the fused deployable graph."""

from __future__ import annotations

import torch
from torch import nn

from automl_ad.deploy.ensemble import EnsembleModel, MemberPredictions, RobustScaler, caruana_select, fuse


def _two_complementary_members(seed: int = 0):
    """20 good and 10 defective 16x16 images; A misses defects 0-4, B misses 5-9."""
    g = torch.Generator().manual_seed(seed)
    n_good, n_bad, size = 20, 10, 16
    labels = torch.cat([torch.zeros(n_good), torch.ones(n_bad)]).long()
    masks = torch.zeros(n_good + n_bad, size, size)
    masks[n_good:, 4:10, 4:10] = 1
    members = []
    for name, missed in (("a", range(0, 5)), ("b", range(5, 10))):
        scale = 1.0 if name == "a" else 100.0  # different raw scales: normalisation must handle it
        maps = torch.rand(n_good + n_bad, size, size, generator=g) * scale
        for i in range(n_bad):
            if i not in missed:
                maps[n_good + i, 4:10, 4:10] += 3 * scale
        scores = maps.flatten(1).amax(dim=1)
        members.append(MemberPredictions(name, scores, maps))
    return members, labels, masks


def test_ensemble_beats_its_best_member_when_members_err_on_different_images():
    members, labels, masks = _two_complementary_members()
    has_mask = torch.ones(len(labels), dtype=torch.bool)
    single = [caruana_select([m], labels, masks, has_mask, k=1) for m in members]
    ensemble = caruana_select(members, labels, masks, has_mask, k=5)
    assert set(ensemble.members) == {"a", "b"}
    assert ensemble.objective > max(s.objective for s in single) + 0.05
    assert ensemble.val["image_auroc"] == 1.0


def test_selection_keeps_a_lone_strong_member_alone():
    members, labels, masks = _two_complementary_members()
    perfect_maps = masks * 5 + 0.01 * torch.rand(masks.shape, generator=torch.Generator().manual_seed(1))
    perfect = MemberPredictions("perfect", perfect_maps.flatten(1).amax(dim=1), perfect_maps)
    result = caruana_select(members + [perfect], labels, masks, torch.ones(len(labels), dtype=torch.bool), k=4)
    assert result.members == ["perfect"]
    assert result.objective == max(result.history)


def test_robust_scaler_ignores_an_outlier_and_is_fitted_on_good_only():
    good = torch.cat([torch.linspace(0, 1, 99), torch.tensor([1000.0])])
    scaler = RobustScaler.fit(good, good.view(10, 10))
    assert abs(scaler.image_center - 0.5) < 0.02
    assert 0.2 < scaler.image_scale < 0.6
    assert abs(float(scaler.scores(torch.tensor(0.5)))) < 0.05


class _Fixed(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, images):
        maps = images.mean(dim=1) * self.factor
        return maps, maps.flatten(1).amax(dim=1)


def test_ensemble_model_matches_the_offline_fusion():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    scalers = [RobustScaler(0.1, 2.0, 0.2, 0.5), RobustScaler(1.0, 4.0, 0.0, 3.0)]
    model = EnsembleModel([_Fixed(1.0), _Fixed(7.0)], scalers, weights=[2, 1])
    maps, scores = model(images)
    raw = [_Fixed(1.0)(images), _Fixed(7.0)(images)]
    expected_maps = fuse([scalers[0].maps(raw[0][0])] * 2 + [scalers[1].maps(raw[1][0])], "mean")
    expected_scores = fuse([scalers[0].scores(raw[0][1])] * 2 + [scalers[1].scores(raw[1][1])], "mean")
    assert torch.allclose(maps, expected_maps, atol=1e-6)
    assert torch.allclose(scores, expected_scores, atol=1e-6)
    max_model = EnsembleModel([_Fixed(1.0), _Fixed(7.0)], scalers, weights=[1, 1], fusion="max")
    assert torch.allclose(max_model(images)[0], torch.maximum(scalers[0].maps(raw[0][0]), scalers[1].maps(raw[1][0])))
